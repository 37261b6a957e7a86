"""Latent-SFT against computations that do not use its code paths: hand-written masks and
positions, the stage-1 loss as separate causal passes (one per latent, one per chunk), the
stage-2 loss from full-vocabulary distributions, uncached per-example inference, hand-computed
metrics; then the two-phase pipeline end to end through `latentlab.recipes.train`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import metric_rows
from test_training import final_weights, tiny
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerFast

from latentlab.backbones import (
    EOS,
    PAD,
    ModelConfig,
    add_special_tokens,
    build_backbone,
    train_tokenizer,
)
from latentlab.config import load_config
from latentlab.engine.generation import with_cache
from latentlab.errors import ConfigError
from latentlab.latents import orthogonality_penalty
from latentlab.methods import METHODS
from latentlab.methods.base import IGNORE, answer_text, steps_text
from latentlab.methods.latent_sft import (
    COMPRESS,
    END_THINK,
    THINK,
    LatentSFT,
    LatentSFTConfig,
    LatentSFTLatent,
)
from latentlab.methods.latent_sft.metrics import (
    ecr_at_k,
    effective_parallelism,
    length_stats,
    split_segments,
)
from latentlab.methods.latent_sft.soft_labels import load_soft_labels, write_soft_labels
from latentlab.methods.latent_sft.superposition import (
    gumbel_targets,
    latent_kl,
    mixture,
    noise_generator,
)
from latentlab.recipes import evaluate, load_run, train
from latentlab.tasks import build_task
from latentlab.tasks.base import Example
from latentlab.tasks.countdown import all_solutions, solve, verify

EXAMPLES = [
    Example("Numbers: 9 2 4 8. Target: 10.", ("9-8=1", "4*2=8", "8+1=9"), "4*2+9-8"),
    Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7"),
    Example("Numbers: 1 2. Target: 3.", ("1+2=3",), "1+2"),
    Example("Tom is a wumpus. Is Tom a wumpus?", (), "yes"),
]
TEXTS = [e.question + "\n" + steps_text(e.steps) + answer_text(e) for e in EXAMPLES]


def make(preset: str = "gpt2-tiny", tokenizer: Any = None, **options: Any) -> LatentSFT:
    tokenizer = tokenizer or train_tokenizer(TEXTS * 10, 300)
    backbone = build_backbone(ModelConfig(name=preset), tokenizer, seed=0)
    config = LatentSFTConfig(**options)
    add_special_tokens(tokenizer, backbone, LatentSFT.special_tokens(config))
    torch.manual_seed(1)
    return LatentSFT.implementation(config)(config, backbone, tokenizer).eval()  # no dropout


# ------------------------------------------------------------------------ masks, positions


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (and `###`), so that the hand-written tables below know every
    sequence's length."""
    symbols = ["[UNK]", EOS, PAD, "###", *sorted(set("".join(TEXTS) + "Qa4 \n"))]
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"###|[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


# "a" + steps ("12", "3") + answer "4", chunk_size 2: prompt `a \n <think>` (3 tokens); the CoT
# `1 2 \n 3 \n` gives chunks S_1 = `1 2`, S_2 = `\n 3`, S_3 = `\n`; the tail is
# `</think> ### ␠ 4 <eos>`.
SMALL = Example("a", ("12", "3"), "4")
# Encoder: a \n <think> 1 2 L1 \n 3 L2 \n L3 </think>
ENCODER_INDUCTION = [
    "1",
    "11",
    "111",
    "1111",
    "11111",
    "111111",  # L1 sees x, <think>, S_1, itself
    "1111101",  # \n of S_2: not L1
    "11111011",
    "111110111",  # L2: x, <think>, S_1, S_2, itself
    "1111101101",
    "11111011011",  # L3
    "111110110101",  # </think>: no compress token
]
# Decoder: a \n <think> z1 \n 3 z2 \n z3 </think> ### ␠ 4 <eos>
DECODER_SUPERVISION = [
    "1",
    "11",
    "111",
    "1111",  # z1: x <think>, itself
    "00011",  # S_2[0]: z1, itself
    "000111",  # S_2[1]: z1, S_2[0], itself
    "1111001",  # z2: x <think>, z1, itself
    "00000011",  # S_3[0]: z2, itself
    "111100101",  # z3
    "1111001011",  # </think>: x <think>, the latents, itself
    "11110010111",
    "111100101111",
    "1111001011111",
    "11110010111111",
]
DECODER_POSITIONS = [0, 1, 2, 3, 4, 5, 4, 5, 5, 6, 7, 8, 9, 10]
# Labels: S_2 and S_3 (from z1, z2), then </think> ### ␠ 4 <eos>; three groups (S_2, S_3, tail)
DECODER_WEIGHTS = [0, 0, 0, 0, 1 / 6, 1 / 6, 0, 1 / 3, 0, *[1 / 15] * 5]


