"""Numerical faults: a NaN/Inf loss stops the run with its last checkpoint and best model
intact, or (train.on_nonfinite=skip) skips the step; a run stopped by one continues with skip,
exactly as a run that skipped from the start."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import FinishedRun, metric_rows
from torch import Tensor

from latentlab.cli import main
from latentlab.engine.checkpoint import CheckpointManager
from latentlab.engine.interface import StepOutput
from latentlab.methods.cot import CoT
from latentlab.recipes import load_run, training


class InfGradient(torch.autograd.Function):
    """Identity forward, Inf backward: a finite loss whose gradient overflows, as in fp16."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * math.inf


def poison(monkeypatch: pytest.MonkeyPatch, *at_calls: int, gradient_only: bool = False) -> None:
    """Make the training loss NaN (or, `gradient_only`, its gradient Inf) at the given forward
    passes in training mode from now on (one per optimizer step: the config has no gradient
    accumulation)."""
    calls = itertools.count(1)
    forward = CoT.forward

    def poisoned(self: CoT, batch: dict) -> StepOutput:
        out = forward(self, batch)
        if not self.training:  # the validation loss
            return out
        if next(calls) not in at_calls:
            return out
        loss = InfGradient.apply(out.loss) if gradient_only else out.loss * math.nan
        return StepOutput(loss, out.metrics)

    monkeypatch.setattr(CoT, "forward", poisoned)


