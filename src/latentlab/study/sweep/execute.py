"""Running a sweep: every job not finished yet, upstreams first, in this process or in worker
subprocesses (one per GPU). A finished run is skipped and an interrupted one resumed; a job
that fails is recorded in `OUT_DIR/sweep_status.json` and the others go on."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch

from latentlab.config import RunConfig, dump_config
from latentlab.engine.checkpoint import atomic_write_text, exclusive
from latentlab.engine.trainer import Interrupted
from latentlab.errors import ConfigError, LatentlabError, RunError
from latentlab.recipes import RunDir, train
from latentlab.study.sweep.plan import Job, SweepPlan, load_sweep

STATUS_FILE = "sweep_status.json"
LOCK_FILE = ".sweep.lock"
JOB_CONFIG = "job.yaml"  # a subprocess job's resolved config, in its run directory
JOB_LOG = "job.log"  # a subprocess job's output, appended to by every attempt
SUCCESS = ("already_done", "trained", "resumed")
UNSETTLED = ("pending", "running")
POLL_SECONDS = 0.5
INTERRUPT_GRACE_SECONDS = 120  # a worker stopped by the sweep saves a checkpoint first


@dataclass
class JobStatus:
    """What became of a job; `sweep_status.json` holds one per job, in plan order."""

    name: str
    kind: str
    run_dir: str
    needs: list[str]
    assignment: dict[str, Any]
    # pending | running | already_done | trained | resumed | failed | upstream_failed |
    # interrupted
    status: str = "pending"
    result: str | None = None  # the headline score, e.g. "test accuracy 0.412"
    error: str | None = None
    traceback: str | None = None  # in-process failures that are not user errors
    log: str | None = None  # subprocess jobs: their output
    started: str | None = None
    seconds: float | None = None


@dataclass
class SweepResult:
    plan: SweepPlan
    jobs: list[JobStatus]

    @property
    def ok(self) -> bool:
        """Every job finished (now or before)."""
        return all(j.status in SUCCESS for j in self.jobs)


def run_sweep(path: str | Path, overrides: Sequence[str] = (), workers: int | None = None,
              out_dir: str | Path | None = None) -> SweepResult:
    """Run every job of a sweep file that is not finished yet; returns what became of each.

    `overrides` and `out_dir` as in `load_sweep`; `workers` replaces the file's `workers`.
    Prints progress and a final table. A failed job does not stop the others (jobs that start
    from it are marked upstream_failed); Ctrl-C or SIGTERM stops the sweep after the running
    jobs saved a checkpoint, and raises (`KeyboardInterrupt` or `Interrupted`).
    """
    return run_plan(load_sweep(path, overrides, out_dir), workers)


def run_plan(plan: SweepPlan, workers: int | None = None) -> SweepResult:
    """Run every job of a planned sweep (`load_sweep`, maybe cut by `plan.select`) that is not
    finished yet, as `run_sweep` does."""
    if workers is not None and workers < 0:
        raise ConfigError(f"workers is {workers}", "give 0 (in this process) or more")
    gpus = _gpu_ids(plan.spec.gpus)
    count = _worker_count(plan.spec.workers if workers is None else workers, gpus)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(plan.out_dir):
        tracker = _Tracker(plan)
        mode = (f"{count} worker subprocess(es)" + (f" on GPUs {','.join(gpus)}" if gpus else "")
                if count else "one after another in this process")
        print(f"[sweep] {plan.path}: {len(plan.jobs)} jobs, {mode}; status in "
              f"{plan.out_dir / STATUS_FILE}", flush=True)
        try:
            if count:
                _run_workers(plan, tracker, count, gpus)
            else:
                _run_in_process(plan, tracker)
        finally:
            tracker.write()
            print("\n" + format_table(tracker.rows), flush=True)
    return SweepResult(plan, tracker.rows)


def _exclusive(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold `OUT_DIR/.sweep.lock` while the sweep runs: a second sweep started on the same
    directory would train the same unfinished runs at the same time."""
    return exclusive(out_dir / LOCK_FILE, lambda holder: RunError(
        f"another sweep is running in {out_dir}",
        "wait for it to end, or give this sweep another out_dir"))


def plan_table(plan: SweepPlan) -> str:
    """What running the sweep now would do with each job (for a dry run)."""
    rows = []
    for job in plan.jobs:
        note: str | None
        if job.error is not None:
            state, note = "invalid", job.error
        elif RunDir(job.run_dir).is_finished():
            state, note = "finished", RunDir(job.run_dir).headline()
        else:
            state = "resume" if RunDir(job.run_dir).is_run() else "train"
            note = f"after {', '.join(job.needs)}" if job.needs else None
        rows.append(JobStatus(job.name, job.kind, str(job.run_dir), list(job.needs),
                              job.assignment, state, note))
    return format_table(rows)