def table(rows: list[str], width: int) -> Tensor:
    return torch.tensor([[c == "1" for c in row.ljust(width, "0")] for row in rows])


@pytest.mark.parametrize(("induction", "supervision"),
                         [(True, True), (False, True), (True, False)])
def test_masks_and_positions_match_hand_written_tables(induction: bool,
                                                       supervision: bool) -> None:
    method = make(tokenizer=char_tokenizer(), chunk_size=2, induction_mask=induction,
                  supervision_mask=supervision)
    tok = method.tokenizer
    f = method.encode(SMALL)
    think, end, mark = tok.convert_tokens_to_ids([THINK, END_THINK, COMPRESS])
    a, newline, one, two, three, four, hashes, space = tok.convert_tokens_to_ids(
        ["a", "\n", "1", "2", "3", "4", "###", " "])
    assert f["encoder_ids"] == [a, newline, think, one, two, mark, newline, three, mark,
                                newline, mark, end]
    assert f["input_ids"] == [a, newline, think, mark, newline, three, mark, newline, mark,
                              end, hashes, space, four, tok.eos_token_id]
    assert f["labels"] == [IGNORE] * 4 + [newline, three, IGNORE, newline, IGNORE, end,
                                          hashes, space, four, tok.eos_token_id]
    assert f["positions"] == DECODER_POSITIONS
    assert f["weights"] == pytest.approx(DECODER_WEIGHTS)

    # In a batch with a longer example: padding is seen by nobody and sees only itself.
    batch = method.collate([f, method.encode(EXAMPLES[0])])
    causal = {n: torch.ones(n, n, dtype=torch.bool).tril() for n in (12, 14)}
    encoder = table(ENCODER_INDUCTION, 12) if induction else causal[12]
    decoder = table(DECODER_SUPERVISION, 14) if supervision else causal[14]
    for mask, expected in ((batch["encoder_mask"][0], encoder), (batch["mask"][0], decoder)):
        n = expected.shape[0]
        assert torch.equal(mask[:n, :n], expected)
        assert not mask[:n, n:].any()
        assert torch.equal(mask[n:, :], torch.eye(mask.shape[0], dtype=torch.bool)[n:])
    assert batch["latent"][0].nonzero().flatten().tolist() == [3, 6, 8]


# ------------------------------------------------------------ stage 1 (phase encoder) loss


def reference_sup_loss(method: LatentSFT, examples: list[Example], average: str) -> Tensor:
    """l_sup from separate plain causal passes, no 4-D mask: L_i's state from the encoder
    reading only `x <think> S_1..S_i L_i` (at the positions these tokens hold in the full
    sequence); each chunk S_{i+1} from the decoder reading it after a cache cropped to z_i's
    keys and values; the tail from the decoder reading `x <think> z_1..z_N </think> y <eos>`
    (the layout of stage 2)."""
    tok, cfg = method.tokenizer, method.config
    encoder, decoder = method.encoder, method.backbone
    assert encoder is not None
    e_enc = encoder.get_input_embeddings().weight
    e_dec = decoder.get_input_embeddings().weight
    think, end, mark = tok.convert_tokens_to_ids([THINK, END_THINK, COMPRESS])
    per_example, all_nll = [], []
    for example in examples:
        prompt = [*tok(example.question + "\n", add_special_tokens=False)["input_ids"], think]
        cot = tok(steps_text(example.steps), add_special_tokens=False)["input_ids"]
        chunks = [cot[i:i + cfg.chunk_size] for i in range(0, len(cot), cfg.chunk_size)]
        p, zs = len(prompt), []
        for i in range(len(chunks)):
            ids, positions = list(prompt), list(range(p))
            for j in range(i + 1):
                start = p + sum(len(c) for c in chunks[:j]) + j  # S_j after j compress tokens
                ids += chunks[j]
                positions += range(start, start + len(chunks[j]))
            ids.append(mark)
            positions.append(p + sum(len(c) for c in chunks[:i + 1]) + i)
            h = encoder(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                        output_hidden_states=True).hidden_states[-1][0, -1]
            top = (h @ e_enc.T).topk(cfg.top_k)
            zs.append(top.values.softmax(-1) @ e_dec[top.indices])
        groups = []
        for i in range(len(chunks) - 1):
            # z_{i+1} in its context (x <think> z_1..z_{i+1}); then S_{i+2} reads a cache that
            # holds z_{i+1}'s keys and values only, at every layer.
            chunk = chunks[i + 1]
            cache = DynamicCache(config=decoder.config)
            prefix = torch.cat([e_dec[prompt], torch.stack(zs[:i + 1])])[None]
            last = decoder.base_model(inputs_embeds=prefix, **with_cache(decoder.base_model, cache),
                                      use_cache=True).last_hidden_state[:, -1:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, -1:], layer.values[:, :, -1:]
            hidden = decoder.base_model(inputs_embeds=e_dec[chunk][None],
                                        **with_cache(decoder.base_model, cache),
                                        position_ids=torch.arange(p + i + 1, p + i + 1
                                                                  + len(chunk))[None]
                                        ).last_hidden_state
            logits = decoder.get_output_embeddings()(torch.cat([last, hidden[:, :-1]], 1))[0]
            groups.append(nn.functional.cross_entropy(logits, torch.tensor(chunk),
                                                      reduction="none"))
        tail = [end, *tok(answer_text(example), add_special_tokens=False)["input_ids"],
                tok.eos_token_id]
        inputs = torch.cat([e_dec[prompt], *[z[None] for z in zs], e_dec[tail]])[None]
        logits = decoder(inputs_embeds=inputs).logits[0]
        start = p + len(zs) - 1  # the position that predicts </think>
        groups.append(nn.functional.cross_entropy(logits[start:start + len(tail)],
                                                  torch.tensor(tail), reduction="none"))
        per_example.append(torch.stack([g.mean() for g in groups]).mean())
        all_nll += groups
    if average == "chunk":
        return torch.stack(per_example).mean()
    return torch.cat(all_nll).mean()


