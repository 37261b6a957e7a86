"""Two processes on CPU (torchrun, gloo): the run shards its data, trains one model, writes
one run directory, and resumes exactly. Before `make_accelerator` passed `cpu`, each process
took itself for the main one: both wrote the tokenizer (one crashed) and each trained on all
the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from conftest import metric_rows
from test_training import TINY, final_weights

from latentlab.recipes import load_run
from latentlab.recipes.dependence import latent_dependence
from latentlab.tasks import build_task

# 40 training examples, 4 per process and step: 5 steps per epoch on two processes, 10 on one.
CONFIG = {**TINY, "method": {"name": "coconut", "max_latent_stage": 1, "epochs_per_stage": 1},
          "train": {**TINY["train"], "max_steps": None, "epochs": 2, "batch_size": 4,
                    "eval_every": 0}}


def train_with(processes: int, run_dir: Path, *args: str, config: dict[str, Any] = CONFIG,
               entry: tuple[str, ...] = ("-m", "latentlab"), timeout: int = 600
               ) -> tuple[list[dict], str]:
    """`latentlab train` (or `entry`, a script or module taking its arguments) of `config`
    into `run_dir` on `processes` CPU processes: metrics.jsonl's rows and what it printed."""
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free local port, so parallel test runs do not collide.
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable])
    done = subprocess.run([*launch, *entry, "train", str(path), f"out_dir={run_dir}", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, done.stdout


def test_two_cpu_processes_shard_the_data_and_write_one_run(tmp_path: Path) -> None:
    two, printed = train_with(2, tmp_path / "two")
    one, _ = train_with(1, tmp_path / "one")
    steps = [r["step"] for r in two if "loss" in r]
    assert steps == list(range(1, 11))  # 2 epochs of 5 steps: each process saw half the data
    assert [r["step"] for r in one if "loss" in r] == list(range(1, 21))
    # Validation ran once per epoch and stage, on the main process only (one row each).
    assert [r["step"] for r in two if r.get("split") == "valid"] == [5, 10]
    method, config = load_run(tmp_path / "two")
    assert config.method.name == "coconut" and method.latent_stage == 1
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["test"]["n"] == 8
    assert [line for line in printed.splitlines() if line.startswith("{")] == [
        json.dumps(results)]  # the results line once, from the main process
    # The latent ablations were generated half by each process and summed: the same numbers
    # as one process scoring every example.
    examples = build_task(config.task).load("test")
    assert results["test"]["latent_dependence"] == latent_dependence(
        method, build_task(config.task), examples, config.eval.batch_size,
        config.eval.max_new_tokens)


def test_two_processes_killed_and_resumed_continue_exactly(tmp_path: Path) -> None:
    """Stopped after step 3 of 10 (mid-epoch, inside Coconut's first stage) and resumed: the
    same weights and metrics as two processes that ran straight through."""
    train_with(2, tmp_path / "straight")
    train_with(2, tmp_path / "resumed", "train.stop_after=3")
    train_with(2, tmp_path / "resumed", "--resume")
    assert metric_rows(tmp_path / "resumed") == metric_rows(tmp_path / "straight")
    a, b = (final_weights(tmp_path / name) for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Runs latentlab with the second process's clock going three times as fast as the first's.
SKEWED_CLOCK = """
import os, sys, time
if os.environ["RANK"] == "1":
    real = time.perf_counter
    start = real()
    time.perf_counter = lambda: start + 3 * (real() - start)
from latentlab.cli import main
sys.exit(main())
"""


def test_processes_whose_clocks_disagree_end_the_time_budget_together(tmp_path: Path) -> None:
    """train.max_time on two processes: each has its own clock, and the main one spends more
    (it logs, validates and writes). Decided on each clock, the second process here would stop
    at a third of the budget and wait in its final scoring while the first trained on (a hang,
    or mismatched collectives); on the main process's time both stop at the same step."""
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_CLOCK)
    timed = {**TINY, "train": {**TINY["train"], "max_steps": None, "epochs": 10_000,
                               "batch_size": 4, "max_time": 0.15, "eval_every": 25,
                               "log_every": 5}}
    rows, _ = train_with(2, tmp_path / "run", config=timed, entry=(str(script),), timeout=300)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    last = max(r["step"] for r in rows if "loss" in r)
    assert results["steps"] == last and results["test"]["n"] == 8
    # The budget ran out on the main process's clock: 9 s of training, not the second's 3 s.
    assert max(r["train_seconds"] for r in rows if "train_seconds" in r) >= 9