@pytest.fixture
def emulate_fp16_scaler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Accelerate makes no loss scaler on a CPU; calling the function this gives makes later
    runs get the GPU's fp16 mode: a GradScaler (scale 1024, halved on overflow) that
    `clip_grad_norm_` unscales and `step` consults. Accelerate's process-wide state is reset
    around it, so that runs before and after keep their own precision."""
    def with_scaler(mixed_precision: str, *args: Any, **kwargs: Any) -> Accelerator:
        AcceleratorState._reset_state()
        # What accelerate makes of fp16 on a CPU (latentlab itself refuses it there).
        acc = Accelerator(mixed_precision="fp16")
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=1024.0), True
        return acc

    yield lambda: monkeypatch.setattr(training, "make_accelerator", with_scaler)
    AcceleratorState._reset_state()


def test_nan_stops_the_run_then_resume_with_skip_equals_a_run_that_skipped(
        finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = str(finished_run.config)
    stopped, skipped = tmp_path / "stopped", tmp_path / "skipped"

    poison(monkeypatch, 7)
    assert main(["train", config, f"out_dir={stopped}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^latentlab: error: step 7: the loss or the gradient is not finite \(loss "
                     r"nan, gradient norm nan\); training stopped and wrote nothing more: "
                     r"checkpoints/step-0000006 is the last checkpoint\. Fix: resume with "
                     r"train\.on_nonfinite=skip", err, re.M), err
    latest = CheckpointManager(stopped).latest()
    assert latest == stopped / "checkpoints" / "step-0000006"
    assert max(r["step"] for r in metric_rows(stopped)) == 6
    best, _ = load_run(stopped)  # the best model (step 4's) is complete and finite
    assert all(p.isfinite().all() for p in best.parameters())

    poison(monkeypatch, 1)  # the first step of the resumed run: step 7 again
    assert main(["train", config, f"out_dir={stopped}", "train.on_nonfinite=skip",
                 "--resume"]) == 0
    poison(monkeypatch, 7)
    assert main(["train", config, f"out_dir={skipped}", "train.on_nonfinite=skip"]) == 0
    rows = metric_rows(skipped)
    assert {"step": 7, "stage": 0, "skipped": "nonfinite"} in rows
    assert rows == metric_rows(stopped)
    name = (skipped / "checkpoints" / "latest").read_text()
    assert name == "step-0000012"
    assert ((stopped / "checkpoints" / name / "model.safetensors").read_bytes()
            == (skipped / "checkpoints" / name / "model.safetensors").read_bytes())


def test_a_diverging_learning_rate_stops_with_a_clear_message(
        finished_run: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No injected fault: weights of size ~1e30 overflow the next forward pass.
    assert main(["train", str(finished_run.config), f"out_dir={tmp_path}", "train.lr=1e30"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^latentlab: error: step 2: the loss or the gradient is not finite .*"
                     r"there is no checkpoint yet\. Fix: ", err, re.M), err
    assert CheckpointManager(tmp_path).latest() is None


def test_fp16_overflow_skips_the_update_lowers_the_scale_and_resumes_exactly(
        finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        emulate_fp16_scaler: Callable[[], None]) -> None:
    """Under fp16 an Inf gradient with a finite loss is the loss scaler's overflow: the step
    makes no update, the scale halves, the run goes on (train.on_nonfinite=stop does not
    apply); the scaler's state is checkpointed, so a resumed run equals an uninterrupted one.
    Without a scaler the same gradient stops the run."""
    config = str(finished_run.config)
    poison(monkeypatch, 3, gradient_only=True)
    assert main(["train", config, f"out_dir={tmp_path / 'bf16'}"]) == 2

    emulate_fp16_scaler()
    whole, split = tmp_path / "whole", tmp_path / "split"
    poison(monkeypatch, 3, 4, gradient_only=True)
    assert main(["train", config, f"out_dir={whole}"]) == 0
    rows = metric_rows(whole)
    assert {"step": 3, "stage": 0, "skipped": "overflow", "loss_scale": 512.0} in rows
    assert {"step": 4, "stage": 0, "skipped": "overflow", "loss_scale": 256.0} in rows
    name = (whole / "checkpoints" / "latest").read_text()
    assert name == "step-0000012"
    assert torch.load(whole / "checkpoints" / name / "scaler.pt")["scale"] == 256.0

    poison(monkeypatch, 3, 4, gradient_only=True)
    assert main(["train", config, f"out_dir={split}", "train.stop_after=5"]) == 0
    poison(monkeypatch)  # steps 6-12: no overflow
    assert main(["train", config, f"out_dir={split}", "--resume"]) == 0
    assert metric_rows(split) == rows
    env = json.loads((split / "environment.json").read_text())  # one entry per invocation
    assert [e["started"] <= env["started"] for e in env["earlier"]] == [True]
    assert "earlier" not in env["earlier"][0]
    for file in ("model.safetensors", "optimizer.pt", "scaler.pt"):
        assert ((whole / "checkpoints" / name / file).read_bytes()
                == (split / "checkpoints" / name / file).read_bytes()), file


def test_too_many_skipped_steps_in_a_row_stop_the_run(
        finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    poison(monkeypatch, 5, 6, 7)
    assert main(["train", str(finished_run.config), f"out_dir={tmp_path}",
                 "train.on_nonfinite=skip", "train.max_skipped_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^latentlab: error: step 7: 3 steps in a row made no update .*"
                     r"checkpoints/step-0000006 is the last checkpoint\. Fix: ", err, re.M), err
    assert [r["step"] for r in metric_rows(tmp_path) if "skipped" in r] == [5, 6, 7]


def test_a_run_that_skipped_most_of_its_steps_is_not_scored(
        finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The NaN error's own advice, followed: steps 3-10 of 12 skipped, none in a row too many.
    poison(monkeypatch, *range(3, 11))
    assert main(["train", str(finished_run.config), f"out_dir={tmp_path}",
                 "train.on_nonfinite=skip"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^latentlab: error: 8 of the run's 12 steps were skipped .*more than "
                     r"train\.max_skipped_share=0\.5: the model was mostly not trained, and is "
                     r"not scored\. Fix: train again", err, re.M), err
    assert not (tmp_path / "results.json").exists()


def test_a_few_skipped_steps_are_reported_with_the_results(
        finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    poison(monkeypatch, 3, 9)
    assert main(["train", str(finished_run.config), f"out_dir={tmp_path}",
                 "train.on_nonfinite=skip"]) == 0
    assert "warning: 2 of 12 steps were skipped" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["skipped_steps"] == 2 and results["steps"] == 12