def gradients(method: LatentSFT, loss: Tensor) -> dict[str, Tensor]:
    method.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("preset", "average"), [("gpt2-tiny", "chunk"),
                                                 ("qwen3-tiny", "token")])
def test_stage1_loss_and_gradients_equal_separate_causal_passes(preset: str,
                                                                average: str) -> None:
    method = make(preset, chunk_size=3, top_k=5, loss_average=average)
    batch = method.collate([method.encode(e) for e in EXAMPLES])
    loss = method(batch).loss
    expected = reference_sup_loss(method, EXAMPLES, average)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Gradients reach the encoder only through α and z = α^T E, as in the reference.
    grads, ref_grads = gradients(method, loss), gradients(method, expected)
    assert any(k.startswith("encoder.") for k in grads) and grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("top_k", [4, 0])
def test_latents_are_alpha_weighted_embedding_rows(top_k: int) -> None:
    method = make(top_k=top_k)
    batch = method.collate([method.encode(e) for e in EXAMPLES[:3]])
    with torch.no_grad():
        z, indices, probs = method.encoder_latents(batch["encoder_ids"],
                                                   batch["encoder_kinds"], batch["encoder_mask"])
    assert indices is not None and probs is not None
    table = method.backbone.get_input_embeddings().weight.detach()
    vocab = table.shape[0]
    assert z.shape[0] == 11  # 5 + 4 + 2 chunks of 4 CoT tokens
    assert probs.shape[1] == (top_k or vocab)
    torch.testing.assert_close(probs.sum(-1), torch.ones(z.shape[0]))
    assert (probs > 0).all() and all(len(set(row)) == len(row) for row in indices.tolist())
    for zi, idx, p in zip(z, indices, probs, strict=True):
        rows = table[idx]  # the k rows α puts weight on
        torch.testing.assert_close(zi, p @ rows, rtol=1e-5, atol=1e-6)
        if top_k:  # z lies in the span of those k rows, with coefficients α
            coefficients = torch.linalg.lstsq(rows.T.double(), zi.double()[:, None]).solution
            torch.testing.assert_close(coefficients[:, 0].float(), p, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------ stage 1 schedule


def test_the_three_step_schedule_trains_what_each_step_says() -> None:
    method = make(schedule_epochs=(2, 1, 3))
    stages = method.stages(epochs=99)  # train.epochs is not used in phase encoder
    assert [(s.name, s.epochs, s.reset_optimizer, s.select) for s in stages] == [
        ("encoder-only", 2, False, False), ("decoder-only", 1, True, False),
        ("union", 3, True, True)]
    # As the engine does: the optimizer is built before the first stage, from what trains.
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    batch = method.collate([method.encode(e) for e in EXAMPLES])
    for stage, (encoder_moves, decoder_moves) in enumerate([(True, False), (False, True),
                                                            (True, True)]):
        method.set_stage(stage)
        method.train()
        assert method.encoder is not None
        assert method.encoder.training == encoder_moves
        assert method.backbone.training == decoder_moves
        before = {k: v.clone() for k, v in method.state_dict().items()}
        method(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = method.state_dict()
        moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
        assert moved == {name for name, on in (("encoder", encoder_moves),
                                               ("backbone", decoder_moves)) if on}


# --------------------------------------------------------------------- Gumbel, KL, stage 2


def test_gumbel_top1_frequencies_follow_alpha_and_repeat_for_the_same_draw() -> None:
    alpha = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = alpha.expand(40_000, -1)
    never_end = torch.zeros(probs.shape, dtype=torch.bool)
    # Unclamped, the Gumbel-max trick: argmax(log α + g) ~ α.
    free = gumbel_targets(probs, never_end, noise_generator(0, 0, 0), clamp=None)
    frequencies = torch.bincount(free.argmax(-1), minlength=4) / probs.shape[0]
    torch.testing.assert_close(frequencies, alpha, rtol=0, atol=0.01)
    # D's clamp to [-1.5, 3] cuts the large draws that let unlikely tokens win, so the
    # frequencies deviate from α (2M numpy draws: 0.512, 0.304, 0.147, 0.037): compare with
    # numpy's own clamped Gumbel-max.
    clamped = gumbel_targets(probs, never_end, noise_generator(0, 0, 0))
    frequencies = torch.bincount(clamped.argmax(-1), minlength=4) / probs.shape[0]
    draws = np.clip(np.random.default_rng(0).gumbel(size=(200_000, 4)), -1.5, 3.0)
    reference = np.bincount((np.log(alpha.numpy()) + draws).argmax(-1), minlength=4) / 200_000
    torch.testing.assert_close(frequencies, torch.tensor(reference, dtype=torch.float),
                               rtol=0, atol=0.01)
    assert frequencies[3] < alpha[3] - 0.008  # the deviation is real, not noise
    # The same (seed, epoch, index) draws the same noise; another epoch draws other noise.
    small = alpha.expand(3, -1)
    again = [gumbel_targets(small, never_end[:3], noise_generator(7, e, 12)) for e in (2, 2, 3)]
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], again[2])
    # Temperature and scale: τ → p̃ = softmax((log α + g) / τ); scale 0 → α itself.
    torch.testing.assert_close(gumbel_targets(small, never_end[:3], noise_generator(0, 0, 0),
                                              scale=0.0), small)


