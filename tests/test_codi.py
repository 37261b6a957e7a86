"""CODI: the loss (distillation, student, teacher) against a hand computation, the cached
multi-pass student against full recomputation (loss, logits, gradients), batched generation
against per-example and uncached generation, and an engine run end to end.

References work on one example at a time with the Hugging Face model alone, no cache and no
padding: each thought is computed by re-running the whole prefix before it from scratch, and
nothing of `CODI.encode`, `collate`, `student_states` or `engine.generation` is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from presets import PRESETS, backbone_for
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedModel

from latentlab.backbones import add_special_tokens, train_tokenizer
from latentlab.config import load_config
from latentlab.latents import orthogonality_penalty
from latentlab.methods import METHODS
from latentlab.methods.base import IGNORE, answer_text, steps_text
from latentlab.methods.codi import BOT, CODI, EOT, CODIConfig
from latentlab.recipes import load_run, train
from latentlab.study.analysis import analyze_run
from latentlab.study.report import build_report
from latentlab.tasks.base import Example

# Four question lengths (left padding), 3, 2, 1 and 0 steps; answers whose first token after
# `###` is ' ' (then digits) or a word.
EXAMPLES = [
    Example("Numbers: 9 2 4 8. Target: 10.", ("9-8=1", "4*2=8", "8+1=9"), "4*2+9-8"),
    Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7"),
    Example("Is Tom a wumpus?", ("Tom is a wumpus",), "yes"),
    Example("Tom is a wumpus. Is Tom a wumpus?", (), "yes"),
]
# One question: every <bot> in one column, no left padding (the mask-free path).
SAME_QUESTION = [Example(EXAMPLES[0].question, EXAMPLES[0].steps[:k], "4*2+9-8")
                 for k in (3, 1, 2, 0)]


def make(preset: str = "gpt2-tiny", **options: Any) -> CODI:
    texts = [e.question + "\n" + steps_text(e.steps) + answer_text(e) for e in EXAMPLES]
    tokenizer = train_tokenizer(texts * 10, 300)
    backbone = backbone_for(preset, tokenizer, seed=0)
    config = CODIConfig(**options)
    add_special_tokens(tokenizer, backbone, CODI.special_tokens(config))
    torch.manual_seed(0)  # the projection's initialisation
    return CODI(config, backbone, tokenizer).eval()  # eval: no dropout


def ids(method: CODI, text: str) -> list[int]:
    return method.tokenizer(text, add_special_tokens=False)["input_ids"]


def thought_chain(method: CODI, embeds: Tensor, n: int) -> tuple[Tensor, list[Tensor]]:
    """`embeds` [1, T, d] followed by n thoughts, each proj(last state) of a from-scratch pass
    over everything before it."""
    thoughts = []
    for _ in range(n):
        h = method.backbone(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
        thoughts.append(method.projection(h[:, -1:]))
        embeds = torch.cat([embeds, thoughts[-1]], dim=1)
    return embeds, thoughts


def reference(method: CODI, examples: list[Example]) -> dict[str, Any]:
    """The losses by hand, one example at a time: teacher and student sequences through plain
    full forwards, the distilled states picked at the token before the answer's text."""
    model: PreTrainedModel = method.backbone
    tok, table, n = method.tokenizer, model.get_input_embeddings(), method.config.latent_budget
    bot, eot = tok.convert_tokens_to_ids([BOT, EOT])
    sums = {"teacher": torch.zeros(()), "student": torch.zeros(())}
    counts = {"teacher": 0, "student": 0}
    teacher_states, student_states, thoughts, student_logits = [], [], [], []
    for example in examples:
        prompt = ids(method, example.question + "\n")
        steps = ids(method, steps_text(example.steps))
        answer = [*ids(method, answer_text(example)), tok.eos_token_id]
        # The token before the first one with the answer's text: '###' or the ' ' after it.
        lead = max(k for k in range(len(answer)) if "### ".startswith(tok.decode(answer[:k])))

        teacher = model(input_ids=torch.tensor([prompt + steps + answer]),
                        output_hidden_states=True)
        targets = torch.tensor(steps + answer)
        logits = teacher.logits[0, len(prompt) - 1:-1]
        sums["teacher"] = sums["teacher"] + torch.nn.functional.cross_entropy(
            logits, targets, reduction="sum")
        counts["teacher"] += len(targets)
        position = len(prompt) + len(steps) + lead - 1
        teacher_states.append(torch.stack([h[0, position] for h in teacher.hidden_states[1:]]))

        embeds, chain = thought_chain(method, table(torch.tensor([[*prompt, bot]])), n)
        embeds = torch.cat([embeds, table(torch.tensor([[eot, *answer]]))], dim=1)
        student = model(inputs_embeds=embeds, output_hidden_states=True)
        logits = student.logits[0, -len(answer) - 1:-1]  # from <eot> on
        sums["student"] = sums["student"] + torch.nn.functional.cross_entropy(
            logits, torch.tensor(answer), reduction="sum")
        counts["student"] += len(answer)
        position = len(prompt) + 1 + n + 1 + lead - 1
        student_states.append(torch.stack([h[0, position] for h in student.hidden_states[1:]]))
        thoughts.append(torch.cat(chain, dim=1)[0])
        student_logits.append(logits)

    teacher_h = torch.stack(teacher_states, dim=1).detach()  # [layers, B, d]
    diff = torch.stack(student_states, dim=1) - teacher_h
    if method.config.distill_loss == "l1":
        rho = diff.abs()
    else:
        rho = torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5)
    per_layer = [rho[layer].mean() / teacher_h[layer].std() for layer in range(len(rho))]
    return {"loss_teacher": sums["teacher"] / counts["teacher"],
            "loss_student": sums["student"] / counts["student"],
            "loss_kd": sum(per_layer) / len(per_layer),
            "thoughts": torch.stack(thoughts), "student_logits": student_logits}


