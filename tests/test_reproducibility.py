"""Reproducibility: the same seed and config give the same results on CPU, and a run records
what produced it (package versions, git commit, hardware, command, resolved config)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml
from conftest import FinishedRun

import latentlab
from latentlab.cli import main
from latentlab.config import load_config


def test_same_seed_and_config_give_identical_results(finished_run: FinishedRun,
                                                     tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert main(["train", str(finished_run.config), f"out_dir={again}"]) == 0
    finished_run.assert_same_as(again)


def test_a_run_records_its_environment_and_resolved_config(finished_run: FinishedRun) -> None:
    run_dir = finished_run.run_dir
    env = json.loads((run_dir / "environment.json").read_text())
    for package in ("latentlab", "torch", "transformers", "accelerate", "tokenizers",
                    "safetensors"):
        assert env["packages"][package] == metadata.version(package)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=Path(latentlab.__file__).parent)
    assert env["git_commit"] == (git.stdout.strip() or None)
    assert env["python"] == sys.version.split()[0]
    assert env["platform"] == platform.platform()
    assert env["cpu_count"] == os.cpu_count()
    assert isinstance(env["gpus"], list) and isinstance(env["argv"], list)

    saved = run_dir / "config.yaml"
    assert load_config(saved) == load_config(finished_run.config, [f"out_dir={run_dir}"])
    written = yaml.safe_load(saved.read_text())
    assert written["train"]["on_nonfinite"] == "stop"  # every default is written out