def test_end_token_is_never_the_noisy_top1() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1]] * 2000)
    is_end = torch.tensor([[True, False, False]] * 2000)
    p = gumbel_targets(probs, is_end, noise_generator(0, 0, 0))
    assert not (p.argmax(-1) == 0).any()
    torch.testing.assert_close(p.sum(-1), torch.ones(2000))
    # Without noise the end token stays the top-1 whatever is redrawn: it leaves the support.
    fixed = gumbel_targets(probs[:1], is_end[:1], noise_generator(0, 0, 0), scale=0.0)
    torch.testing.assert_close(fixed, torch.tensor([[0.0, 0.75, 0.25]]))
    unchanged = gumbel_targets(probs[:1], is_end[:1], noise_generator(0, 0, 0), scale=0.0,
                               reject_end=False)
    torch.testing.assert_close(unchanged, probs[:1])


def test_kl_is_zero_when_the_model_reproduces_the_target() -> None:
    vocab = 50
    indices = torch.tensor([[3, 7, 11], [0, 1, 49]])
    target = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    logits = torch.full((2, vocab), -1e4).scatter(1, indices, target.log())  # q = p̃
    assert float(latent_kl(logits, indices, target)) == pytest.approx(0.0, abs=1e-6)
    # Otherwise it is KL(p̃ || q) over the full vocabulary.
    logits = torch.randn(2, vocab)
    dense = torch.zeros(2, vocab).scatter(1, indices, target)
    expected = nn.functional.kl_div(logits.log_softmax(-1), dense, reduction="sum") / 2
    torch.testing.assert_close(latent_kl(logits, indices, target), expected)


def latent_method(encoder: LatentSFT, tmp_path: Path, **options: Any) -> LatentSFT:
    """A phase-latent model on the same vocabulary, fed the encoder's soft labels directly
    (the run-directory path is the end-to-end test's)."""
    path = write_soft_labels(encoder, EXAMPLES, tmp_path / "labels.safetensors", 2, "test")
    method = make(phase="latent", encoder_from=str(tmp_path), tokenizer=encoder.tokenizer,
                  **options)
    method._labels = load_soft_labels(path)
    return method