def total(method: CODI, ref: dict[str, Any]) -> Tensor:
    cfg = method.config
    loss = (cfg.alpha * ref["loss_student"] + cfg.beta * ref["loss_teacher"]
            + cfg.gamma * ref["loss_kd"])
    return loss + cfg.orthogonality * orthogonality_penalty(ref["thoughts"])


def gradients(method: CODI, loss: Tensor) -> dict[str, Tensor]:
    method.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}


def test_layout_and_the_distilled_tokens() -> None:
    method = make(latent_budget=3)
    tok = method.tokenizer
    for example, distilled in ((EXAMPLES[1], " "), (EXAMPLES[2], "###")):
        f = method.encode(example)
        teacher, student = f["teacher"]["input_ids"], f["student"]["input_ids"]
        assert tok.decode(teacher) == (example.question + "\n" + steps_text(example.steps)
                                       + answer_text(example) + tok.eos_token)
        head = ids(method, example.question + "\n")
        assert student[:len(head) + 1] == [*head, tok.convert_tokens_to_ids(BOT)]
        assert student[len(head) + 4] == tok.convert_tokens_to_ids(EOT)  # after 3 thoughts
        assert f["bot"] == len(head)
        # Labels: the teacher's steps and answer; the student's answer after <eot> only.
        assert f["teacher"]["labels"] == [IGNORE] * len(head) + teacher[len(head):]
        assert f["student"]["labels"] == [IGNORE] * (len(head) + 5) + student[len(head) + 5:]
        for role in ("teacher", "student"):
            sequence, index = f[role]["input_ids"], f[role]["distill"]
            assert tok.decode(sequence[index]) == distilled
            assert tok.decode(sequence[index + 1:]).lstrip().startswith(example.answer)


@pytest.mark.parametrize(("preset", "options"), [
    ("gpt2-tiny", {}),  # the defaults: projection, smooth L1, weights 1
    ("qwen3-tiny", {"distill_loss": "l1", "alpha": 0.5, "beta": 2.0, "gamma": 3.0,
                    "orthogonality": 0.7}),
    ("gpt2-tiny", {"projection": False, "distill_loss": "l1", "gamma": 20.0}),
])
def test_losses_match_a_hand_computation(preset: str, options: dict[str, Any]) -> None:
    method = make(preset, latent_budget=3, **options)
    batch = method.collate([method.encode(e) for e in EXAMPLES])
    assert batch["left_padded"]
    with torch.no_grad():
        out = method(batch)
        ref = reference(method, EXAMPLES)
    for name in ("loss_student", "loss_teacher", "loss_kd"):
        torch.testing.assert_close(out.metrics[name], ref[name], rtol=1e-4, atol=1e-6,
                                   msg=name)
    assert out.metrics["loss_kd"] > 0  # the roles' states differ before any training
    torch.testing.assert_close(out.loss, total(method, ref), rtol=1e-4, atol=1e-6)
    assert ("orthogonality" in out.metrics) == bool(method.config.orthogonality)
    # The per-part figures: the student's answer, the teacher's steps and answer.
    assert {"loss_answer", "acc_answer", "teacher_loss_steps",
            "teacher_loss_answer"} <= out.metrics.keys()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("examples", [EXAMPLES, SAME_QUESTION], ids=["left-padded", "aligned"])
