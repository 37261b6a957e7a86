"""What protects a run directory and its results: `--resume` that finds no run, one command per
run directory, checkpoints by time with the previous one kept, ties in best-model selection,
skipped steps, the files a run records, trackers and the progress line in a log file."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import RUN_CONFIG, FinishedRun, Line, engine_run

from latentlab.cli import main
from latentlab.engine.checkpoint import BEST_FILE, FILE_MODE, LOCK_FILE, run_lock
from latentlab.engine.interface import StepOutput
from latentlab.errors import RunError
from latentlab.recipes import RunDir
from latentlab.tasks import CountdownConfig, CountdownTask


def test_resume_without_a_run_says_so_and_trains_nothing(
        finished_run: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "other"
    assert main(["train", str(finished_run.config), f"out_dir={run_dir}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^latentlab: error: --resume found no run to continue in {run_dir} .*"
                     r"Fix: repeat the overrides of the run", err, re.M), err
    assert not run_dir.exists()


def test_a_second_command_into_a_run_directory_in_use_is_refused(
        finished_run: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    with run_lock(run_dir):  # what a training command holds while it runs
        assert main(["train", str(finished_run.config), f"out_dir={run_dir}"]) == 2
        with pytest.raises(RunError, match="in use by latentlab process"), run_lock(run_dir):
            pass
    err = capsys.readouterr().err
    assert re.search(rf"^latentlab: error: run directory {run_dir} is in use by latentlab "
                     rf"process {os.getpid()}\. Fix: wait for that command", err, re.M), err
    assert not run_dir.exists()  # released: the lock file and the empty directory are gone


def test_checkpoints_by_time_keep_the_previous_one(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.5 s a step, a checkpoint every 3 s of training: steps 6, 12, ..., 36, and the last
    # (40); no validation or step count asks for one before the end.
    engine_run(tmp_path, monkeypatch, step_s=0.5, eval_s=0.0, max_steps=40, eval_every=1000,
               save_every=1000, save_every_minutes=0.05)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-0000036", "step-0000040"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000040"


def test_tied_accuracy_goes_to_the_lower_validation_loss(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    losses = {8: 2.0, 16: 1.5, 24: 1.7, 32: 1.5}  # a validation per epoch of 8 steps

    def scores(step: int) -> dict[str, float]:
        return {"accuracy": 0.0, "teacher_forced_loss": losses[step]}

    engine_run(tmp_path, monkeypatch, step_s=0.1, eval_s=0.0, max_steps=32,
               scores=scores)
    assert RunDir(tmp_path).best_step() == 16  # not the first tie (8), not an equal later one (32)
    assert json.loads((tmp_path / "best" / BEST_FILE).read_text())["valid"] == scores(16)


def test_results_record_the_scored_step_and_the_run_records_its_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    task = CountdownTask(CountdownConfig(**RUN_CONFIG["task"]))
    task.write(task.generate("test", 8, 1), shared / "test.jsonl")
    monkeypatch.setenv("LATENTLAB_SHARED", str(shared))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**RUN_CONFIG, "task": {
        **RUN_CONFIG["task"], "test": "${LATENTLAB_SHARED}/test.jsonl"}}))
    run_dir = tmp_path / "run"
    assert main(["train", str(config), f"out_dir={run_dir}"]) == 0

    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_step"] == RunDir(run_dir).best_step() in (4, 8, 12)
    assert results["steps"] == 12 and results["skipped_steps"] == 0
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["latentlab_shared"] == str(shared)
    assert env["paths"] == {"task.test": str(shared / "test.jsonl")}
    assert "${LATENTLAB_SHARED}" in (run_dir / "config.yaml").read_text()  # it travels
    # Every file readable as the umask allows (safetensors writes its own 0600).
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o777
             for p in run_dir.rglob("*") if p.is_file()}
    assert modes["best/model/model.safetensors"] == FILE_MODE
    assert set(modes.values()) == {FILE_MODE}, modes
    assert not (run_dir / LOCK_FILE).exists()


def test_a_missing_reference_file_fails_before_training(
        finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LATENTLAB_SHARED", str(tmp_path / "nowhere"))
    run_dir = tmp_path / "run"
    assert main(["train", str(finished_run.config), f"out_dir={run_dir}",
                 "task.test=${LATENTLAB_SHARED}/data/prosqa/prosqa_valid.json"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^latentlab: error: task.test {tmp_path}/nowhere/data/prosqa/"
                     r"prosqa_valid.json does not exist\. Fix: set task.test to an existing "
                     r"file \(or LATENTLAB_SHARED", err, re.M), err
    assert "step 1" not in capsys.readouterr().out
    assert not run_dir.exists()


def test_tensorboard_gets_the_metrics_and_a_log_file_the_steps_left(
        finished_run: FinishedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert main(["train", str(finished_run.config), f"out_dir={run_dir}",
                 "train.trackers=[tensorboard]"]) == 0
    events = EventAccumulator(str(run_dir / "trackers"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "valid/accuracy", "valid/teacher_forced_loss"} <= tags
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in rows if "split" not in r and "loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    # The test's stderr is no terminal: progress comes as lines with the total and time left.
    out = capsys.readouterr().out
    assert re.search(r"^step 3: loss .*, step 3 of 12, about \d+ s left$", out, re.M), out
    assert re.search(r"^step 12: loss .*, step 12 of 12$", out, re.M), out


def test_the_start_up_cost_is_printed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # The first step costs 6 s more than the others (0.5 s): a compilation, say.
    forward = Line.forward
    calls = itertools.count()

    def first_slow(self: Line, batch: dict) -> StepOutput:
        if next(calls) == 0:
            self.clock.now += 6.0
        return forward(self, batch)

    monkeypatch.setattr(Line, "forward", first_slow)
    engine_run(tmp_path, monkeypatch, step_s=0.5, eval_s=0.0, max_steps=40)
    out = capsys.readouterr().out
    assert out.count("[latentlab] start-up:") == 1
    assert ("start-up: the first 10 steps took 11.0 s, the next 10 5.0 s (about 6.0 s of "
            "compilation, autotuning, first batches)") in out