def test_orthogonality_penalises_each_examples_own_latents_in_both_phases(
        tmp_path: Path) -> None:
    # A penalty per example with a pair of latents, averaged (the last has none: no steps).
    encoder = make(chunk_size=3, orthogonality=1.5)
    features = [encoder.encode(e) for e in EXAMPLES]
    with torch.no_grad():
        own = []
        for f in features:
            batch = encoder.collate([f])
            z, _, _ = encoder.encoder_latents(batch["encoder_ids"], batch["encoder_kinds"],
                                              batch["encoder_mask"])
            if len(z) >= 2:
                own.append(orthogonality_penalty(z[None]))
        out = encoder(encoder.collate(features))
    assert 2 <= len(own) < len(EXAMPLES)
    torch.testing.assert_close(out.metrics["orthogonality"], torch.stack(own).mean())

    latent = latent_method(make(chunk_size=3), tmp_path, chunk_size=3, orthogonality=1.5)
    table = latent.backbone.get_input_embeddings().weight
    with torch.no_grad():
        own = []
        for example in EXAMPLES:
            batch = latent.collate([latent.encode(example)])  # the same noise as in a batch
            if int(batch["slot"].sum()) >= 2:
                fed = mixture(table, batch["slot_indices"], batch["slot_probs"])
                own.append(orthogonality_penalty(fed[None]))
        out = latent(latent.collate([latent.encode(e) for e in EXAMPLES]))
    assert 2 <= len(own) < len(EXAMPLES)
    torch.testing.assert_close(out.metrics["orthogonality"], torch.stack(own).mean())


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
def test_stage2_loss_equals_cross_entropy_plus_full_vocabulary_kl(preset: str,
                                                                  tmp_path: Path) -> None:
    encoder = make(preset, top_k=6)
    method = latent_method(encoder, tmp_path, lat_weight=0.5)
    method.set_stage(3)  # epoch 3
    features = [method.encode(e) for e in EXAMPLES]
    batch = method.collate(features)
    out = method(batch)
    think, end, mark = method.tokenizer.convert_tokens_to_ids([THINK, END_THINK, COMPRESS])
    table = method.backbone.get_input_embeddings().weight
    head = method.backbone.get_output_embeddings()
    exp_terms, kl_terms, slot = [], [], 0
    for example, f, alphas in zip(EXAMPLES, features, encoder.encoder_alphas(EXAMPLES),
                                  strict=True):
        prompt = [*method.prompt_ids(example), think]
        tail = [end, *method.target_ids(example, keep_steps=False)]
        n = alphas[0].shape[0]
        assert f["input_ids"] == [*prompt, *[mark] * n, *tail]
        indices = batch["slot_indices"][slot:slot + n]
        targets = batch["slot_probs"][slot:slot + n]
        assert torch.equal(indices, alphas[0].long())  # the encoder's own tokens
        slot += n
        dense = torch.zeros(n, table.shape[0]).scatter(1, indices, targets)
        inputs = torch.cat([table[prompt], dense @ table, table[tail]])[None]
        logits = head(method.backbone.base_model(inputs_embeds=inputs).last_hidden_state)[0]
        p = len(prompt)
        exp_terms.append(nn.functional.cross_entropy(logits[p + n - 1:-1], torch.tensor(tail),
                                                     reduction="none"))
        if n:
            log_q = logits[p - 1:p - 1 + n].log_softmax(-1)
            kl_terms.append(nn.functional.kl_div(log_q, dense, reduction="none").sum(-1))
    l_exp, l_lat = torch.cat(exp_terms).mean(), torch.cat(kl_terms).mean()
    torch.testing.assert_close(out.metrics["l_lat"], l_lat.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, l_exp + 0.5 * l_lat, rtol=1e-5, atol=1e-6)

    # Noise per (seed, epoch, example): the same epoch gives the same targets, another not.
    assert torch.equal(method.collate(features)["slot_probs"], batch["slot_probs"])
    method.set_stage(4)
    other = method.collate([method.encode(e) for e in EXAMPLES])["slot_probs"]
    assert other.shape == batch["slot_probs"].shape
    assert not torch.equal(other, batch["slot_probs"])


def test_hidden_state_latents_ablation(tmp_path: Path) -> None:
    encoder = make(latent_space="hidden", max_latent_steps=3)
    batch = encoder.collate([encoder.encode(e) for e in EXAMPLES])
    z, indices, _ = encoder.encoder_latents(batch["encoder_ids"], batch["encoder_kinds"],
                                            batch["encoder_mask"])
    assert indices is None  # z is the encoder's state itself
    torch.testing.assert_close(z, encoder.encoder_states(
        batch["encoder_ids"], batch["encoder_kinds"], batch["encoder_mask"]))
    encoder(batch).loss.backward()
    assert encoder.encoder is not None
    assert encoder.encoder.get_input_embeddings().weight.grad is not None

    path = write_soft_labels(encoder, EXAMPLES, tmp_path / "hidden.safetensors", 3, "test")
    labels = load_soft_labels(path)
    assert labels.values is not None and labels.indices is None
    for example, states in zip(EXAMPLES, encoder.encoder_hidden(EXAMPLES), strict=True):
        torch.testing.assert_close(labels.values_of(labels.row(example)).float(), states,
                                   rtol=1e-2, atol=1e-2)  # float16
    method = make(phase="latent", latent_space="hidden", encoder_from=str(tmp_path),
                  tokenizer=encoder.tokenizer, max_latent_steps=3)
    method._labels = labels
    batch = method.collate([method.encode(e) for e in EXAMPLES])
    out = method(batch)
    # L_lat: the state before each slot against the stored state, from one plain pass per row
    table = method.backbone.get_input_embeddings().weight
    think, end = method.tokenizer.convert_tokens_to_ids([THINK, END_THINK])
    errors = []
    for example in EXAMPLES:
        stored = labels.values_of(labels.row(example)).float()
        prompt = [*method.prompt_ids(example), think]
        inputs = torch.cat([table[prompt], stored, table[[end]]])[None]
        hidden = method.backbone.base_model(inputs_embeds=inputs).last_hidden_state[0]
        errors.append((hidden[len(prompt) - 1:len(prompt) - 1 + len(stored)] - stored) ** 2)
    torch.testing.assert_close(out.metrics["l_lat"], torch.cat(errors).mean().detach(),
                               rtol=1e-4, atol=1e-6)
    # Inference feeds the last state back (an untrained model never says </think>: 3 steps).
    _, steps = method.generate_with_steps(EXAMPLES[:1], 2)
    assert steps == [3]
    latents = method.latents(EXAMPLES[:1])[0]
    with torch.no_grad():
        embeds = table[[*method.prompt_ids(EXAMPLES[0]), think]]
        for step in range(steps[0]):
            state = method.backbone.base_model(inputs_embeds=embeds[None]).last_hidden_state
            torch.testing.assert_close(latents[step], state[0, -1], rtol=1e-4, atol=1e-5)
            embeds = torch.cat([embeds, state[0, -1:]])


