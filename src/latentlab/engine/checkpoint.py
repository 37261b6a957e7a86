"""Resumable checkpoints and the best model, written atomically.

Layout under `RUN_DIR/`:
    checkpoints/step-0000120/   one complete checkpoint
        model.safetensors       every parameter and buffer of the trained module
        optimizer.pt, scheduler.pt, rng-<rank>.pt
        scaler.pt               fp16 only: the loss scaler's scale and growth tracker
        state.json              written last: a directory without it is incomplete
    checkpoints/latest          the name of the newest complete checkpoint (replaced atomically)
    best/                       the best model so far (`save_pretrained`) and best.json (its
                                step and validation numbers), swapped in atomically

A checkpoint is written under a temporary name (`step-0000120.tmp`), renamed once complete, and
only then named in `latest`; of the older ones, the newest is kept (a damaged latest checkpoint
still leaves one to resume from) and the rest are deleted. A crash at any moment leaves the
previous checkpoint loadable, and a partial one is never loaded. A write that fails (a full
disk) removes its partial checkpoint and raises a `PathError` naming the file.

Fault injection, for tests only: with `LATENTLAB_FAULT=<point>:<step>` in the environment the
process kills itself with SIGKILL at that point of the write for optimizer step `<step>`:
`model_written` (a checkpoint's model file is written, its other files are not),
`renamed` (the checkpoint is in place but `latest` still names the previous one) and
`best_moved` (the previous `best/` is moved aside, the new one not yet in place).
`tests/test_crash_resume.py` uses it to prove that a crash at these moments loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from latentlab.errors import LatentlabError, PathError, RunError

FAULT_ENV = "LATENTLAB_FAULT"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
BEST_FILE = "best.json"  # in best/: the step (and validation numbers) of the model it holds
KEEP_CHECKPOINTS = 2  # the latest and the one before it
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
# What reading a damaged or foreign checkpoint file raises (torch.load, safetensors, json).
_UNREADABLE = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
               SafetensorError)


def fault_point(point: str, step: int) -> None:
    """Kill this process here if `LATENTLAB_FAULT` names this point and step (module docstring)."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


_HELD_LOCKS: set[IO[str]] = set()


def _drop_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: if the run is killed,
    a worker still alive would keep the directory locked. The child drops its copy; the
    parent's lock is unaffected."""
    for handle in _HELD_LOCKS:
        handle.close()
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


