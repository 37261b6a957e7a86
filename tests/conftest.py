"""Shared fixtures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from latentlab.engine.trainer import WALL_CLOCK_KEYS
from latentlab.tasks.base import resolve_path


@pytest.fixture
def shared_data() -> Path:
    """The reference data (`$LATENTLAB_SHARED/data`, by default `../shared/data`)."""
    path = resolve_path("${LATENTLAB_SHARED}/data")
    if not path.is_dir():
        pytest.skip("reference data ../shared/data not found; set LATENTLAB_SHARED")
    return path


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
