"""Streamed training data (`task.stream`), the task curriculum and the time budget
(`train.max_time`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import engine_run, metric_rows
from test_training import final_weights, tiny

from latentlab.engine.trainer import PLAN_AFTER_STEPS, WARM_STEPS, Interrupted
from latentlab.errors import ConfigError
from latentlab.recipes import train
from latentlab.recipes.reasoning import StreamedEpoch
from latentlab.tasks import CountdownConfig, CountdownTask, ProsQAConfig, ProsQATask

STREAM = ("task.stream=true", "task.n_train=24")  # 3 steps of 8 per epoch


# ------------------------------------------------------------------------------- the stream


def test_a_stream_is_a_function_of_seed_epoch_and_index() -> None:
    task = CountdownTask(CountdownConfig(operands=3, stream=True))
    again = CountdownTask(CountdownConfig(operands=3, stream=True))
    epoch0 = StreamedEpoch(task, 0, 50)[:]
    assert epoch0 == StreamedEpoch(again, 0, 50)[:]  # another process draws the same
    assert StreamedEpoch(task, 0, 50)[17] == epoch0[17]  # any item alone, in any order
    epoch1 = StreamedEpoch(task, 1, 50)[:]
    assert len({e.question for e in epoch0} & {e.question for e in epoch1}) < 5  # fresh data
    other_seed = CountdownTask(CountdownConfig(operands=3, stream=True, seed=1))
    assert StreamedEpoch(other_seed, 0, 50)[:] != epoch0
    # Streamed examples are training examples: Countdown's held-out targets stay held out.
    held = set(task._targets[0])
    assert not {e.meta["target"] for e in epoch0 + epoch1} & held


def test_a_too_long_streamed_example_is_replaced_by_the_next_draw() -> None:
    task = CountdownTask(CountdownConfig(operands=3, stream=True))
    lengths = [len(e.question) for e in StreamedEpoch(task, 0, 40)[:]]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the draws are too long

    def encode(example: Any) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(example.question)))}

    def length(features: dict[str, list[int]]) -> int:
        return len(features["input_ids"])

    epoch = StreamedEpoch(task, 0, 40, encode, length, max_length=limit)
    assert all(len(f["input_ids"]) <= limit for f in epoch)
    assert epoch[:] == StreamedEpoch(task, 0, 40, encode, length, max_length=limit)[:]
    with pytest.raises(Exception, match="100 streamed examples in a row are longer"):
        StreamedEpoch(task, 0, 1, encode, length, max_length=1)[0]


def test_curriculum_phases_change_what_each_epoch_generates() -> None:
    config = ProsQAConfig(stream=True, curriculum=[
        {"epochs": 1, "min_concepts": 6, "max_concepts": 8, "min_hops": 1, "max_hops": 2},
        {"epochs": 2, "max_hops": 4}])
    task = ProsQATask(config)

    def hops(epoch: int) -> set[int]:
        return {len(e.steps) for e in StreamedEpoch(task, epoch, 60)}

    def concepts(epoch: int) -> int:
        return max(sum(n[0].islower() for n in e.meta["idx_to_symbol"])
                   for e in StreamedEpoch(task, epoch, 60))

    assert hops(0) <= {1, 2} and concepts(0) <= 8
    assert hops(1) <= {3, 4} and hops(2) <= {3, 4} and concepts(1) > 8
    assert max(hops(3)) > 4  # after the phases: the options of the config itself
    assert config.at_epoch(3) is config


@pytest.mark.parametrize(("phases", "message"), [
    ([{"max_hops": 2}], "needs `epochs`"),
    ([{"epochs": 1, "n_train": 5}], "changes n_train"),
])
def test_malformed_curriculum_phases_are_refused(phases: list[dict[str, Any]],
                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProsQAConfig(stream=True, curriculum=phases)
    with pytest.raises(ValueError, match="needs stream: true"):
        ProsQAConfig(curriculum=[{"epochs": 1}])
    bad = ProsQAConfig(stream=True, curriculum=[{"epochs": 1, "max_hops": 0}])
    with pytest.raises(ConfigError, match=r"curriculum phase .* is invalid"):
        bad.at_epoch(0)


# ------------------------------------------------------------------- streamed runs resume


def test_streamed_run_resumed_reaches_the_uninterrupted_weights(tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(tiny(straight, *STREAM))
    train(tiny(interrupted, *STREAM, "train.stop_after=4"))  # mid-epoch (3 steps each)
    train(tiny(interrupted, *STREAM), resume=True)
    a, b = final_weights(straight), final_weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(straight) == metric_rows(interrupted)
    # A fixed list trains differently: the stream is not that list.
    fixed = tmp_path / "fixed"
    train(tiny(fixed, "task.n_train=24"))
    assert not all(torch.equal(a[k], final_weights(fixed)[k]) for k in a)


def test_the_next_epoch_loads_ahead_in_workers_and_trains_as_without_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With data workers, each epoch's loader starts before the previous epoch ends (no wait
    at the boundary), within a stage; the run equals one collated in the main process."""
    from latentlab.engine.trainer import Trainer

    events: list[str] = []
    loader, step = Trainer._loader, Trainer._step

    def recording_loader(self: Trainer, prepare: Any, stage: int, epoch: int, *args: Any) -> Any:
        events.append(f"load {stage}.{epoch}")
        return loader(self, prepare, stage, epoch, *args)

    def recording_step(self: Trainer, *args: Any) -> Any:
        events.append("step")
        return step(self, *args)

    monkeypatch.setattr(Trainer, "_loader", recording_loader)
    monkeypatch.setattr(Trainer, "_step", recording_step)
    workers, plain = tmp_path / "workers", tmp_path / "plain"
    train(tiny(workers, *STREAM, "train.data_workers=1", "train.epochs=3"))  # 3 steps each
    # One worker collates 4 batches ahead: an epoch of 3 starts the next with its first batch.
    assert events == ["load 0.0", "load 0.1", "step", "step", "step",
                      "load 0.2", "step", "step", "step", "step", "step", "step"]
    train(tiny(plain, *STREAM, "train.data_workers=0", "train.epochs=3"))
    a, b = final_weights(workers), final_weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(workers) == metric_rows(plain)


