"""End-to-end training on CPU: loss falls, resume is exact, the CLI works as documented."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from conftest import metric_rows
from safetensors.torch import load_file

from latentlab.cli import main
from latentlab.config import load_config
from latentlab.methods import METHODS
from latentlab.recipes import train
from latentlab.tasks import build_task

TINY = {
    "task": {"name": "countdown", "operands": 3, "max_operand": 9, "min_target": 10,
             "max_target": 30, "n_train": 40, "n_valid": 8, "n_test": 8},
    "method": {"name": "cot"},
    "model": {"name": "gpt2-tiny", "tokenizer_vocab_size": 300},
    "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "log_every": 1,
              "eval_every": 6, "eval_samples": 4},
    "eval": {"batch_size": 8, "max_new_tokens": 24, "splits": ["test"]},
}


def tiny(tmp_path: Path, *overrides: str):
    return load_config(base=TINY, overrides=[f"out_dir={tmp_path}", *overrides])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


@pytest.mark.slow
def test_loss_falls_on_a_tiny_run(tmp_path: Path) -> None:
    train(tiny(tmp_path, "train.max_steps=60", "train.eval_every=60", "task.n_train=200"))
    losses = [r["loss"] for r in metric_rows(tmp_path) if "loss" in r]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize("method", ["cot", "nocot"])
def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path: Path, method: str) -> None:
    # 40 examples / batch 8 = 5 steps per epoch: the interruption (step 7) is mid-epoch and
    # the run crosses two epoch boundaries; GPT-2's dropout makes the RNG state matter.
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny(straight, f"method.name={method}"))
    train(tiny(interrupted, f"method.name={method}", "train.stop_after=7"))
    assert json.loads((interrupted / "checkpoints" / "step-0000007" / "state.json")
                      .read_text())["step"] == 7
    train(tiny(interrupted, f"method.name={method}"), resume=True)
    a, b = final_weights(straight), final_weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(straight) == metric_rows(interrupted)
    assert (json.loads((straight / "results.json").read_text())["test"]
            == json.loads((interrupted / "results.json").read_text())["test"])


def test_cli_train_then_eval_prints_json(tmp_path: Path, capsys, monkeypatch) -> None:
    config = tmp_path / "tiny.yaml"
    import yaml
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(config), f"out_dir={run}", "train.max_steps=4"]) == 0
    capsys.readouterr()
    for name in ("config.yaml", "metrics.jsonl", "results.json", "environment.json",
                 "predictions-test.jsonl", "best/model/model.safetensors",
                 "best/model/tokenizer.json"):
        assert (run / name).is_file(), name
    assert main(["eval", str(run), "--split", "valid"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["task"] == "countdown" and last["method"] == "cot" and last["split"] == "valid"
    assert last["n"] == 8 and 0.0 <= last["accuracy"] <= 1.0
    # An existing run is never overwritten by accident.
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["train", str(config), f"out_dir={run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_init_from_starts_a_new_method_from_an_earlier_runs_best_model(tmp_path: Path) -> None:
    from latentlab.recipes import build_method, load_run

    base_dir = tmp_path / "base"
    train(tiny(base_dir, "train.max_steps=3"))
    config = tiny(tmp_path / "next", "method.name=nocot", f"model.init_from={base_dir}")
    method = build_method(config, [], tmp_path / "next")
    base, _ = load_run(base_dir)
    start = method.backbone.state_dict()
    assert start.keys() == base.backbone.state_dict().keys()
    assert all(torch.equal(v, base.backbone.state_dict()[k]) for k, v in start.items())
    assert method.tokenizer.get_vocab() == base.tokenizer.get_vocab()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_saves_reloads_and_generates(tmp_path: Path, method: str) -> None:
    from latentlab.recipes import load_run

    results = train(tiny(tmp_path, f"method.name={method}", "train.max_steps=2",
                         "train.eval_every=2"))
    assert results["method"] == method and results["test"]["n"] == 8
    reloaded, _ = load_run(tmp_path)
    # best/ was exported at step 2, the last step: it must hold the trained weights, the
    # method's own parameters (soft tokens, a coprocessor, ...) included.
    trained = final_weights(tmp_path)
    state = reloaded.state_dict()
    assert trained and all(torch.equal(v, state[k]) for k, v in trained.items())
    assert len(reloaded.generate([reloaded_example()], 4)) == 1


def reloaded_example():
    from latentlab.tasks.base import Example

    return Example("Numbers: 2 3 4. Target: 20.", ("2+3=5", "5*4=20"), "(2+3)*4")


def test_resume_is_exact_for_a_run_started_from_another(tmp_path: Path) -> None:
    # from_pretrained returns modules in eval mode; training must still use dropout from the
    # first step, or the interrupted and the straight run draw different random numbers.
    base = tmp_path / "base"
    train(tiny(base, "train.max_steps=3"))
    runs = {}
    for name, stop in (("straight", None), ("interrupted", 2)):
        overrides = ["method.name=soft", f"model.init_from={base}", "train.max_steps=5",
                     "train.eval_every=5"]
        if stop:
            result = train(tiny(tmp_path / name, *overrides, f"train.stop_after={stop}"))
            assert result["stopped_at_step"] == stop
            assert not (tmp_path / name / "results.json").exists()
        runs[name] = train(tiny(tmp_path / name, *overrides), resume=stop is not None)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["straight"]["test"] == runs["interrupted"]["test"]


@pytest.mark.parametrize("option,device,cuda_graphs,method,expected", [
    ("auto", "cuda", False, "cot", True),
    ("auto", "cuda", False, "pause", True),
    ("auto", "cuda", False, "coconut", False),  # a graph per pass form: minutes of compiling
    ("auto", "cuda", True, "cot", False),  # CUDA graphs record the eager step
    ("auto", "cpu", False, "cot", False),
    ("true", "cpu", False, "coconut", True),
    ("false", "cuda", False, "cot", False),
])
def test_model_compile_auto_compiles_on_cuda_the_methods_it_pays_for(
        tmp_path: Path, option: str, device: str, cuda_graphs: bool, method: str,
        expected: bool) -> None:
    from latentlab.recipes.building import compiles, method_class

    config = tiny(tmp_path, f"model.compile={option}", f"method.name={method}",
                  f"train.cuda_graphs={str(cuda_graphs).lower()}")
    assert compiles(config, method_class(config), device) is expected


@pytest.mark.parametrize("method", sorted(name for name, cls in METHODS.items()
                                          if cls.compile_pays))
def test_methods_compiled_by_default_give_the_eager_loss_and_gradients(tmp_path: Path,
                                                                       method: str) -> None:
    """What `model.compile: auto` compiles on CUDA computes what the eager step computes
    (checked on CPU, where the compiled graphs run the same decompositions)."""
    from latentlab.backbones import compile_transformers
    from latentlab.methods.base import answer_text, prompt_text, steps_text
    from latentlab.recipes.building import build_method

    config = tiny(tmp_path, f"method.name={method}")
    task = build_task(config.task)
    examples = task.load("train")
    model = build_method(config, (prompt_text(e) + steps_text(e.steps) + answer_text(e)
                                  for e in examples), tmp_path).eval()  # no dropout
    batch = model.collate([model.encode(e) for e in examples[:4]])

    def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    eager_loss, eager_grads = loss_and_gradients()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_transformers(model)
    loss, grads = loss_and_gradients()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled code ran
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_profile_records_its_window_of_steps_and_leaves_training_unchanged(
        tmp_path: Path) -> None:
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    train(tiny(plain, "train.max_steps=6", "train.eval_every=6"))
    train(tiny(profiled, "train.max_steps=6", "train.eval_every=6", "train.profile=[3,2]"))
    table = (profiled / "profile" / "steps-3-4.txt").read_text()
    optimizer_row = next(line for line in table.splitlines() if "Optimizer.step" in line)
    assert optimizer_row.split()[-1] == "2"  # calls: steps 3 and 4, no others
    assert "aten::mm" in table  # the model's own operators
    trace = json.loads(gzip.decompress(
        (profiled / "profile" / "steps-3-4.trace.json.gz").read_bytes()))
    assert sum(e.get("name") == "Optimizer.step#AdamW.step" for e in trace["traceEvents"]) == 2
    a, b = final_weights(plain), final_weights(profiled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r.get("loss") for r in metric_rows(run)] for run in (plain, profiled)]
    assert losses[0] == losses[1]


def test_a_run_ending_inside_its_profile_window_writes_the_steps_it_made(
        tmp_path: Path) -> None:
    train(tiny(tmp_path, "train.max_steps=4", "train.eval_every=4", "train.profile=[3,5]"))
    table = (tmp_path / "profile" / "steps-3-4.txt").read_text()
    optimizer_row = next(line for line in table.splitlines() if "Optimizer.step" in line)
    assert optimizer_row.split()[-1] == "2"


def test_validation_and_final_scores_run_a_compiled_model_eagerly(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Compiled code serves the training step; generation, with its own call forms (a prefill
    per length, a decode over each layer's cache), would compile them anew."""
    from torch._dynamo.utils import counters

    import latentlab.recipes.reasoning as reasoning
    compiled_during: list[int] = []
    evaluate = reasoning.evaluate

    def counting(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        result = evaluate(*args, **kwargs)
        compiled_during.append(counters["stats"]["unique_graphs"] - before)
        return result

    monkeypatch.setattr(reasoning, "evaluate", counting)
    train(tiny(tmp_path, "model.compile=true", "model.compile_scope=layers",
               "train.max_steps=2", "train.eval_every=2"))
    assert counters["stats"]["unique_graphs"] > 0  # the training step was compiled
    # Neither the validation at step 2 nor the final scoring of the reloaded best model
    # compiled anything.
    assert compiled_during == [0, 0]