def format_table(rows: Sequence[JobStatus]) -> str:
    """Job, status and headline result, one line each, then the errors of failed jobs."""
    header = ("job", "status", "result")
    cells = [header, *((r.name, r.status, r.result or "-") for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip()
             for c in cells]
    errors = [f"  {r.name}: {r.error}" for r in rows if r.error]
    return "\n".join(lines + (["errors:", *errors] if errors else []))


class _Tracker:
    """The jobs' statuses, rewritten atomically to `sweep_status.json` at every change."""

    def __init__(self, plan: SweepPlan) -> None:
        self.plan = plan
        self.rows = [JobStatus(j.name, j.kind, str(j.run_dir), list(j.needs), j.assignment)
                     for j in plan.jobs]
        self._by_name = {r.name: r for r in self.rows}
        self._clock: dict[str, float] = {}  # start times of running jobs
        self.write()

    def status(self, name: str) -> str:
        return self._by_name[name].status

    def set(self, job: Job, status: str, **fields: Any) -> None:
        row = self._by_name[job.name]
        row.status = status
        if status == "running":
            row.started, row.error, row.traceback = datetime.now().isoformat(), None, None
            self._clock[job.name] = time.monotonic()
        elif job.name in self._clock:
            row.seconds = round(time.monotonic() - self._clock.pop(job.name), 1)
        for key, value in fields.items():
            setattr(row, key, value)
        self.write()

    def write(self) -> None:
        data = {"sweep": str(self.plan.path), "out_dir": str(self.plan.out_dir),
                "updated": datetime.now().isoformat(),
                "jobs": [asdict(r) for r in self.rows]}
        atomic_write_text(self.plan.out_dir / STATUS_FILE, json.dumps(data, indent=1,
                                                                      default=str))


def _decide(job: Job, tracker: _Tracker) -> Literal["train", "resume"] | None:
    """Settle a job that needs no training (finished, invalid, its upstream failed) and return
    None; otherwise say whether it starts or resumes."""
    failed = [n for n in job.needs if tracker.status(n) not in SUCCESS]
    if job.error is not None or job.config is None:
        tracker.set(job, "failed", error=job.error)
    elif failed:
        tracker.set(job, "upstream_failed", error=f"upstream {', '.join(failed)} did not finish")
    elif (run := RunDir(job.run_dir)).is_finished():
        conflict = _config_conflict(job.config, run)
        if conflict:
            tracker.set(job, "failed", error=conflict)
        else:
            tracker.set(job, "already_done", result=run.headline())
    else:
        # A directory with a config but no final results is a run that stopped: resume it
        # (from its last checkpoint, or from the start if it saved none).
        return "resume" if run.is_run() else "train"
    return None


def _config_conflict(config: RunConfig, run: RunDir) -> str | None:
    """Why the finished run in `run` is not this job's (None if it is): a sweep file edited
    after its runs finished must not pass off old results as new ones."""
    try:
        differ = run.differences(config)
    except LatentlabError as err:
        return f"{run.path} holds a finished run whose config cannot be read ({err.problem})"
    if not differ:
        return None
    return (f"{run.path} holds a finished run of another config (it differs in "
            f"{', '.join(differ)}); move that directory away or set out_dir to rerun")


def _run_in_process(plan: SweepPlan, tracker: _Tracker) -> None:
    for index, job in enumerate(plan.jobs, 1):
        how = _decide(job, tracker)
        if how is None or job.config is None:
            continue
        print(f"[sweep] {index}/{len(plan.jobs)} {job.name}: "
              f"{'resuming' if how == 'resume' else 'training'}", flush=True)
        tracker.set(job, "running")
        try:
            train(job.config, resume=how == "resume")
        except (Interrupted, KeyboardInterrupt):
            tracker.set(job, "interrupted")
            raise
        except Exception as exc:  # one job's failure, whatever it is, must not stop the rest
            user_error = isinstance(exc, LatentlabError | OSError)
            tracker.set(job, "failed", error=_describe(exc),
                        traceback=None if user_error else traceback.format_exc())
            print(f"[sweep] {job.name} failed: {_describe(exc)}", flush=True)
        else:
            tracker.set(job, "resumed" if how == "resume" else "trained",
                        result=RunDir(job.run_dir).headline())
        finally:
            _release_memory()


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, LatentlabError) else f"{type(exc).__name__}: {text}"


