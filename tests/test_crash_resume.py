"""Crash safety: a training process killed at any moment resumes to the very same result.

Real `python -m latentlab train` processes are killed: with SIGKILL inside the writes of a
checkpoint and of best/ (the `LATENTLAB_FAULT` hook of engine/checkpoint.py) and at seeded
random moments; with SIGTERM and SIGINT, which save a checkpoint and exit with status 130.
After every kill `checkpoints/latest` must name a complete checkpoint and the next `--resume`
must start from exactly that one; the finished run must equal an uninterrupted one
(`finished_run`) byte for byte. A full disk during a checkpoint keeps the previous one; the
engine-level test covers a curriculum of two stages.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FinishedRun, metric_rows
from torch import nn

from latentlab.cli import main
from latentlab.engine.checkpoint import FAULT_ENV, CheckpointManager, existing_dir
from latentlab.engine.config import TrainConfig
from latentlab.engine.interface import Stage, StepOutput
from latentlab.engine.trainer import Trainer
from latentlab.recipes.building import make_accelerator

CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt", "state.json"}
RANDOM_KILLS = 4
# A random kill lands up to this long after a random one of the next few progress lines
# (`step N: loss` or `step N: validation`): spread over the run whatever the machine's speed.
KILL_DELAY_S = 0.5
PROGRESS = r"^step \d+: "
TIMEOUT_S = 300
START = re.compile(r"^\[latentlab\] training from step \d+(?:, resumed from (.+))?$", re.M)


def train_command(run: FinishedRun, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "latentlab", "train", str(run.config), f"out_dir={run_dir}",
            *extra]


def child_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed: the test waits for them
    if fault is not None:
        env[FAULT_ENV] = fault
    return env


ResumePoint = tuple[str | None, bool]  # the checkpoint (None: none yet); whether it is final


def resume_point(run_dir: Path) -> ResumePoint:
    """Check that the checkpoints are consistent after a kill; the one a resume must load."""
    latest = CheckpointManager(run_dir).latest()
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        assert latest == pointer.parent / pointer.read_text().strip()
    if latest is None:
        return None, False
    assert latest.suffix != ".tmp"
    assert {p.name for p in latest.iterdir()} >= CHECKPOINT_FILES, latest
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == int(latest.name.removeprefix("step-"))
    return str(latest), state["done"]


def assert_resumed_from(output: str, expected: ResumePoint) -> None:
    """The process loaded the checkpoint `resume_point` gave before it started."""
    match = START.search(output)
    checkpoint, done = expected
    if done:
        assert match is None, output  # nothing left to train: straight to the final scoring
        return
    assert match, f"no start line in:\n{output}"
    assert match.group(1) == checkpoint


def read_until(proc: subprocess.Popen[str], pattern: str, count: int = 1) -> str:
    """Stdout up to the `count`-th line matching `pattern` (all of it if the process ends)."""
    assert proc.stdout is not None
    if count <= 0:
        return ""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        count -= bool(re.search(pattern, line))
        if count <= 0:
            break
    return "".join(seen)


def leftovers(run_dir: Path) -> list[str]:
    """Temporary names a kill left behind: where in a write it landed."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.name.endswith((".tmp", ".old")))