def test_cached_student_equals_full_recomputation(preset: str,
                                                  examples: list[Example]) -> None:
    method = make(preset, latent_budget=3, orthogonality=0.5)
    batch = method.collate([method.encode(e) for e in examples])
    assert batch["left_padded"] is (examples is EXAMPLES)
    hidden, _, thoughts = method.student_states(batch)
    loss = method(batch).loss
    ref = reference(method, examples)
    torch.testing.assert_close(thoughts, ref["thoughts"], rtol=1e-4, atol=1e-5)
    head = method.backbone.get_output_embeddings()
    for row, expected in enumerate(ref["student_logits"]):
        labelled = batch["student"]["labels"][row, 1:] != IGNORE
        torch.testing.assert_close(head(hidden[row, :-1][labelled]), expected,
                                   rtol=1e-4, atol=1e-4)
    ref_loss = total(method, ref)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # Gradients reach the prefix through the cache and through the chain of projections.
    grads, ref_grads = gradients(method, loss), gradients(method, ref_loss)
    assert grads.keys() == ref_grads.keys()
    assert any(k.startswith("projection.") for k in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_generation_equals_per_example_and_uncached(preset: str) -> None:
    method = make(preset, latent_budget=3)
    model, tok = method.backbone, method.tokenizer
    table = model.get_input_embeddings()
    completions = method.generate(EXAMPLES, max_new_tokens=8)
    assert completions == [method.generate([e], max_new_tokens=8)[0] for e in EXAMPLES]
    latents = method.latents(EXAMPLES)
    assert latents.shape == (len(EXAMPLES), 3, model.config.hidden_size)
    for example, completion, thoughts in zip(EXAMPLES, completions, latents, strict=True):
        prompt = [*ids(method, example.question + "\n"), tok.convert_tokens_to_ids(BOT)]
        tokens: list[int] = []
        with torch.no_grad():
            embeds, chain = thought_chain(method, table(torch.tensor([prompt])), 3)
            next_id = tok.convert_tokens_to_ids(EOT)
            for _ in range(8):
                embeds = torch.cat([embeds, table(torch.tensor([[next_id]]))], dim=1)
                next_id = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
                if next_id == tok.eos_token_id:
                    break
                tokens.append(next_id)
        assert completion == tok.decode(tokens)
        torch.testing.assert_close(thoughts, torch.cat(chain, dim=1)[0], rtol=1e-4, atol=1e-5)


TINY = {
    "task": {"name": "countdown", "operands": 3, "max_operand": 9, "min_target": 10,
             "max_target": 30, "n_train": 40, "n_valid": 8, "n_test": 8},
    "method": {"name": "codi", "latent_budget": 2},
    "model": {"name": "gpt2-tiny", "tokenizer_vocab_size": 300},
    "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "log_every": 1, "eval_every": 3,
              "eval_samples": 4},
    "eval": {"batch_size": 8, "max_new_tokens": 16, "splits": ["test"]},
}


def test_engine_trains_saves_and_reloads_codi(tmp_path: Path) -> None:
    results = train(load_config(base=TINY, overrides=[f"out_dir={tmp_path}"]))
    assert json.loads((tmp_path / "results.json").read_text())["test"] == results["test"]
    assert results["method"] == "codi" and 0.0 <= results["test"]["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 6
    assert all({"loss_student", "loss_teacher", "loss_kd"} <= r.keys() for r in logged)
    # The projection is the method's own: saved beside the backbone, loaded back with it.
    saved = load_file(tmp_path / "best" / "method.safetensors")
    assert saved and all(k.startswith("projection.") for k in saved)
    method, config = load_run(tmp_path)
    assert isinstance(method, CODI) and METHODS[config.method.name] is CODI
    for key, value in saved.items():
        assert torch.equal(method.state_dict()[key], value), key
    # The study tooling takes it through the contract alone: N_L in results.json, the
    # analyses of its thoughts, a report.
    assert results["latent_budget"] == config.method.latent_budget
    summary = analyze_run(tmp_path, split="test", n=4)
    assert summary["method"] == "codi" and summary["latent_budget"] == results["latent_budget"]
    report = build_report([tmp_path], tmp_path / "report", split="test")
    assert f"| codi N_L={results['latent_budget']} |" in (report.out / "report.md").read_text()


@pytest.mark.parametrize("name", ["countdown_codi", "prosqa_codi"])
def test_configs_continue_from_the_cot_runs(name: str) -> None:
    config = load_config(f"configs/{name}.yaml")
    task = name.split("_")[0]
    cot = load_config(f"configs/{task}_cot.yaml")
    assert config.method.name == "codi" and config.method.latent_budget == 6
    assert config.model.init_from == str(cot.run_dir())
    assert config.model.model_dump(exclude={"init_from"}) == \
        cot.model.model_dump(exclude={"init_from"})