# -------------------------------------------------------------------------- soft labels


class SimulatedCrash(Exception):
    """The build process dying halfway."""


def test_soft_labels_round_trip_and_resume_skips_finished_shards(tmp_path: Path,
                                                                 monkeypatch) -> None:
    encoder = make(top_k=5)
    examples = [*EXAMPLES, *EXAMPLES[:3]]  # 7 examples: 4 shards of 2
    clean = write_soft_labels(encoder, examples, tmp_path / "clean.safetensors", 2, "enc")
    labels = load_soft_labels(clean)
    for example, (indices, alpha) in zip(examples, encoder.encoder_alphas(examples),
                                         strict=True):
        row = labels.row(example)
        stored_indices, stored_probs = labels.alphas_of(row)
        assert torch.equal(stored_indices, indices) and labels.count(row) == len(indices)
        torch.testing.assert_close(stored_probs, alpha, rtol=1e-3, atol=1e-3)  # float16
    assert labels.indices is not None and labels.indices.dtype == torch.int32
    assert labels.probs is not None and labels.probs.dtype == torch.float16
    assert labels.metadata["source"] == "enc" and labels.metadata["top_k"] == "5"

    calls: list[int] = []
    crash_at: list[int] = [3]  # the call that dies (none once emptied)
    original = encoder.encoder_alphas

    def counted(batch: list[Example], k: int | None = None) -> Any:
        calls.append(len(batch))
        if len(calls) in crash_at:
            raise SimulatedCrash
        return original(batch, k)

    monkeypatch.setattr(encoder, "encoder_alphas", counted)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(SimulatedCrash):
        write_soft_labels(encoder, examples, out, 2, "enc")
    parts = tmp_path / "resumed.safetensors.parts"
    assert json.loads((parts / "progress.json").read_text())["done"] == [0, 1]
    calls.clear()
    crash_at.clear()
    write_soft_labels(encoder, examples, out, 2, "enc")
    assert calls == [2, 1]  # shards 2 and 3 only
    assert not parts.exists()
    resumed = load_soft_labels(out)
    assert all(torch.equal(getattr(resumed, k), getattr(labels, k))
               for k in ("offsets", "indices", "probs"))
    # Parts of another encoder are not reused.
    calls.clear()
    (tmp_path / "other.safetensors.parts").mkdir()
    (tmp_path / "other.safetensors.parts" / "progress.json").write_text(
        json.dumps({"fingerprint": "another encoder", "done": [0, 1, 2, 3]}))
    write_soft_labels(encoder, examples, tmp_path / "other.safetensors", 2, "enc")
    assert calls == [2, 2, 2, 1]


# ---------------------------------------------------------------------------- inference


