"""Numerical faults: a NaN/Inf loss stops the run with its last checkpoint and best model
intact, or (train.on_nonfinite=skip) skips the step; a run stopped by one continues with skip,
exactly as a run that skipped from the start."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
from conftest import FinishedRun, metric_rows

from latentlab.cli import main
from latentlab.engine.checkpoint import CheckpointManager
from latentlab.engine.interface import StepOutput
from latentlab.methods.cot import CoT
from latentlab.run import load_run


def poison(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    """Make the training loss NaN at the `at_call`-th forward pass from now on (one per
    optimizer step: the config has no gradient accumulation, and evaluation only generates)."""
    calls = itertools.count(1)
    forward = CoT.forward

    def poisoned(self: CoT, batch: dict) -> StepOutput:
        out = forward(self, batch)
        return StepOutput(out.loss * math.nan, out.metrics) if next(calls) == at_call else out

    monkeypatch.setattr(CoT, "forward", poisoned)


def test_nan_stops_the_run_then_resume_with_skip_equals_a_run_that_skipped(
        finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = str(finished_run.config)
    stopped, skipped = tmp_path / "stopped", tmp_path / "skipped"

    poison(monkeypatch, at_call=7)
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

    poison(monkeypatch, at_call=1)  # the first step of the resumed run: step 7 again
    assert main(["train", config, f"out_dir={stopped}", "train.on_nonfinite=skip",
                 "--resume"]) == 0
    poison(monkeypatch, at_call=7)
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
