"""`model.token_shift`: the layer against a plain causal convolution, its zero start, saving and
loading, Hugging Face's own generation, compilation, and runs of the engine (resumed exactly,
continued by another method, refused by methods whose passes do not keep columns in order).

Every method's cached, padded, packed and multi-pass paths are checked against recomputation
on shifted backbones too: the method tests run on `presets.PRESETS`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import pytest
import torch
from presets import SHIFT, backbone_for
from safetensors.torch import load_file, save_file
from test_training import final_weights, tiny

from latentlab.backbones import (
    build_backbone,
    compile_transformers,
    load_pretrained_dir,
    train_tokenizer,
)
from latentlab.errors import ConfigError, ModelError
from latentlab.methods.coprocessor import H2, H2Config
from latentlab.methods.cot import CoT, CoTConfig
from latentlab.model_config import ModelConfig
from latentlab.recipes import build_method, load_run, train
from latentlab.tasks.base import Example
from latentlab.token_shift import ColumnInputs, TokenShift

TEXTS = ["Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zorpus?\n"
         "Tom is a wumpus.\nEvery wumpus is a yumpus.\n### Tom is a yumpus."] * 20


def test_the_shift_is_a_causal_depthwise_convolution_with_a_residual() -> None:
    torch.manual_seed(0)
    shift = TokenShift(hidden_size=6, width=4, index=0)
    torch.nn.init.normal_(shift.weight)
    hidden = torch.randn(2, 9, 6)
    mixed = shift(hidden, torch.arange(9)[None], None)
    # Independent: torch's convolution, padded on the left; its kernel runs oldest first.
    kernel = shift.weight.flip(0).T[:, None, :]  # [d, 1, w]
    conv = torch.nn.functional.conv1d(hidden.transpose(1, 2), kernel, padding=3, groups=6)
    torch.testing.assert_close(mixed, hidden + conv[..., :9].transpose(1, 2))
    # A sequence starting at column 4 (positions 0.. from there) sees nothing before it.
    later = shift(hidden, (torch.arange(9) - 4).clamp(min=0)[None], None)
    alone = shift(hidden[:, 4:], torch.arange(5)[None], None)
    torch.testing.assert_close(later[:, 4:], alone)
    # Columns 0-5 as two passes over a cache: the second gets the first's last three.
    first = shift(hidden[:, :6], torch.arange(6)[None], None)
    second = shift(hidden[:, 6:], torch.arange(6, 9)[None], hidden[:, 3:6])
    torch.testing.assert_close(torch.cat([first, second], 1), mixed)


def test_column_inputs_follow_the_cache_through_crops_and_gaps() -> None:
    with torch.no_grad():
        columns = ColumnInputs()
        x = torch.arange(10.0).view(1, 10, 1)
        columns.record(0, x[:, :4])  # columns 0-3
        columns.record(4, x[:, 4:5])  # column 4
        assert columns.before(5, 3, x).flatten().tolist() == [2, 3, 4]
        assert columns.before(2, 3, x).flatten().tolist() == [0, 0, 1]  # before column 0: zero
        columns.record(3, x[:, 7:9] * 10)  # the cache was cropped to 3 columns, then grew by two
        assert columns.before(5, 3, x).flatten().tolist() == [2, 70, 80]
        # Columns 5-6 read by a model without a shift (spliced keys and values): zero.
        columns.record(7, x[:, 9:])
        assert columns.before(8, 4, x).flatten().tolist() == [80, 0, 0, 9]
        assert len(columns.pieces) == 3


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
def test_a_new_shift_leaves_the_backbone_unchanged(preset: str) -> None:
    tok = train_tokenizer(TEXTS, 300)
    plain = build_backbone(ModelConfig(name=preset), tok, seed=0).eval()
    shifted = build_backbone(ModelConfig(name=preset, token_shift=4), tok, seed=0).eval()
    names = [n for n, _ in shifted.named_parameters() if ".token_shift." in n]
    assert len(names) == shifted.config.num_hidden_layers
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(shifted(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_saved_and_loaded_with_its_weights_and_no_warning(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, 300)
    model = backbone_for("qwen3-tiny" + SHIFT, tok).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["token_shift"] == 4
    report = logging.getLogger("transformers.modeling_utils")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    report.addHandler(handler)
    try:
        loaded, _ = load_pretrained_dir(tmp_path)
        again = build_backbone(ModelConfig(name=str(tmp_path)), tok, seed=1)
        assert not any("LOAD REPORT" in r for r in records)
        # Any other key the model class does not know is still reported.
        weights = load_file(tmp_path / "model.safetensors")
        save_file({**weights, "model.stray.weight": torch.zeros(2)},
                  tmp_path / "model.safetensors", metadata={"format": "pt"})
        load_pretrained_dir(tmp_path)
        assert any("LOAD REPORT" in r and "stray" in r for r in records)
    finally:
        report.removeHandler(handler)
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    for other in (loaded, again):
        assert other.state_dict().keys() == model.state_dict().keys()
        torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits)

    save_file({k: v for k, v in weights.items() if ".token_shift." not in k},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"token shift of width 4.*lack"):
        load_pretrained_dir(tmp_path)


def test_widths_are_checked() -> None:
    tok = train_tokenizer(TEXTS, 300)
    with pytest.raises(ModelError, match="at least 2 positions"):
        build_backbone(ModelConfig(name="gpt2-tiny", token_shift=1), tok, seed=0)
    model = build_backbone(ModelConfig(name="gpt2-tiny", token_shift=4), tok, seed=0)
    from latentlab.token_shift import add_token_shift

    with pytest.raises(ModelError, match="already has a token shift of width 4"):
        add_token_shift(model, 3)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
def test_hugging_face_generate_with_its_cache_equals_recomputation(preset: str) -> None:
    tok = train_tokenizer(TEXTS, 300)
    model = backbone_for(preset + SHIFT, tok).eval()
    ids = tok("Every wumpus is a", return_tensors="pt")["input_ids"]
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id,
              "eos_token_id": None}
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize(("preset", "scope"), [("gpt2-tiny", "body"), ("qwen3-tiny", "layers")])
def test_compiled_body_matches_eager(preset: str, scope: Literal["body", "layers"]) -> None:
    tok = train_tokenizer(TEXTS, 300)
    method = CoT(CoTConfig(), backbone_for(preset + SHIFT, tok), tok).eval()
    examples = [Example("Is Tom a yumpus or zorpus?", ("Tom is a wumpus.",), "Tom is a yumpus."),
                Example("Every wumpus is a yumpus. Is Tom a yumpus?", (), "yes")]
    batch = method.collate([method.encode(e) for e in examples])

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        method.zero_grad()
        loss = method(batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        return loss.detach(), grads, method.generate(examples, max_new_tokens=6)

    eager = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_transformers(method, scope)
    compiled = run()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert any(".token_shift." in n for n in eager[1])
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert compiled[2] == eager[2]


def test_a_compiled_body_decodes_without_compiling_again_for_every_token() -> None:
    # The cache's record of each layer's inputs grows by one piece per decoded token; compiled
    # code that read it would be compiled again for each length, up to the recompile limit.
    tok = train_tokenizer(TEXTS, 300)
    method = CoT(CoTConfig(), backbone_for("qwen3-tiny" + SHIFT, tok), tok).eval()
    examples = [Example("Is Tom a yumpus or zorpus?", ("Tom is a wumpus.",), "Tom is a yumpus.")]
    eager = method.generate(examples, max_new_tokens=16)
    torch._dynamo.reset()
    compile_transformers(method)
    graphs = torch._dynamo.utils.counters["stats"]
    method.generate(examples, max_new_tokens=4)
    after_short = graphs["unique_graphs"]
    assert method.generate(examples, max_new_tokens=16) == eager
    assert graphs["unique_graphs"] == after_short


def test_engine_trains_resumes_and_continues_a_shifted_model(tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    shift = "model.token_shift=4"
    train(tiny(straight, shift))
    train(tiny(interrupted, shift, "train.stop_after=7"))
    train(tiny(interrupted, shift), resume=True)
    a, b = final_weights(straight), final_weights(interrupted)
    learned = [k for k in a if ".token_shift." in k]
    assert learned and all(a[k].abs().sum() > 0 for k in learned)  # left zero: it learns
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded, _ = load_run(straight)
    state = reloaded.state_dict()
    assert all(torch.equal(a[k], state[k]) for k in learned)

    # Continued by methods whose passes keep the columns in order (the Coprocessor's Base
    # and its copy, the Coprocessor, both shifted); refused by one whose passes do not, and by
    # a config that does not name the Base's shift.
    nocot = build_method(tiny(tmp_path / "nocot", shift, "method.name=nocot",
                              f"model.init_from={straight}"), [], tmp_path / "nocot")
    assert all(torch.equal(a[k], nocot.state_dict()[k]) for k in learned)
    h2 = build_method(tiny(tmp_path / "h2", shift, "method.name=h2",
                           f"model.init_from={straight}"), [], tmp_path / "h2")
    state = h2.state_dict()
    assert all(torch.equal(a[k], state[k]) for k in learned)
    assert all(torch.equal(a[k], state[k.replace("backbone.", "coprocessor.", 1)])
               for k in learned)
    with pytest.raises(ConfigError, match=r"model\.token_shift=4, not the one"):
        build_method(tiny(tmp_path / "plain", "method.name=nocot",
                          f"model.init_from={straight}"), [], tmp_path / "plain")
    with pytest.raises(ConfigError, match="method 'latent_sft' cannot run"):
        build_method(tiny(tmp_path / "sft", shift, "method.name=latent_sft"), [],
                     tmp_path / "sft")


def test_coprocessor_text_pretraining_refuses_a_shifted_base() -> None:
    tok = train_tokenizer(TEXTS, 300)
    method = H2(H2Config(), backbone_for("gpt2-tiny" + SHIFT, tok), tok)
    with pytest.raises(ConfigError, match="text pretraining with a token-shifted Base"):
        method.encode_text(list(range(64)))
