"""The Coprocessor family (Liu, H1, H2) against computations that do not use its code paths."""

from __future__ import annotations

import math

import pytest
import torch
from presets import PRESETS, backbone_for

from latentlab.backbones import add_special_tokens, train_tokenizer
from latentlab.engine.generation import left_pad
from latentlab.methods.coprocessor import H1, H2, H1Config, H2Config, Liu, LiuConfig
from latentlab.recipes.compute import counted_flops, flops_per_example
from latentlab.tasks.base import Example

EXAMPLES = [
    Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7"),
    Example("Numbers: 9 2 4 8 6. Target: 10.", ("9-8=1", "4*2=8", "8+1=9"), "4*2+9-8"),
]
TEXTS = [e.question + "\n" + "\n".join(e.steps) + "\n### " + e.answer for e in EXAMPLES] * 20
VARIANTS = {"liu": (Liu, LiuConfig), "h1": (H1, H1Config), "h2": (H2, H2Config)}


def make(variant: str, preset: str = "gpt2-tiny", n_latents: int = 3, **options):
    cls, config_cls = VARIANTS[variant]
    tok = train_tokenizer(TEXTS, 300)
    backbone = backbone_for(preset, tok, seed=0)
    config = config_cls(latent_budget=n_latents, **options)
    add_special_tokens(tok, backbone, cls.special_tokens(config))
    torch.manual_seed(1)
    return cls(config, backbone, tok).eval()


def trainable_step(method, steps: int = 3) -> None:
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = method.collate([method.encode(e) for e in EXAMPLES])
    method.train()
    for _ in range(steps):
        method(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("variant", ["liu", "h1", "h2"])
def test_liu_and_h1_keep_the_base_bit_identical_h2_trains_both(variant: str) -> None:
    method = make(variant)
    base = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    copro = {k: v.clone() for k, v in method.coprocessor.state_dict().items()}
    soft = method.soft_tokens.detach().clone()
    trainable_step(method)
    base_same = all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in base.items())
    assert base_same == (variant != "h2")
    now = method.coprocessor.state_dict()
    changed = [k for k, v in copro.items() if not torch.equal(v, now[k])]
    assert len(changed) > len(copro) // 2  # the Coprocessor's blocks learn
    assert not torch.equal(soft, method.soft_tokens)


