"""Resumable checkpoints, written atomically.

Layout under `RUN_DIR/checkpoints/`:
    step-000120/            one complete checkpoint
        model.safetensors   every parameter and buffer of the trained module
        optimizer.pt, scheduler.pt, rng-<rank>.pt
        state.json          written last: a directory without it is incomplete
    latest                  the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written under a temporary name, renamed once complete, and only then named in
`latest`; older checkpoints are deleted after that. A crash at any moment leaves the previous
checkpoint loadable, and a partial one is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from latentlab.errors import RunError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Save and find resumable training checkpoints of one run (see module docstring)."""

    def __init__(self, run_dir: Path, rank: int = 0, world_size: int = 1) -> None:
        self.root = run_dir / "checkpoints"
        self.rank = rank
        self.world_size = world_size

    # Saving is split in phases so that, with several processes, every rank writes its own RNG
    # state into the temporary directory before the main process renames it.
    def begin(self, step: int) -> Path:
        tmp = self.root / f"step-{step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        return tmp

    def write_rank_state(self, tmp: Path) -> None:
        torch.save(rng_state(), tmp / f"rng-{self.rank}.pt")

    def write_main_state(self, tmp: Path, model: torch.nn.Module, optimizer: Any,
                         scheduler: Any, state: dict[str, Any]) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for name in os.listdir(tmp):
            with (tmp / name).open("rb") as handle:
                os.fsync(handle.fileno())
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))

    def commit(self, tmp: Path) -> Path:
        """Rename the finished checkpoint into place, point `latest` at it, drop older ones."""
        final = tmp.with_suffix("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / "latest", final.name)
        for other in self.root.iterdir():
            if other.is_dir() and other != final:
                shutil.rmtree(other, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / "state.json").is_file():
                return candidate
        complete = sorted(p for p in self.root.glob("step-*") if p.suffix != ".tmp"
                          and (p / "state.json").is_file()) if self.root.is_dir() else []
        return complete[-1] if complete else None

    def load(self, path: Path, model: torch.nn.Module, optimizer: Any,
             scheduler: Any) -> dict[str, Any]:
        rng_file = path / f"rng-{self.rank}.pt"
        if not rng_file.is_file():
            raise RunError(f"checkpoint {path} was written by {self._ranks(path)} processes, "
                           f"this run has {self.world_size}",
                           fix="resume with the same number of processes")
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / "state.json").read_text())

    @staticmethod
    def _ranks(path: Path) -> int:
        return len(list(path.glob("rng-*.pt")))