def test_streamed_run_killed_with_workers_then_resumed_is_bit_identical(
        tmp_path: Path) -> None:
    """SIGKILL a streamed run whose batches come from two DataLoader worker processes, then
    resume it: the same examples in the same order, so the same final checkpoint."""
    config = tmp_path / "stream.yaml"
    base = tiny(tmp_path / "unused", *STREAM, "train.data_workers=2", "train.save_every=2")
    config.write_text(yaml.safe_dump(base.model_dump(mode="json")))

    def command(run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "latentlab", "train", str(config), f"out_dir={run_dir}",
                *extra]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive as they are printed
    with subprocess.Popen(command(killed), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step 5: loss"):  # checkpointed at step 4, mid-epoch
                break
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(command(killed, "--resume"), capture_output=True, text=True,
                             timeout=300, check=True)
    assert "resumed from" in resumed.stdout
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(straight) == metric_rows(killed)


# --------------------------------------------------------------------------- time budget


def test_max_time_lays_the_schedule_out_over_the_budget(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.5 s per step, no validation cost: 60 s hold 120 steps. The plan is made once the speed
    # is measured over PLAN_AFTER_STEPS steps after the first WARM_STEPS.
    trainer, rows = engine_run(tmp_path, monkeypatch, step_s=0.5, eval_s=0.0, max_time=1.0,
                               warmup_steps=10, eval_every=50)
    plans = [r for r in rows if "planned_steps" in r]
    assert plans[0]["step"] == WARM_STEPS + PLAN_AFTER_STEPS
    assert plans[0]["planned_steps"] == 120 and plans[0]["seconds_per_step"] == 0.5
    assert rows[0]["final_step"] == 120
    assert trainer.schedule(120) == 0.0 and trainer.schedule(65) == pytest.approx(0.5)


def test_max_time_counts_validations_and_replans(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A validation every 60 steps costs 4 s, a step 0.25 s: 0.317 s a step in all, so the 60 s
    # hold about 189 steps; the first plan, made before any validation (once 10 s are
    # measured: at step 50), expects 50 + (60 - 12.5) / 0.25 = 240.
    _, rows = engine_run(tmp_path, monkeypatch, step_s=0.25, eval_s=4.0, max_time=1.0,
                         eval_every=60)
    plans = [r["planned_steps"] for r in rows if "planned_steps" in r]
    # Later plans count the validations in the speed: between 180 and 210 steps.
    assert plans[0] == 240 and len(plans) > 1 and all(180 <= p <= 210 for p in plans[1:])
    final = rows[0]["final_step"]
    assert abs(final - plans[-1]) <= 2 and 180 <= final <= 195


def test_max_time_follows_a_run_that_slows_down(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # 150 fast steps (batches prefetched while the model compiled), then the data holds each
    # step to 0.5 s: the first plan (10 s past the first 10 steps, at 0.1 s a step) expects
    # 110 + 49 / 0.1 = 600 steps, the minute holds 150 + 45 / 0.5 = 240. Measured again every
    # 10 s, the plan comes down to that, and the run ends at the end of its schedule (laid out
    # once, its learning rate would still be at two thirds of the peak).
    def step_s(n: int) -> float:
        return 0.1 if n <= 150 else 0.5

    trainer, rows = engine_run(tmp_path, monkeypatch, step_s=step_s, eval_s=0.0, max_time=1.0,
                               warmup_steps=10, eval_every=1000)
    plans = [r["planned_steps"] for r in rows if "planned_steps" in r]
    final = rows[0]["final_step"]
    assert plans[0] == 600 and plans[-1] == final == 240
    assert trainer.schedule(final) < 0.01


def test_a_warmup_longer_than_the_run_is_refused_or_cut_under_a_time_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    # Under a time budget the length is known only at the plan, after the start-up and the
    # first steps: the warm-up is cut to a tenth of the 120 planned steps, and the run goes on.
    trainer, rows = engine_run(tmp_path / "a", monkeypatch, step_s=0.5, eval_s=0.0,
                               max_time=1.0, warmup_steps=200)
    assert rows[0]["final_step"] == 120 and trainer.schedule.warmup == 12
    assert trainer.schedule(6) == 0.5 and trainer.schedule(12) == 1.0
    assert "train.warmup_steps=200 is not shorter than the 120 steps train.max_time allows: " \
           "warm-up cut to 12 steps" in capsys.readouterr().out
    # A fixed length is known at the start: refused there.
    with pytest.raises(ConfigError, match="warmup_steps=50 is not shorter than the run "
                                          r"\(40 steps\)"):
        engine_run(tmp_path / "b", monkeypatch, step_s=0.5, eval_s=0.0, max_steps=40,
                   warmup_steps=50)


def test_gpu_runs_generate_their_data_on_every_core_but_their_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from latentlab.engine.trainer import default_data_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_data_workers("cuda") == 15 and default_data_workers("cpu") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes of one node share the cores
    assert default_data_workers("cuda") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_data_workers("cuda") == 1


def test_a_second_signal_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first asks for a checkpoint after the step; a second, sent while a long validation
    # runs, must not wait for it.
    def scores(step: int) -> dict[str, float]:
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("the validation went on after the second signal")
        return {"accuracy": 0.0}

    with pytest.raises(Interrupted, match="stopped at once by a second signal SIGTERM"):
        engine_run(tmp_path, monkeypatch, step_s=0.1, eval_s=0.0, scores=scores,
                   max_steps=40, eval_every=10)
