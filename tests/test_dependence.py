"""Latent-dependence ablations (`recipes.dependence`): what they put in place of the latents,
that every method's hook feeds what it is given, and that training runs report them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import quick_run

from latentlab.backbones import add_special_tokens, build_backbone, train_tokenizer
from latentlab.methods import METHODS
from latentlab.model_config import ModelConfig
from latentlab.recipes import train
from latentlab.recipes.dependence import ABLATIONS, ablated, derangement, latent_dependence
from latentlab.study.report import build_report
from latentlab.tasks.base import Example

EXAMPLES = [
    Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7"),
    Example("Numbers: 9 2 4 8. Target: 10.", ("9-8=1", "4*2=8", "8+1=9"), "4*2+9-8"),
    Example("Numbers: 1 2 6. Target: 9.", ("1+2=3", "3+6=9"), "1+2+6"),
]
TEXTS = [e.question + "\n" + "\n".join(e.steps) + "\n### " + e.answer for e in EXAMPLES] * 10
# Methods that insert a fixed number of latents, with options that give them some.
WITH_INPUTS: dict[str, dict[str, Any]] = {
    "pause": {"latent_budget": 3}, "soft": {"latent_budget": 3}, "liu": {"latent_budget": 3},
    "h1": {"latent_budget": 3}, "h2": {"latent_budget": 3},
    "h2-kv": {"name": "h2", "latent_budget": 3, "injection": "kv"},
    "coconut": {"max_latent_stage": 2, "thoughts_per_step": 2}, "codi": {"latent_budget": 3}}


def make(key: str) -> Any:
    options = dict(WITH_INPUTS[key])
    name = options.pop("name", key)
    cls = METHODS[name]
    config = cls.config_class(**options)
    tok = train_tokenizer(TEXTS, 300)
    backbone = build_backbone(ModelConfig(name="gpt2-tiny"), tok, seed=0)
    add_special_tokens(tok, backbone, cls.special_tokens(config))
    torch.manual_seed(1)
    method = cls(config, backbone, tok).eval()
    if name == "coconut":
        method.set_stage(2)  # the last stage: 4 thoughts at inference
    return method


def test_the_ablations_replace_the_latents_as_named() -> None:
    inputs = torch.randn(5, 3, 4)
    generator = torch.Generator().manual_seed(0)
    assert not ablated(inputs, "zeros", generator).any()
    mean = ablated(inputs, "mean", generator)
    torch.testing.assert_close(mean, inputs.mean(0, keepdim=True).expand(5, 3, 4))
    shuffled = ablated(inputs, "shuffled", generator)
    # A permutation across the examples, moving every one: each row is another row's.
    sources = [next(j for j in range(5) if torch.equal(shuffled[i], inputs[j]))
               for i in range(5)]
    assert sorted(sources) == list(range(5)) and all(s != i for i, s in enumerate(sources))
    for n in (2, 3, 7):
        perm = derangement(n, torch.Generator().manual_seed(n))
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == torch.arange(n)).any()
    with pytest.raises(ValueError, match="unknown ablation"):
        ablated(inputs, "noise", generator)


@pytest.mark.parametrize("key", list(WITH_INPUTS))
def test_each_method_feeds_the_latent_inputs_it_is_given(key: str) -> None:
    method = make(key)
    own = method.latent_inputs(EXAMPLES)
    assert own.shape[0] == len(EXAMPLES) and method.has_latent_inputs()
    with torch.no_grad():
        plain = method.before_answer(EXAMPLES)
        same = method.before_answer(EXAMPLES, own)
        zeroed = method.before_answer(EXAMPLES, torch.zeros_like(own))
    # Its own latents given back change nothing; zeros change what the answer reads (for
    # pause and soft too: their slot inputs are the pause embedding or the soft vectors).
    torch.testing.assert_close(same.logits, plain.logits)
    assert not torch.allclose(zeroed.logits, plain.logits)
    assert method.generate(EXAMPLES, 4, latent_inputs=own) == method.generate(EXAMPLES, 4)


@pytest.mark.parametrize("mode", ["pause_as_thought", "no_thought"])
def test_coconut_ablation_modes_refuse_replacements(mode: str) -> None:
    method = make("coconut")
    method.config.mode = mode  # the paper's ablations feed no thoughts back
    assert not method.has_latent_inputs()
    with pytest.raises(Exception, match="has no latent inputs"):
        method.generate(EXAMPLES, 2, latent_inputs=torch.zeros(3, 4, 128))


@pytest.mark.parametrize("name", ["cot", "nocot"])
def test_methods_without_latents_refuse_replacements(name: str) -> None:
    cls = METHODS[name]
    config = cls.config_class()
    tok = train_tokenizer(TEXTS, 300)
    method = cls(config, build_backbone(ModelConfig(name="gpt2-tiny"), tok, seed=0), tok)
    assert not method.has_latent_inputs()
    with pytest.raises(Exception, match="has no latent inputs"):
        method.generate(EXAMPLES, 2, latent_inputs=torch.zeros(3, 1, 4))


class Rank:
    """What latent_dependence reads of an Accelerator: this process's place, and a sum over
    processes (here the identity, recorded: each rank's partial counts come back as they are)."""

    def __init__(self, index: int, processes: int) -> None:
        self.process_index, self.num_processes, self.reduced = index, processes, 0

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        self.reduced += 1
        return tensor


class ByCompletion:
    """A task that accepts an answer by the completion's characters, so a tiny random model
    scores some examples right and some wrong, each ablation differently."""

    def score(self, answer: str, example: Example) -> bool:
        return sum(map(ord, answer + example.question)) % 2 == 0


def test_processes_each_generate_their_share_and_the_sum_is_one_process_result() -> None:
    method, task = make("soft"), ByCompletion()
    examples = EXAMPLES * 3  # 9: shares of 5 and 4
    alone = latent_dependence(method, task, examples, 2, 4)
    ranks = [Rank(r, 2) for r in range(2)]
    shares = [latent_dependence(method, task, examples, 2, 4, acc=rank) for rank in ranks]
    assert [rank.reduced for rank in ranks] == [1, 1]
    for kind in ABLATIONS:
        assert shares[0][kind] + shares[1][kind] == pytest.approx(alone[kind])
    assert 0 < alone["zeros"] < 1 or 0 < alone["mean"] < 1  # the task tells examples apart


def test_a_training_run_reports_its_latent_dependence(tmp_path: Path) -> None:
    train(quick_run(tmp_path / "nocot", "method.name=nocot"))
    results = train(quick_run(tmp_path / "soft", "method.name=soft", "method.latent_budget=2",
                              f"model.init_from={tmp_path / 'nocot'}"))
    saved = json.loads((tmp_path / "soft" / "results.json").read_text())
    assert saved["test"]["latent_dependence"] == results["test"]["latent_dependence"]
    assert set(saved["test"]["latent_dependence"]) == set(ABLATIONS)
    assert all(0.0 <= v <= 1.0 for v in saved["test"]["latent_dependence"].values())
    nocot = json.loads((tmp_path / "nocot" / "results.json").read_text())
    assert "latent_dependence" not in nocot["test"]  # nothing to ablate
    report = build_report([tmp_path / "soft"], tmp_path / "report", split="test")
    text = (report.out / "report.md").read_text()
    zeros = saved["test"]["latent_dependence"]["zeros"]
    assert "## Latent dependence" in text and f"| {100 * zeros:.1f} ± 0.0 (1) |" in text