@contextlib.contextmanager
def exclusive(path: Path, busy: Callable[[str], LatentlabError]) -> Iterator[None]:
    """Hold an advisory `flock` on the file `path` (made if missing) for this process, or raise
    `busy(holder)` where another holds it (`holder`: what it wrote there). The kernel releases
    the lock when the process ends, however it ends (a SIGKILL leaves no stale lock); forked
    children (DataLoader workers) drop their copy, or one still alive after its parent was
    killed would keep holding it. The file is removed on release."""
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise busy(holder) from None
        # The holder before us may have removed the file between our open and our lock:
        # then the lock is on a file nobody else will see, and we take a new one.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"latentlab process {os.getpid()}\n")
    handle.flush()
    _HELD_LOCKS.add(handle)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: a waiting process re-checks the file
        _HELD_LOCKS.discard(handle)
        handle.close()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process (`exclusive` on `run_dir/.lock`): a second command
    training into the same directory would interleave its metrics and checkpoints with this
    one's. The directory goes too if this process made it and nothing was written into it (a
    start that failed leaves nothing behind)."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> RunError:
        return RunError(f"run directory {run_dir} is in use by {holder}",
                        fix="wait for that command to finish, or set out_dir=... to another "
                            "directory")

    try:
        with exclusive(run_dir / LOCK_FILE, busy):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` into a `PathError` naming it. torch.save reports a full
    disk as a RuntimeError from its zip writer ("unexpected pos"), not as an OSError."""
    try:
        yield
    except (RuntimeError, SafetensorError) as exc:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        if free < 64 * 2**20:  # under 64 MiB left: the disk filled up during the write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise PathError(f"writing {path} failed ({_first_line(exc)})",
                        fix="check the file system holding it, then run again (a training "
                            "run: add --resume)") from None


def replace_dir(dest: Path, write: Callable[[Path], Any], fault_step: int | None = None) -> None:
    """Write a directory atomically: `write(tmp)` fills a temporary sibling, which then takes
    `dest`'s place. Directories cannot be swapped in one rename, so for a moment only the
    previous version exists, as `.<name>.old`; `existing_dir` falls back to it."""
    tmp, old = _sibling(dest, "tmp"), _sibling(dest, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)  # `dest` is complete: an older `.old` is junk
        dest.rename(old)
    if fault_step is not None:
        fault_point(f"{dest.name}_moved", fault_step)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def existing_dir(dest: Path) -> Path | None:
    """`dest`, or the previous version a crash inside `replace_dir` left aside, or None."""
    for candidate in (dest, _sibling(dest, "old")):
        if candidate.is_dir():
            return candidate
    return None


def _sibling(dest: Path, suffix: str) -> Path:
    return dest.with_name(f".{dest.name}.{suffix}")


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk, with the permissions the umask gives (safetensors
    writes its files private, 0600, where everything else a run writes is readable)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            path.chmod(FILE_MODE)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class CheckpointManager:
    """Save and find resumable training checkpoints of one run (see module docstring)."""

    def __init__(self, run_dir: Path, rank: int = 0, world_size: int = 1) -> None:
        self.root = run_dir / "checkpoints"
        self.best = run_dir / "best"
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
                         scheduler: Any, state: dict[str, Any], scaler: Any = None) -> None:
        with writing(tmp / "model.safetensors"):
            save_model(model, str(tmp / "model.safetensors"))
        fault_point("model_written", state["step"])
        files = {"optimizer.pt": optimizer, "scheduler.pt": scheduler, "scaler.pt": scaler}
        for name, owner in files.items():
            if owner is not None:
                with writing(tmp / name):
                    torch.save(owner.state_dict(), tmp / name)
        _fsync_tree(tmp)
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1))

    def discard(self, tmp: Path) -> None:
        """Remove a checkpoint whose write failed (it would never be loaded)."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, tmp: Path) -> Path:
        """Rename the finished checkpoint into place, point `latest` at it, drop all but the
        newest older one."""
        final = tmp.with_suffix("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        fault_point("renamed", int(final.name.removeprefix("step-")))
        atomic_write_text(self.root / "latest", final.name)
        kept = set(self.complete()[-KEEP_CHECKPOINTS:]) | {final}
        for other in self.root.iterdir():
            if other.is_dir() and other not in kept:
                # The completeness marker goes first, so that a crash halfway through the
                # deletion leaves a directory `latest()` never takes for a checkpoint.
                (other / STATE_FILE).unlink(missing_ok=True)
                shutil.rmtree(other, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
        complete = self.complete()
        return complete[-1] if complete else None

    def complete(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*")
                      if p.suffix != ".tmp" and (p / STATE_FILE).is_file())

    def load(self, path: Path, model: torch.nn.Module, optimizer: Any,
             scheduler: Any, scaler: Any = None) -> dict[str, Any]:
        rng_file = path / f"rng-{self.rank}.pt"
        if not rng_file.is_file():
            raise RunError(f"checkpoint {path} was written by {self._ranks(path)} processes, "
                           f"this run has {self.world_size}",
                           fix="resume with the same number of processes")
        try:
            load_model(model, str(path / "model.safetensors"))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
            if scaler is not None and (path / "scaler.pt").is_file():
                scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
            set_rng_state(torch.load(rng_file, weights_only=False))
            return json.loads((path / STATE_FILE).read_text())
        except _UNREADABLE as exc:
            previous = [p for p in self.complete() if p != path]
            fix = (f"restore it from a backup, or delete it to resume from the previous "
                   f"checkpoint ({previous[-1].name})" if previous else
                   f"restore it from a backup, or delete {path.parent} to train the run again "
                   "from the start")
            raise RunError(f"checkpoint {path} cannot be loaded ({_first_line(exc)})",
                           fix=fix) from None

    def export_best(self, module: Any, step: int, metrics: dict[str, Any]) -> None:
        """Write `module.save_pretrained` output to `best/`, with the step and validation
        `metrics` it was chosen on, replacing the previous best."""
        def write(path: Path) -> None:
            module.save_pretrained(path)
            atomic_write_text(path / BEST_FILE, json.dumps({"step": step, "valid": metrics}))

        replace_dir(self.best, write, fault_step=step)

    @staticmethod
    def _ranks(path: Path) -> int:
        return len(list(path.glob("rng-*.pt")))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
