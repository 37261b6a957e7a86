"""A run directory: the one place that knows what a run writes and how to read it back.

`RUN_DIR/config.yaml` makes a directory a run (written once training gets going, so that a
start that fails leaves no run behind); `results.json` holds its final scores;
`environment.json` the versions, hardware and resolved paths of each invocation; the engine's
`checkpoints/`, `best/` and `metrics.jsonl` sit beside them. Training, evaluation, sweeps and
reports all ask this class whether a run exists, is finished, or was made by a given config.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from latentlab.config import RunConfig, differing_keys, dump_config, load_config
from latentlab.engine.checkpoint import (
    BEST_FILE,
    STATE_FILE,
    CheckpointManager,
    atomic_write_text,
    existing_dir,
    run_lock,
)
from latentlab.errors import ConfigError, RunError
from latentlab.paths import resolve_path

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
ENVIRONMENT_FILE = "environment.json"
# What a run writes besides config.yaml and deletes or replaces when it runs again: a directory
# holding any of them but no config.yaml is not a run, and is refused rather than overwritten.
RUN_ENTRIES = ("checkpoints", "best", "metrics.jsonl", RESULTS_FILE, ENVIRONMENT_FILE)
# Keys a `--resume` may change: where this invocation ends, how NaNs are handled from now on
# (a run stopped by one continues with `train.on_nonfinite=skip`), how the model runs
# (compiled, replayed from CUDA graphs), how many processes prepare its batches, how often it
# checkpoints and where it logs. `out_dir` may change too: a run directory can be moved.
RESUMABLE_CHANGES = frozenset({
    "out_dir", "train.stop_after", "train.on_nonfinite", "train.max_skipped_steps",
    "train.max_skipped_share", "model.compile", "train.cuda_graphs", "train.data_workers",
    "train.save_every_minutes", "train.trackers"})


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    # -- what the directory holds ----------------------------------------------------------
    def is_run(self) -> bool:
        return self.config_file.is_file()

    def has_results(self) -> bool:
        return self.is_run() and self.results_file.is_file()

    def is_finished(self) -> bool:
        """Training ended and the final scores are written: `results.json` exists and the
        newest checkpoint, if any, says training is done (a run stopped early by
        `train.stop_after` is not finished)."""
        if not self.results_file.is_file():
            return False
        latest = CheckpointManager(self.path).latest()
        if latest is None:  # checkpoints deleted to save space: the results are final
            return True
        try:
            return bool(json.loads((latest / STATE_FILE).read_text()).get("done"))
        except (OSError, ValueError):
            return False

    def config(self) -> RunConfig:
        return load_config(self.config_file)

    def results(self) -> dict[str, Any] | None:
        try:
            results = json.loads(self.results_file.read_text())
        except (OSError, ValueError):
            return None
        return results if isinstance(results, dict) else None

    def headline(self) -> str | None:
        """The run's main score, test split first: "test accuracy 0.412"."""
        results = self.results() or {}
        for split in ("test", "valid"):
            scores = results.get(split)
            if isinstance(scores, dict):
                for metric, fmt in (("accuracy", ".3f"), ("perplexity", ".2f")):
                    if isinstance(scores.get(metric), int | float):
                        return f"{split} {metric} {scores[metric]:{fmt}}"
        return None

    def best(self) -> Path | None:
        """The directory of the run's best model (None before its first validation)."""
        best = existing_dir(self.path / "best")
        return best if best is not None and (best / "model").is_dir() else None

    def best_step(self) -> int | None:
        """The training step whose model `best/` holds (None for runs written before it was
        recorded)."""
        best = existing_dir(self.path / "best")
        try:
            return int(json.loads((best / BEST_FILE).read_text())["step"]) if best else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def differences(self, config: RunConfig) -> list[str]:
        """The dotted keys in which `config` differs from the run's own, ignoring the keys a
        resume may change (`RESUMABLE_CHANGES`)."""
        saved = self.config().model_dump()
        now = config.model_dump()
        return [k for k in differing_keys(saved, now) if k not in RESUMABLE_CHANGES]

    # -- starting and writing --------------------------------------------------------------
    def check_start(self, config: RunConfig, resume: bool) -> None:
        """Refuse to start where results would be overwritten; `--resume` only the same run."""
        blocking = next((p for p in (self.path, *self.path.parents)
                         if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise RunError(f"run directory {self.path} cannot be created: {blocking} is a file",
                           fix="set out_dir=... to a new directory")
        if not self.is_run():
            # Without config.yaml a directory holds no run (a failed start writes none).
            found = [n for n in RUN_ENTRIES if (self.path / n).exists()]
            if self.path.is_dir() and found:
                raise RunError(f"{self.path} holds {', '.join(found)} but no {CONFIG_FILE}: it "
                               "is not a latentlab run, and starting one there would overwrite "
                               "them", fix="set out_dir=... to a new or empty directory")
            if resume:
                runs = sorted(str(p.parent) for p in self.path.parent.glob(f"*/{CONFIG_FILE}"))
                raise RunError(
                    f"--resume found no run to continue in {self.path} (the out_dir this "
                    "config and its overrides give), so nothing was trained"
                    + (f"; runs beside it: {', '.join(runs[:5])}" if runs else ""),
                    fix="repeat the overrides of the run to continue (or set out_dir=... to "
                        "its directory), or drop --resume to start a new run")
            return
        if not resume:
            raise RunError(f"run directory {self.path} already holds a run",
                           fix="add --resume to continue it, or set out_dir=... to start "
                               "another")
        changed = self.differences(config)
        if changed:
            raise ConfigError(f"--resume with a config that differs from the run's in "
                              f"{', '.join(changed)}",
                              fix=f"resume with the run's own config ({self.config_file})")

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """One command per run directory, for the whole command (`checkpoint.run_lock`)."""
        return run_lock(self.path)

    def write_config(self, config: RunConfig) -> None:
        dump_config(config, self.config_file)

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.results_file, json.dumps(results, indent=1))

    def write_environment(self, config: RunConfig) -> None:
        """Versions, git commit and hardware of this invocation, and the files its config
        names, resolved, for reproducibility; those of the run's earlier invocations (a resume
        may run elsewhere) move to its `earlier` list."""
        path = self.path / ENVIRONMENT_FILE
        earlier: list[dict[str, Any]] = []
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
                earlier = [*previous.pop("earlier", []), previous]
            except (OSError, ValueError, AttributeError):  # unreadable: this invocation's only
                earlier = []
        env = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "python": sys.version.split()[0], "platform": platform.platform(),
               "packages": _versions(), "git_commit": _git_commit(),
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "cpu_count": os.cpu_count(), "argv": sys.argv,
               "latentlab_shared": os.environ.get("LATENTLAB_SHARED"),
               "paths": resolved_paths(config), "earlier": earlier}
        atomic_write_text(path, json.dumps(env, indent=1))


def resolved_paths(config: RunConfig) -> dict[str, str]:
    """The files a config names, as this invocation finds them (`${LATENTLAB_SHARED}` and
    relative paths resolved): config.yaml keeps them as written, so that it travels."""
    named = {f"task.{k}": getattr(config.task, k, None) for k in ("train", "valid", "test")}
    named["model.init_from"] = config.model.init_from
    named |= {f"method.{k}": str(v) for k, v in config.method.model_dump().items()
              if k.endswith("_from") and v}
    return {k: str(resolve_path(str(v)).resolve()) for k, v in named.items() if v}


def find_runs(paths: list[Path]) -> Iterator[RunDir]:
    """The run directories with results given directly or found below the given
    directories, each once, in path order."""
    seen: set[Path] = set()
    for path in paths:
        candidates = [path] if RunDir(path).has_results() else [
            r.parent for r in sorted(path.rglob(RESULTS_FILE))] if path.is_dir() else []
        for candidate in candidates:
            if candidate not in seen and RunDir(candidate).has_results():
                seen.add(candidate)
                yield RunDir(candidate)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for pkg in ("latentlab", "torch", "transformers", "accelerate", "tokenizers", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
