"""The FLOPs counter (`recipes.compute`) against hand counts from the architecture: a GPT-2
training forward and generation (CoT), and a Coprocessor training step (Liu)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import quick_run

from latentlab.backbones import add_special_tokens, build_backbone, train_tokenizer
from latentlab.engine.generation import greedy_decode, left_pad, prefill
from latentlab.methods.base import IGNORE, LABEL_BUCKET
from latentlab.methods.coprocessor import Liu, LiuConfig
from latentlab.methods.cot import CoT, CoTConfig
from latentlab.model_config import ModelConfig
from latentlab.recipes import train
from latentlab.recipes.compute import flops_per_example
from latentlab.study.report import build_report
from latentlab.tasks.base import Example

EXAMPLE = Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7")
TEXT = EXAMPLE.question + "\n" + "\n".join(EXAMPLE.steps) + "\n### " + EXAMPLE.answer


def body(tokens: int, keys: int, d: int, layers: int) -> int:
    """A GPT-2 block stack on `tokens` new positions over `keys` positions: the four linear
    maps (3d + d + 4d + 4d outputs of d inputs: 24 d^2 per token, 2 FLOPs a multiply-add) and
    attention's two products (QK^T and AV: 4 d per query and key)."""
    return layers * (24 * tokens * d * d + 4 * tokens * keys * d)


def head(rows: int, d: int, vocab: int) -> int:
    return 2 * rows * d * vocab


def bucket(n: int) -> int:
    return -(-n // LABEL_BUCKET) * LABEL_BUCKET


def setup(cls, config):  # type: ignore[no-untyped-def]
    tok = train_tokenizer([TEXT] * 20, 300)
    backbone = build_backbone(ModelConfig(name="gpt2-tiny"), tok, seed=0)
    add_special_tokens(tok, backbone, cls.special_tokens(config))
    method = cls(config, backbone, tok).eval()
    cfg = backbone.config
    return method, cfg.n_embd, cfg.n_layer, backbone.get_output_embeddings().weight.shape[0]


def test_gpt2_training_forward_and_generation_match_a_hand_count() -> None:
    method, d, layers, vocab = setup(CoT, CoTConfig())
    features = method.encode(EXAMPLE)
    t = len(features["input_ids"])
    labelled = sum(label != IGNORE for label in features["labels"][1:])
    # Generation: the prompt, then one cached token per step; every pass reads the LM head at
    # its last position. The step count comes from an independent greedy decode.
    p = len(method.prompt_ids(EXAMPLE))
    with torch.no_grad():
        ids, mask = left_pad([method.prompt_ids(EXAMPLE)], method.tokenizer.pad_token_id)
        tokens = greedy_decode(method.backbone, prefill(method.backbone, mask, input_ids=ids), 5,
                               method.tokenizer.eos_token_id, method.tokenizer.pad_token_id)
    steps = tokens.shape[1] - 1  # the last token is chosen without another pass
    inference = body(p, p, d, layers) + head(1, d, vocab) + sum(
        body(1, p + i, d, layers) + head(1, d, vocab) for i in range(1, steps + 1))

    counted = flops_per_example(method, [EXAMPLE], [EXAMPLE], max_new_tokens=5)
    # Training: one pass over the sequence; the LM head on the labelled positions only, their
    # count padded to a bucket (few shapes for CUDA graphs).
    assert counted["train_forward"] == body(t, t, d, layers) + head(bucket(labelled), d, vocab)
    assert counted["inference"] == inference
    assert counted["examples"] == 1


def test_a_coprocessor_step_matches_a_hand_count() -> None:
    n = 3
    method, d, layers, vocab = setup(Liu, LiuConfig(latent_budget=n))
    features = method.encode(EXAMPLE)
    p, u = len(features["prompt_ids"]), len(features["target_ids"])
    expected = (
        body(p, p, d, layers) + head(1, d, vocab)  # the frozen Base reads the prompt
        + body(n, p + n, d, layers) + head(1, d, vocab)  # the Coprocessor's N_L soft tokens
        # The Base reads Z then the target over its own prompt keys (the Coprocessor's are
        # dropped for embedding injection); the loss reads the LM head at the labelled rows.
        + body(n + u, p + n + u, d, layers) + head(1, d, vocab)
        + head(bucket(u), d, vocab))
    assert flops_per_example(method, [EXAMPLE], [EXAMPLE], 2)["train_forward"] == expected


def test_results_report_the_flops_of_the_best_model(tmp_path: Path) -> None:
    config = quick_run(tmp_path, "eval.flops_examples=2")
    results = train(config)
    flops = json.loads((tmp_path / "results.json").read_text())["flops_per_example"]
    assert flops == results["flops_per_example"]
    assert flops["examples"] == 2 and flops["train_forward"] > 0 and flops["inference"] > 0
    report = build_report([tmp_path], tmp_path / "report", split="test")
    assert f"| {flops['train_forward'] * 1e-9:.3f} ± 0.000 (1) |" in (
        report.out / "report.md").read_text()
