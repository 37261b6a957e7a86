"""Where a training step's time goes: torch.profiler over a window of steps (`train.profile`).

`RUN_DIR/profile/steps-A-B.txt` lists the operators of steps A..B by self time on the device
(CPU time on a CPU), `steps-A-B.trace.json.gz` is the timeline (Perfetto, chrome://tracing).
Profiling slows the steps it records: the run's tokens/s over that window is not the plain
step's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def operator_table(prof: profile, device: torch.device, rows: int = 40) -> str:
    """The recorded operators, most self time on `device` first."""
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def profiler_for(device: torch.device) -> profile:
    """A profiler of the host and, on CUDA, of the kernels (not started)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities)


class StepProfiler:
    """Records the steps of `window` (FIRST, COUNT: steps FIRST..FIRST+COUNT-1, numbered from 1
    as the metrics are; None: none) and writes their table and trace to `out_dir` (only where
    `write`: the main process). Used as a context around the training loop: a run that ends
    inside the window writes the steps it made."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, device: torch.device,
                 write: bool) -> None:
        first, count = window or (0, 0)  # step 0 never runs: nothing is recorded
        self.first, self.last = first, first + count - 1
        self.out_dir, self.device, self.write = out_dir, device, write
        self._prof: profile | None = None
        self._recorded = 0  # the last step recorded

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """Run step `number` inside the window's profiler when it falls in the window."""
        if number == self.first:
            self._prof = profiler_for(self.device)
            self._prof.start()
        yield
        if self._prof is not None:
            self._recorded = number
            if number == self.last:
                self._finish()

    def _finish(self) -> None:
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's kernels finish inside it
        self._prof.stop()
        if self.write and self._recorded:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            name = f"steps-{self.first}-{self._recorded}"
            (self.out_dir / f"{name}.txt").write_text(
                operator_table(self._prof, self.device) + "\n", encoding="utf-8")
            self._prof.export_chrome_trace(str(self.out_dir / f"{name}.trace.json.gz"))
        self._prof = None