def _release_memory() -> None:
    """Free what a finished or failed job held before the next one starts in this process."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Worker:
    job: Job
    how: Literal["train", "resume"]
    process: subprocess.Popen[bytes]


def _run_workers(plan: SweepPlan, tracker: _Tracker, count: int,
                 gpus: list[str] | None) -> None:
    """`count` subprocesses at a time (`python -m latentlab train job.yaml`), a job starting as
    soon as a worker is free and the upstreams it needs have finished."""
    pending = list(plan.jobs)
    running: dict[int, _Worker] = {}  # worker slot -> its job
    try:
        while pending or running:
            for slot in range(count):
                if slot in running:
                    continue
                ready = _next_ready(pending, tracker)
                if ready is None:
                    break
                job, how = ready
                try:
                    process = _start(job, how, slot, count, gpus)
                except OSError as exc:  # its run directory cannot be written: this job fails
                    tracker.set(job, "failed", error=_describe(exc))
                    continue
                running[slot] = _Worker(job, how, process)
                tracker.set(job, "running", log=str(job.run_dir / JOB_LOG))
                print(f"[sweep] {job.name}: {'resuming' if how == 'resume' else 'training'} "
                      f"(worker {slot}" + (f", GPU {gpus[slot % len(gpus)]})" if gpus else ")"),
                      flush=True)
            for slot, worker in list(running.items()):
                code = worker.process.poll()
                if code is not None:
                    del running[slot]
                    _settle(worker, code, tracker)
            if running:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        # Ask each worker to stop as Ctrl-C would (it saves a checkpoint), then wait for it.
        for worker in running.values():
            worker.process.send_signal(signal.SIGINT)
        for worker in running.values():
            try:
                worker.process.wait(INTERRUPT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            tracker.set(worker.job, "interrupted")
        raise


def _next_ready(pending: list[Job], tracker: _Tracker
                ) -> tuple[Job, Literal["train", "resume"]] | None:
    """Remove from `pending` and return the first job to train whose upstreams are settled,
    settling on the way the jobs that need no training."""
    for job in list(pending):
        if any(tracker.status(n) in UNSETTLED for n in job.needs):
            continue
        pending.remove(job)
        how = _decide(job, tracker)
        if how is not None:
            return job, how
    return None


def _start(job: Job, how: str, slot: int, workers: int,
           gpus: list[str] | None) -> subprocess.Popen[bytes]:
    assert job.config is not None  # _decide settled the jobs without a config
    job.run_dir.mkdir(parents=True, exist_ok=True)
    job_config = job.run_dir / JOB_CONFIG
    dump_config(job.config, job_config)
    command = [sys.executable, "-m", "latentlab", "train", str(job_config)]
    if how == "resume":
        command.append("--resume")
    env = dict(os.environ)
    # Workers share the CPU cores: without a limit each would start a thread per core, and
    # oversubscribed cores run many times slower than evenly shared ones.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if gpus is not None:  # [] hides every GPU (gpus: 0)
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)] if gpus else ""
    with (job.run_dir / JOB_LOG).open("ab") as log:
        log.write(f"--- {datetime.now().isoformat()} {' '.join(command)}\n".encode())
        log.flush()
        # The child writes to its own copy of the descriptor; ours can close.
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _settle(worker: _Worker, code: int, tracker: _Tracker) -> None:
    job = worker.job
    if code == 0:
        tracker.set(job, "resumed" if worker.how == "resume" else "trained",
                    result=RunDir(job.run_dir).headline())
        return
    log = job.run_dir / JOB_LOG
    error = f"{_last_error(log)} (exit status {code}; log {log})"
    # 130: the worker was stopped by a signal (after saving a checkpoint); the next sweep
    # resumes it like any unfinished run.
    tracker.set(job, "interrupted" if code == 130 else "failed", error=error)
    print(f"[sweep] {job.name} {tracker.status(job.name)}: {error}", flush=True)


def _last_error(log: Path) -> str:
    """The CLI's one-line error from a worker's log, else its last line (a traceback's)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()]
    for line in reversed(lines):
        if line.startswith("latentlab: error: "):
            return line.removeprefix("latentlab: error: ")
    return lines[-1] if lines else "no output"


def _visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES ids of the GPUs this process sees (a worker must be given the id
    of the parent's list, not its index)."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in listed.split(",") if g.strip()][:count]


def _gpu_ids(setting: Literal["auto"] | int | list[int | str]) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES of each worker slot; None: leave the variable alone."""
    if isinstance(setting, list):
        return [str(g) for g in setting]
    visible = _visible_gpus()
    if setting == "auto":
        return visible or None
    if setting > len(visible):
        raise ConfigError(f"gpus: {setting}, but {len(visible)} GPU(s) are visible",
                          "lower gpus, or set gpus: auto")
    return visible[:setting]


def _worker_count(setting: Literal["auto"] | int, gpus: list[str] | None) -> int:
    if setting == "auto":
        return len(gpus) if gpus and len(gpus) > 1 else 0
    return setting