def test_sigkill_anywhere_then_resume_reaches_identical_weights(
        finished_run: FinishedRun, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = train_command(finished_run, run_dir, "--resume")  # once the run has started
    log = []

    # Inside the writes: a half-written checkpoint (never loaded); a complete one that `latest`
    # does not name yet; the old best/ moved aside with the new one not in place.
    for fault, expect_left in (("model_written:2", "checkpoints/step-0000002.tmp"),
                               ("renamed:4", None), ("best_moved:4", ".best.old")):
        expected = resume_point(run_dir)
        resume = ("--resume",) if (run_dir / "config.yaml").exists() else ()  # a fresh start
        proc = subprocess.run(train_command(finished_run, run_dir, *resume),
                              env=child_env(fault), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert_resumed_from(proc.stdout, expected)
        if expect_left:
            assert expect_left in leftovers(run_dir)
        log.append((fault, leftovers(run_dir)))
    assert resume_point(run_dir) == (str(run_dir / "checkpoints" / "step-0000002"), False)
    assert (run_dir / "checkpoints" / "step-0000004" / "state.json").is_file()  # not pointed at
    assert existing_dir(run_dir / "best") == run_dir / ".best.old"  # what `eval` would read

    # At random moments of training, validation, checkpointing and final scoring.
    rng = random.Random(20240607)
    for _ in range(RANDOM_KILLS):
        expected = resume_point(run_dir)
        if expected[1]:
            break
        with subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) as proc:
            output = read_until(proc, START.pattern)
            output += read_until(proc, PROGRESS, count=rng.randint(0, 2))
            time.sleep(rng.uniform(0.0, KILL_DELAY_S))
            proc.kill()
            output += proc.communicate(timeout=TIMEOUT_S)[0]
        assert_resumed_from(output, expected)
        last_line = output.strip().splitlines()[-1]
        log.append((f"random, exit {proc.returncode} after {last_line!r}", leftovers(run_dir)))
        if proc.returncode == 0:  # it finished before the kill
            break
        assert proc.returncode == -signal.SIGKILL

    expected = resume_point(run_dir)
    proc = subprocess.run(command, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert_resumed_from(proc.stdout, expected)
    print(*log, sep="\n")  # shown on failure: where each kill landed
    finished_run.assert_same_as(run_dir)
    assert leftovers(run_dir) == []


def test_sigterm_and_sigint_save_a_checkpoint_and_exit_130(
        finished_run: FinishedRun, tmp_path: Path) -> None:
    # SIGTERM stops a fresh run, SIGINT the resumed one; a last resume finishes it.
    run_dir = tmp_path / "run"
    for signum, after, extra in ((signal.SIGTERM, "step 3: loss", ()),
                                 (signal.SIGINT, "step 9: loss", ("--resume",))):
        with subprocess.Popen(train_command(finished_run, run_dir, *extra), env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            assert after in read_until(proc, f"^{after}")
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        match = re.search(rf"^latentlab: error: stopped by signal {signum.name} after step "
                          r"(\d+); a checkpoint was saved\. Fix: continue with .*--resume", err,
                          re.M)
        assert match, err
        step = int(match.group(1))
        assert resume_point(run_dir) == (str(run_dir / "checkpoints" / f"step-{step:07d}"),
                                         False)

    proc = subprocess.run(train_command(finished_run, run_dir, "--resume"), env=child_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    finished_run.assert_same_as(run_dir)
    argv = json.loads((run_dir / "environment.json").read_text())["argv"]
    assert "train" in argv and "--resume" in argv  # the invocation that got going last


@pytest.mark.parametrize("raised", ["oserror", "zip-writer"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
        raised: str, finished_run: FinishedRun, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Checkpoints at steps 2, 4, 6 each torch.save rng, optimizer, scheduler: the 8th call is
    # step 6's optimizer state. A full disk reaches torch.save as an OSError, or from its zip
    # writer as a RuntimeError, told apart from other failures by the free space left.
    calls = itertools.count(1)
    save = torch.save

    def full_disk(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if next(calls) == 8:
            if raised == "oserror":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(
                100 * 2**30, 100 * 2**30 - 2**20, 2**20))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "1234 vs 1180")
        save(obj, path, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", str(finished_run.config), f"out_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^latentlab: error: no space left on the device holding .*"
                     r"step-0000006\.tmp/optimizer\.pt\. Fix: free disk space, then run again "
                     r"\(a training run: add --resume\)\.$", err, re.M), err
    assert leftovers(run_dir) == []  # the partial checkpoint is gone
    assert resume_point(run_dir) == (str(run_dir / "checkpoints" / "step-0000004"), False)

    monkeypatch.undo()  # the disk has room again
    assert main(["train", str(finished_run.config), f"out_dir={run_dir}", "--resume"]) == 0
    finished_run.assert_same_as(run_dir)


# ---------------------------------------------------------------------- engine: a curriculum


class Toy(nn.Module):
    """A regression whose data changes with the curriculum stage; dropout makes the RNG
    state matter, and a second stage resets the optimizer (as Coconut's stages do)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        prediction = self.linear(self.dropout(batch["x"])).squeeze(-1)
        return StepOutput(((prediction - batch["y"]) ** 2).mean())

    def set_stage(self, index: int) -> None:
        """The stage changes the data (`toy_data`), not the model."""

    def save_pretrained(self, path: Path) -> None:
        torch.save(self.state_dict(), path / "toy.pt")


STAGES = [Stage("plain", 2), Stage("shifted", 2, reset_optimizer=True)]


def toy_data(stage: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    """Fresh examples every epoch, as a streamed task gives."""
    gen = torch.Generator().manual_seed(100 * stage + epoch)
    x = torch.randn(10, 4, generator=gen)
    y = x.sum(-1) + 3.0 * stage
    return [{"x": x[i], "y": y[i]} for i in range(10)]


def fit_toy(run_dir: Path, resume: bool, **train: Any) -> dict[str, torch.Tensor]:
    run_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = Toy()
    config = TrainConfig(batch_size=4, lr=0.05, log_every=2, save_every=1, **train)
    trainer = Trainer(model, config, run_dir, make_accelerator("no"),
                      lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                      lambda step: {"accuracy": -model.linear.bias.abs().item()})
    trainer.fit(STAGES, toy_data, num_examples=10, resume=resume)
    return model.state_dict()


@pytest.mark.parametrize("stop_after", [2, 3, 5])
def test_curriculum_stages_resume_exactly(tmp_path: Path, stop_after: int) -> None:
    # 3 steps per epoch, 12 in all; stopping every 3 steps ends invocations on epoch and stage
    # boundaries (step 6), every 2 or 5 steps in the middle of epochs.
    straight = fit_toy(tmp_path / "straight", resume=False)
    resume = False
    for _ in range(12):
        pieces = fit_toy(tmp_path / "pieces", resume=resume, stop_after=stop_after)
        resume = True
    assert all(torch.equal(straight[k], pieces[k]) for k in straight)
    assert metric_rows(tmp_path / "straight") == metric_rows(tmp_path / "pieces")