def gpt2_suffix_hidden(model, prompt: list[int], copro_kv, suffix: list[int],
                       n_latents: int) -> torch.Tensor:
    """GPT-2's last-layer states for `suffix`, written out by hand: at every layer the queries
    attend over [the Base's keys of the prompt; the Coprocessor's keys; the suffix's own keys]."""
    gpt = model.transformer
    heads, dim = gpt.config.n_head, gpt.config.n_embd
    split = lambda t: t.view(t.shape[0], heads, dim // heads).transpose(0, 1)  # noqa: E731

    def run(ids: list[int], start: int, past: list[tuple[torch.Tensor, torch.Tensor]]):
        h = gpt.wte(torch.tensor(ids)) + gpt.wpe(torch.arange(start, start + len(ids)))
        new = []
        for layer, block in enumerate(gpt.h):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(dim, dim=-1)
            q, k, v = split(q), split(k), split(v)
            keys = torch.cat([past[layer][0], k], 1) if past else k
            values = torch.cat([past[layer][1], v], 1) if past else v
            scores = q @ keys.transpose(1, 2) / math.sqrt(dim // heads)
            n_past = keys.shape[1] - len(ids)
            causal = torch.ones(len(ids), keys.shape[1], dtype=torch.bool).tril(n_past)
            attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ values
            h = h + block.attn.c_proj(attn.transpose(0, 1).reshape(len(ids), dim))
            h = h + block.mlp(block.ln_2(h))
            new.append((k, v))
        return gpt.ln_f(h), new

    _, base_kv = run(prompt, 0, [])
    past = [(torch.cat([bk, ck], 1), torch.cat([bv, cv], 1))
            for (bk, bv), (ck, cv) in zip(base_kv, copro_kv, strict=True)]
    hidden, _ = run(suffix, len(prompt) + n_latents, past)
    return hidden


@pytest.mark.parametrize("variant", ["h1", "h2-kv"])
def test_kv_injection_equals_explicit_attention_over_base_and_coprocessor_keys(variant) -> None:
    method = make("h1") if variant == "h1" else make("h2", injection="kv")
    prompts = [method.prompt_ids(e) for e in EXAMPLES]
    suffixes = [method.target_ids(e, keep_steps=True)[:6] for e in EXAMPLES]
    ids, mask = left_pad(prompts, method.tokenizer.pad_token_id)
    with torch.no_grad():
        state, latents = method.augment(method.read_prompt(ids, mask))
        n = method.config.latent_budget
        # The Coprocessor's keys and values: the last n cached positions (before the Base
        # appends the suffix's own).
        appended = [(layer.keys[:, :, -n:].clone(), layer.values[:, :, -n:].clone())
                    for layer in state.cache.layers]
        out, n_head = method.inject(state, latents, ids, torch.tensor(suffixes))
    for row, (prompt, suffix) in enumerate(zip(prompts, suffixes, strict=True)):
        copro_kv = [(k[row], v[row]) for k, v in appended]
        with torch.no_grad():
            expected = gpt2_suffix_hidden(method.backbone, prompt, copro_kv,
                                          [prompt[-1], *suffix], n)
        torch.testing.assert_close(out.hidden[row], expected, rtol=1e-4, atol=1e-5)
    assert n_head == 1


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", ["liu", "h1"])
def test_positions_match_a_base_that_read_the_latents_as_tokens(preset: str, variant: str) -> None:
    """With the Coprocessor an exact copy of the Base and soft tokens equal to the embeddings of
    tokens u_1..u_N, the Coprocessor's keys at the latent positions are the Base's own keys for
    u at positions p+1..p+N (rotary included). So H1 must equal the Base reading
    [prompt, u, last prompt token, suffix] from scratch, and Liu's latents must equal the Base's
    last-layer states at u."""
    method = make(variant, preset)
    u = [7, 11, 13]
    with torch.no_grad():
        method.soft_tokens.copy_(method.backbone.get_input_embeddings().weight[u])
    prompts = [method.prompt_ids(e) for e in EXAMPLES]
    suffixes = [method.target_ids(e, keep_steps=True)[:5] for e in EXAMPLES]
    ids, mask = left_pad(prompts, method.tokenizer.pad_token_id)
    with torch.no_grad():
        state, latents = method.augment(method.read_prompt(ids, mask))
        out, n_head = method.inject(state, latents, ids, torch.tensor(suffixes))
        for row, (prompt, suffix) in enumerate(zip(prompts, suffixes, strict=True)):
            full = method.backbone(input_ids=torch.tensor([prompt + u]),
                                   output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(latents[row], full[-len(u):], rtol=1e-4, atol=1e-5)
            if variant == "h1":
                seq = torch.tensor([[*prompt, *u, prompt[-1], *suffix]])
                reference = method.backbone(input_ids=seq, output_hidden_states=True)
            else:
                table = method.backbone.get_input_embeddings()
                embeds = torch.cat([table(torch.tensor(prompt)), latents[row],
                                    table(torch.tensor(suffix))])[None]
                reference = method.backbone(inputs_embeds=embeds, output_hidden_states=True)
            expected = reference.hidden_states[-1][0, -(n_head + len(suffix)):]
            torch.testing.assert_close(out.hidden[row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", ["liu", "h2"])
def test_cached_generation_equals_uncached_recomputation(preset: str, variant: str) -> None:
    method = make(variant, preset)
    n_new = 8
    completions = method.generate(EXAMPLES, n_new)  # batched, left-padded, cached
    table = method.backbone.get_input_embeddings()
    for example, completion in zip(EXAMPLES, completions, strict=True):
        prompt = method.prompt_ids(example)
        ids, mask = left_pad([prompt], method.tokenizer.pad_token_id)
        with torch.no_grad():
            _, latents = method.augment(method.read_prompt(ids, mask))
            generated: list[int] = []
            for _ in range(n_new):  # the whole sequence, no cache, every step
                embeds = torch.cat([table(torch.tensor(prompt)), latents[0],
                                    table(torch.tensor(generated, dtype=torch.long))])[None]
                token = int(method.backbone(inputs_embeds=embeds).logits[0, -1].argmax())
                if token == method.tokenizer.eos_token_id:
                    break
                generated.append(token)
        assert completion == method.tokenizer.decode(generated)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("variant", ["liu", "h1", "h2"])
def test_flops_are_counted_on_every_backbone_alike_with_and_without_autograd(
        preset: str, variant: str) -> None:
    # Results report FLOPs counted under no_grad; with autograd on, every tensor a module
    # receives has a grad_fn, so PyTorch's module tracker has what it hooks.
    method = make(variant, preset)
    batch = method.collate([method.encode(EXAMPLES[0])])
    with torch.no_grad():
        without = counted_flops(lambda: method(batch))
    assert without == counted_flops(lambda: method(batch)) > 0
    counted = flops_per_example(method, EXAMPLES[:1], EXAMPLES[:1], 4)
    assert counted["train_forward"] == without and counted["inference"] > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_h1_batched_generation_equals_one_example_at_a_time(preset: str) -> None:
    method = make("h1", preset)
    batched = method.generate(EXAMPLES, 8)
    assert batched == [method.generate([e], 8)[0] for e in EXAMPLES]


def test_latents_per_layer_and_random_init_and_orthogonality_term() -> None:
    method = make("liu", n_latents=4, orthogonality=3.0)
    z = method.latents(EXAMPLES)
    assert z.shape == (2, 4, 128)
    out = method(method.collate([method.encode(e) for e in EXAMPLES]))
    assert out.loss.item() == pytest.approx(
        (out.metrics["lm_loss"] + 3.0 * out.metrics["orthogonality"]).item(), rel=1e-6)
    random = make("liu", coprocessor_init="random")
    pairs = zip(random.backbone.transformer.h[0].parameters(),
                random.coprocessor.transformer.h[0].parameters(), strict=True)
    # weight matrices differ; norms start at ones/zeros in any initialisation
    assert not any(torch.equal(a, b) for a, b in pairs if a.ndim >= 2)


def test_variants_fix_their_choices_in_the_config() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        LiuConfig(injection="kv")
    with pytest.raises(ValidationError):
        H1Config(train_base=True)
    assert H2Config(injection="kv").train_base is True
    assert make("h2").coprocessor is not make("h2").backbone
    assert isinstance(make("h1"), H1) and isinstance(make("h2"), H2)