def uncached_think(method: LatentSFT, example: Example,
                   max_new_tokens: int) -> tuple[str, list[Tensor]]:
    """One example, no cache, no padding: the whole prefix again at every step."""
    model, tok, cfg = method.backbone, method.tokenizer, method.config
    table = model.get_input_embeddings().weight
    think, end = tok.convert_tokens_to_ids([THINK, END_THINK])
    embeds = table[[*tok(example.question + "\n", add_special_tokens=False)["input_ids"], think]]
    fed: list[Tensor] = []
    for _ in range(cfg.max_latent_steps):
        logits = model(inputs_embeds=embeds[None]).logits[0, -1]
        if int(logits.argmax()) == end:
            break
        top = logits.topk(cfg.top_k)
        fed.append(top.values.softmax(-1) @ table[top.indices])
        embeds = torch.cat([embeds, fed[-1][None]])
    tokens: list[int] = []
    next_id = end
    for _ in range(max_new_tokens):
        embeds = torch.cat([embeds, table[[next_id]]])
        next_id = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
        if next_id == tok.eos_token_id:
            break
        tokens.append(next_id)
    return tok.decode(tokens), fed


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
def test_cached_inference_equals_uncached_recomputation(preset: str) -> None:
    method = make(preset, top_k=8, max_latent_steps=6)
    # An untrained model never (or always) says </think>: a bias on its logit, searched so that
    # the rows of the batch stop after different numbers of latents, some at the cap.
    old = method.backbone.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = nn.Parameter(old.weight.detach().clone())
    method.backbone.set_output_embeddings(head)
    for bias in [0.3 + i / 40 for i in range(40)]:
        with torch.no_grad():
            head.bias.zero_()
            head.bias[method.end_id] = bias
        _, steps = method.generate_with_steps(EXAMPLES, 1)
        if len(set(steps)) >= 3 and 6 in steps:
            break
    assert len(set(steps)) >= 3 and 6 in steps, steps
    completions, steps = method.generate_with_steps(EXAMPLES, 6)
    latents = method.latents(EXAMPLES)
    assert latents.shape == (4, 6, 128)
    with torch.no_grad():
        for row, example in enumerate(EXAMPLES):
            completion, fed = uncached_think(method, example, 6)
            assert completion == completions[row] and len(fed) == steps[row], (preset, row)
            if fed:
                torch.testing.assert_close(latents[row, :len(fed)], torch.stack(fed),
                                           rtol=1e-4, atol=1e-5)
            assert not latents[row, len(fed):].any()
    distributions = method.latent_distributions(EXAMPLES)
    assert [len(d) for d in distributions] == steps
    for d in distributions:
        torch.testing.assert_close(d.sum(-1), torch.ones(len(d)))
        assert ((d > 0).sum(-1) == 8).all()


# ----------------------------------------------------------------------------- metrics


def test_ecr_at_k_counts_chunk_tokens_among_the_top_k() -> None:
    # Example 1: latent 1 finds both tokens of its chunk in its top 3, latent 2 finds one
    # (7 is 4th, outside K = 3); example 2: one latent, a token twice in the chunk (counts 2).
    indices = [torch.tensor([[5, 9, 1, 2], [4, 8, 6, 7]]), [[3, 0, 2, 1]]]
    chunks = [[[9, 5], [7, 8]], [[2, 2]]]
    assert ecr_at_k(indices, chunks, k=3) == pytest.approx((2 + 1 + 2) / 3)
    assert ecr_at_k(indices, chunks, k=4) == pytest.approx((2 + 2 + 2) / 3)
    with pytest.raises(ValueError, match="needs 5"):
        ecr_at_k(indices, chunks, k=5)


def test_effective_parallelism_matches_hand_computation() -> None:
    q = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]])
    # Two paths with the same score: N_eff = 2; one path alone: 1.
    same = [[[0], [2]], [[0, 0], [3]]]  # repeated tokens count once
    assert effective_parallelism(q, same, eps=0.0) == pytest.approx(2.0)
    assert effective_parallelism(q, same[:1]) == pytest.approx(1.0)
    paths = [[[0], [2]], [[1], [3, 1]], [[3], [0]]]
    eps = 1e-3
    s = [(math.log(0.5 + eps) + math.log(0.4 + eps)) / 2,
         (math.log(0.3 + eps) + math.log(0.5 + eps)) / 2,
         (math.log(0.0 + eps) + math.log(0.1 + eps)) / 2]
    pi = [math.exp(v) / sum(math.exp(w) for w in s) for v in s]
    expected = math.exp(-sum(p * math.log(p) for p in pi))
    assert effective_parallelism(q, paths, eps=eps) == pytest.approx(expected)
    assert split_segments([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4, 5]]
    assert split_segments([1], 3) == [[], [1], []]


def test_countdown_solutions_are_every_valid_step_list() -> None:
    # By hand: (1,2)->3: 3+3; 1*2 or 2/1 -> 2: 3*2; (1,3)->4: 4+2; 1*3 or 3/1 -> 3: 3*2;
    # (2,3)->5: 5+1; (2,3)->6: 6*1 or 6/1. Nine step lists.
    solutions = all_solutions([1, 2, 3], 6)
    assert solutions == sorted([
        ("2+1=3", "3+3=6"), ("2*1=2", "3*2=6"), ("2/1=2", "3*2=6"), ("3+1=4", "4+2=6"),
        ("3*1=3", "3*2=6"), ("3/1=3", "3*2=6"), ("3+2=5", "5+1=6"), ("3*2=6", "6*1=6"),
        ("3*2=6", "6/1=6")])
    numbers, target = [25, 5, 4, 3], 77
    many = all_solutions(numbers, target)
    assert many and len(set(many)) == len(many)
    assert all(verify("\n".join(s), numbers, target) for s in many)
    assert tuple(solve(numbers, target) or ()) in many
    assert all_solutions([2, 3], 7) == []


