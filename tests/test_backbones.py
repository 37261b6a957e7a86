"""Tokenizers, presets and the one place where the vocabulary grows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from latentlab.backbones import (
    PRESETS,
    RECOMPILE_LIMIT,
    ModelConfig,
    add_special_tokens,
    build_backbone,
    build_tokenizer,
    check_tokenizer_matches,
    compile_transformers,
    count_parameters,
    train_tokenizer,
)
from latentlab.errors import ModelError
from latentlab.lm_head import head_cross_entropy

CORPUS = ["Numbers: 25 5 4. Target: 80.\n25-5=20\n20*4=80\n### (25-5)*4",
          "Every shumpus is a rempus. Tom is a shumpus.\n### Tom is a rempus."] * 50


@pytest.mark.parametrize("text", [
    "Numbers: 25 5 4. Target: 80.\n25-5=20\n",
    "unseen wörds, émojis 🙂 and\ttabs  double  spaces\n\n",
    "1234567890 + 0.5 = $1,234,568.40",
])
def test_trained_tokenizer_round_trips_any_text(text: str) -> None:
    tok = train_tokenizer(CORPUS, 300)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_trained_tokenizer_splits_digits_and_survives_save(tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = train_tokenizer(CORPUS, 300)
    pieces = tok.convert_ids_to_tokens(tok("2580", add_special_tokens=False)["input_ids"])
    assert pieces == ["2", "5", "8", "0"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Numbers: 25 5 4.\n### (25-5)*4"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id


def test_gpt2_bpe_tokenizer_from_shared_files(shared_data) -> None:
    tok = build_tokenizer(ModelConfig(tokenizer="gpt2-bpe"), [])
    assert len(tok) == 50257 + 1  # GPT-2's vocabulary plus an added pad token
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's own ids


@pytest.mark.parametrize(("preset", "expected"), [("gpt2-small", 124_439_808),
                                                  ("qwen3-0.6b", 596_049_920)])
def test_full_size_presets_match_published_parameter_counts(preset: str, expected: int) -> None:
    vocab = 50257 if preset.startswith("gpt2") else 151936
    spec = PRESETS[preset]
    config = AutoConfig.for_model(spec.model_type, vocab_size=vocab, **spec.fields)
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(model) == expected


def test_special_tokens_grow_embeddings_once_and_reject_a_foreign_tokenizer() -> None:
    tok = train_tokenizer(CORPUS, 300)
    model = build_backbone(ModelConfig(name="qwen3-tiny"), tok, seed=0)
    before = model.get_input_embeddings().weight[:10].clone()
    n = len(tok)
    add_special_tokens(tok, model, ["<pause>", "<bot>"])
    add_special_tokens(tok, model, ["<pause>"])  # already there: no change
    assert model.get_input_embeddings().num_embeddings == len(tok) == n + 2
    assert torch.equal(model.get_input_embeddings().weight[:10], before)
    assert tok.convert_tokens_to_ids("<pause>") == n
    assert tok("a<pause>b", add_special_tokens=False)["input_ids"][1] == n
    big = train_tokenizer(CORPUS * 4 + [chr(i) * 3 for i in range(300, 700)], 700)
    with pytest.raises(ModelError, match="do not belong together"):
        add_special_tokens(big, model, [])


def test_presets_are_seeded_and_unknown_models_fail_clearly() -> None:
    tok = train_tokenizer(CORPUS, 300)
    a = build_backbone(ModelConfig(name="gpt2-tiny"), tok, seed=3)
    b = build_backbone(ModelConfig(name="gpt2-tiny"), tok, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ModelError, match="cannot load the model"):
        build_backbone(ModelConfig(name="/nonexistent/model-dir"), tok, seed=0)


def test_compile_transformers_compiles_every_body_once_and_nothing_else() -> None:
    """A method holding two models (a Base and a coprocessor): both bodies compiled in place,
    the LM heads and the container not (they run eager around the compiled body)."""
    tok = train_tokenizer(CORPUS, 300)
    base, coprocessor = (build_backbone(ModelConfig(name=n), tok, seed=0)
                         for n in ("gpt2-tiny", "qwen3-tiny"))
    method = torch.nn.ModuleDict({"backbone": base, "coprocessor": coprocessor})
    keys = set(method.state_dict())
    compile_transformers(method)
    compiled = {name for name, m in method.named_modules() if m._compiled_call_impl is not None}
    assert compiled == {"backbone.transformer", "coprocessor.model"}
    # Every call form of a body gets its graph instead of an eager fallback past 8.
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    assert set(method.state_dict()) == keys
    # Regional compilation: each decoder layer instead of the bodies (2 layers each).
    layers = torch.nn.ModuleDict({"backbone": build_backbone(ModelConfig(name="gpt2-tiny"), tok,
                                                             seed=0)})
    compile_transformers(layers, "layers")
    compiled = {name for name, m in layers.named_modules() if m._compiled_call_impl is not None}
    assert compiled == {"backbone.transformer.h.0", "backbone.transformer.h.1"}
    assert torch._dynamo.config.recompile_limit >= 2 * RECOMPILE_LIMIT


def test_an_unknown_hub_id_fails_at_once_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a preset, not a directory, not cached: with the hub unreachable, no minute of
    # retries, and a near-miss of a preset is named.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = train_tokenizer(CORPUS, 300)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot load the model 'gpt2-tny': it is not a preset, "
                                         r"a local directory or in the Hugging Face cache, and "
                                         r"the hub cannot be reached.*did you mean the preset "
                                         r"gpt2-tiny\?"):
        build_backbone(ModelConfig(name="gpt2-tny"), tok, seed=0)
    assert time.perf_counter() - start < 5


def test_a_model_directory_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    tok, other = train_tokenizer(CORPUS, 280), train_tokenizer([t.upper() for t in CORPUS], 280)
    model = build_backbone(ModelConfig(name="gpt2-tiny"), tok, seed=0)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    other.save_pretrained(tmp_path / "other")
    own = ModelConfig(name=str(tmp_path / "model"), tokenizer=str(tmp_path / "model"))
    check_tokenizer_matches(own, tok)  # its own: accepted
    config = ModelConfig(name=str(tmp_path / "model"), tokenizer=str(tmp_path / "other"))
    assert len(other) == len(tok)  # the same size: the embedding check cannot see it
    with pytest.raises(ModelError, match="is not the tokenizer saved with the model"):
        check_tokenizer_matches(config, other)


def test_head_cross_entropy_of_a_compiled_model_equals_the_eager_loss_hits_and_gradients(
        ) -> None:
    """The LM head's loss runs compiled on a model compile_transformers compiled (the float32
    logits never stored); it computes what the plain head + cross-entropy compute, with the
    ignored rows at zero."""
    tok = train_tokenizer(CORPUS, 300)
    model = build_backbone(ModelConfig(name="gpt2-tiny"), tok, seed=0)
    states = torch.randn(37, model.config.n_embd)
    targets = torch.randint(0, model.config.vocab_size, (37,))
    targets[[3, 20]] = -100

    def run() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x = states.clone().requires_grad_()
        model.zero_grad()
        nll, hits = head_cross_entropy(model, x, targets, -100, hits=True)
        (nll * torch.linspace(0.5, 2, 37)).sum().backward()
        return nll.detach(), hits, x.grad, model.get_output_embeddings().weight.grad.clone()

    logits = model.get_output_embeddings()(states).float()
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    eager = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_transformers(torch.nn.ModuleDict({"backbone": model}))
    compiled = run()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the head's loss
    torch.testing.assert_close(eager[0], expected)
    assert eager[0][[3, 20]].eq(0).all()
    assert torch.equal(eager[1], logits.argmax(-1) == targets)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Without hits asked for, none are computed.
    assert head_cross_entropy(model, states, targets, -100)[1] is None
