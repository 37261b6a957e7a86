"""Shared fixtures."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from latentlab.config import RunConfig, load_config
from latentlab.engine.config import TrainConfig
from latentlab.engine.interface import Stage, StepOutput
from latentlab.engine.trainer import WALL_CLOCK_KEYS, Trainer
from latentlab.paths import resolve_path


@pytest.fixture
def shared_data() -> Path:
    """The reference data (`$LATENTLAB_SHARED/data`, by default `../shared/data`)."""
    path = resolve_path("${LATENTLAB_SHARED}/data")
    if not path.is_dir():
        pytest.skip("reference data ../shared/data not found; set LATENTLAB_SHARED")
    return path


def quick_run(out_dir: Path, *overrides: str) -> RunConfig:
    """The quick start's config (configs/countdown_small_cot.yaml) cut to two steps on 64
    examples, scored on 8 test problems, FLOPs not counted: for tests that need the files of
    a finished run. `overrides` come last."""
    return load_config(Path(__file__).parents[1] / "configs" / "countdown_small_cot.yaml", [
        "train.max_time=null", "train.warmup_steps=0", "train.eval_every=2", "train.max_steps=2",
        "task.n_train=64", "task.n_valid=8", "task.n_test=8", "eval.splits=[test]",
        "eval.max_new_tokens=8", "eval.flops_examples=0", f"out_dir={out_dir}", *overrides])


# A tiny Countdown CoT run whose 12 steps cross two epoch boundaries, checkpoint every 2 steps,
# validate every 4 and log every 3 (so checkpoints fall inside a logging window).
RUN_CONFIG = {
    "task": {"name": "countdown", "operands": 3, "max_operand": 9, "min_target": 10,
             "max_target": 30, "n_train": 40, "n_valid": 8, "n_test": 8},
    "method": {"name": "cot"},
    "model": {"name": "gpt2-tiny", "tokenizer_vocab_size": 300},
    "train": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "log_every": 3, "eval_every": 4,
              "eval_samples": 4, "save_every": 2},
    "eval": {"batch_size": 8, "max_new_tokens": 24, "splits": ["test"]},
}


@dataclass(frozen=True)
class FinishedRun:
    config: Path  # RUN_CONFIG as a YAML file
    run_dir: Path  # an uninterrupted run of it: the reference, never to be modified

    def assert_same_as(self, other: Path) -> None:
        """`other` (another run of the same config) reached this run's results: the final
        checkpoint and the best model byte for byte, the metrics but for wall-clock figures."""
        name = (self.run_dir / "checkpoints" / "latest").read_text()
        assert (other / "checkpoints" / "latest").read_text() == name
        for rel in (f"checkpoints/{name}/model.safetensors", f"checkpoints/{name}/optimizer.pt",
                    f"checkpoints/{name}/scheduler.pt", f"checkpoints/{name}/rng-0.pt",
                    "best/model/model.safetensors", "predictions-test.jsonl"):
            assert (self.run_dir / rel).read_bytes() == (other / rel).read_bytes(), rel
        assert metric_rows(self.run_dir) == metric_rows(other)
        ours, theirs = (json.loads((d / "results.json").read_text()) for d in (self.run_dir, other))
        assert {**ours, "run_dir": None} == {**theirs, "run_dir": None}


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its wall-clock figures, which differ between any two runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS} for row in rows]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """RUN_CONFIG trained once per session, without interruption, through the CLI."""
    from latentlab.cli import main

    root = tmp_path_factory.mktemp("finished")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(RUN_CONFIG))
    run_dir = root / "run"
    assert main(["train", str(config), f"out_dir={run_dir}"]) == 0
    return FinishedRun(config, run_dir)


# ------------------------------------------------------------- the engine on a fake clock


class Clock:
    """A fake `time.perf_counter`: a training step costs `step_s` (or `step_s(n)` for the
    n-th step, from 1), a validation `eval_s`."""

    def __init__(self, step_s: float | Callable[[int], float], eval_s: float) -> None:
        self.now, self.step_s, self.eval_s, self.steps = 0.0, step_s, eval_s, 0

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.steps += 1
        self.now += self.step_s(self.steps) if callable(self.step_s) else self.step_s


class Line(nn.Module):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.linear, self.clock = nn.Linear(2, 1), clock

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        self.clock.step()
        return StepOutput(((self.linear(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean())

    def set_stage(self, index: int) -> None:
        pass

    def save_pretrained(self, path: Path) -> None:
        torch.save(self.state_dict(), path / "line.pt")


def engine_run(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
               step_s: float | Callable[[int], float], eval_s: float,
               scores: Callable[[int], dict[str, float]] | None = None,
               **train: Any) -> tuple[Trainer, list[dict[str, Any]]]:
    """The engine alone, training a linear regression (64 examples, batches of 8) on a fake
    clock; validation returns `scores(step)` (default: accuracy 0). Returns the trainer and
    the rows of metrics.jsonl, each with the final step added as `final_step`."""
    from latentlab.recipes.building import make_accelerator

    run_dir.mkdir(exist_ok=True)
    clock = Clock(step_s, eval_s)
    monkeypatch.setattr("latentlab.engine.trainer.time.perf_counter", clock)
    model = Line(clock)

    def evaluate(step: int) -> dict[str, float]:
        clock.now += clock.eval_s
        return scores(step) if scores else {"accuracy": 0.0}

    def data(stage: int, epoch: int) -> list[dict[str, torch.Tensor]]:
        x = torch.randn(64, 2, generator=torch.Generator().manual_seed(epoch))
        return [{"x": x[i], "y": x[i].sum()} for i in range(64)]

    config = TrainConfig(**{"batch_size": 8, "lr": 0.1, "log_every": 1000, "epochs": 1000,
                            **train})
    trainer = Trainer(model, config, run_dir, make_accelerator("no"),
                      lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                      evaluate)
    state = trainer.fit([Stage("train", config.epochs)], data, num_examples=64)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, [{**r, "final_step": state.step} for r in rows]