def test_length_stats() -> None:
    stats = length_stats([2, 4, 6], [8, 12, 24], [True, False, True])
    assert stats["latent_steps"] == 4 and stats["cot_tokens"] == pytest.approx(44 / 3)
    assert stats["compression"] == pytest.approx(44 / 12)
    assert stats["pass@1"] == pytest.approx(200 / 3)
    assert stats["pass@1_per_latent"] == pytest.approx(200 / 12)
    assert stats["correlation"] == pytest.approx(0.9607689)  # numpy's corrcoef
    undefined = length_stats([0, 0], [5, 5], [False, False])
    assert undefined["compression"] is None and undefined["correlation"] is None
    assert undefined["pass@1_per_latent"] is None and undefined["pass@1"] == 0


# ------------------------------------------------------------------- config and pipeline


def test_config_checks_and_shipped_configs() -> None:
    with pytest.raises(ValueError, match="encoder_from"):
        LatentSFTConfig(phase="latent")
    with pytest.raises(ValueError, match="phase latent"):
        LatentSFTConfig(encoder_from="runs/x")
    with pytest.raises(ValueError, match="no epoch"):
        LatentSFTConfig(schedule_epochs=(0, 0, 0))
    assert METHODS["latent_sft"] is LatentSFT
    for task in ("countdown", "gsm8k"):
        encoder = load_config(f"configs/{task}_latent_sft_encoder.yaml")
        latent = load_config(f"configs/{task}_latent_sft.yaml")
        assert encoder.method.phase == "encoder" and latent.method.phase == "latent"
        assert encoder.model.init_from and f"{task}-cot" in encoder.model.init_from
        assert latent.method.encoder_from == latent.model.init_from
        assert latent.method.encoder_from == str(encoder.run_dir())
        assert latent.run_dir() != encoder.run_dir()
        assert (latent.method.chunk_size, latent.method.latent_space) == (
            encoder.method.chunk_size, encoder.method.latent_space)


def test_two_phase_pipeline_end_to_end(tmp_path: Path) -> None:
    first, second = tmp_path / "encoder", tmp_path / "latent"
    # Phase encoder: 40 examples, batch 8, one epoch per step of the schedule (15 steps).
    train(tiny(first, "method.name=latent_sft", "method.schedule_epochs=[1,1,1]",
               "train.max_steps=null", "train.eval_every=0", "method.max_latent_steps=4"))
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if r.get("split") == "valid"] == [0, 1, 2]
    # Phase latent, from the encoder run's decoder (as D's code), 2 epochs.
    results = train(tiny(second, "method.name=latent_sft", "method.phase=latent",
                         f"method.encoder_from={first}", f"model.init_from={first}",
                         "train.epochs=2", "train.max_steps=null", "train.eval_every=0",
                         "method.max_latent_steps=4"))
    labels = load_soft_labels(first / "soft_labels" / "train.safetensors")
    assert len(labels.rows) == 40 and labels.metadata["chunk_size"] == "4"
    rows = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows if "loss" in r} == {0, 1}  # a stage per epoch
    method, config = load_run(second)
    assert isinstance(method, LatentSFTLatent) and not hasattr(method, "encoder")
    task = build_task(config.task)
    metrics, predictions = evaluate(method, task, task.load("test"), config.eval)
    assert metrics == results["test"] and len(predictions) == 8
    # The encoder run's soft labels are checked against its current weights.
    (first / "best" / "method.safetensors").write_bytes(b"changed")
    fresh = latent_method_from_run(second)
    with pytest.raises(ConfigError, match="another state"):
        fresh.encode(task.load("train")[0])


def test_latent_phase_resumes_exactly_with_its_gumbel_noise(tmp_path: Path) -> None:
    # Each epoch of the latent phase is a stage with fresh Gumbel noise: a run stopped in the
    # middle of epoch 2 (step 7 of 10) and resumed must draw the same noise as one that ran
    # straight through, so that weights and logged losses agree bit for bit.
    encoder = tmp_path / "encoder"
    train(tiny(encoder, "method.name=latent_sft", "method.schedule_epochs=[1,0,0]",
               "train.max_steps=null", "method.max_latent_steps=4"))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    options = ("method.name=latent_sft", "method.phase=latent", f"method.encoder_from={encoder}",
               f"model.init_from={encoder}", "train.epochs=2", "train.max_steps=null",
               "train.eval_every=0", "method.max_latent_steps=4")
    train(tiny(straight, *options))
    train(tiny(interrupted, *options, "train.stop_after=7"))
    assert not (interrupted / "results.json").exists()
    train(tiny(interrupted, *options), resume=True)
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(straight) == metric_rows(interrupted)
    assert {r["stage"] for r in metric_rows(straight) if "loss" in r} == {0, 1}


def latent_method_from_run(run_dir: Path) -> LatentSFT:
    method, _ = load_run(run_dir)
    assert isinstance(method, LatentSFT)
    return method
