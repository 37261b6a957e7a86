"""`latentlab sweep`: a grid of runs from one YAML file; resumable, one job per GPU.

A sweep file names a base run config, a grid of dotted config keys and their values, and the
upstream runs jobs start from (the No-CoT Base of a Coprocessor, referred to as
`${upstream.NAME}`). `load_sweep` expands it into jobs, each a validated `RunConfig` with its own
run directory `OUT_DIR/<job name>`; `run_sweep` trains them, upstreams first. A finished run is
skipped and an interrupted one resumed, so running a sweep again continues where it stopped; a
job that fails is recorded in `OUT_DIR/sweep_status.json` and the others go on.
docs/sweeps_reports.md describes the file format.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import gc
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latentlab.config import (
    RunConfig,
    apply_overrides,
    differing_keys,
    dump_config,
    load_config,
    parse_override,
    read_config_file,
    read_yaml,
    validate,
)
from latentlab.engine.checkpoint import (
    STATE_FILE,
    CheckpointManager,
    atomic_write_text,
    exclusive,
)
from latentlab.engine.trainer import Interrupted
from latentlab.errors import ConfigError, LatentlabError, RunError
from latentlab.run import CONFIG_FILE, RESUMABLE_CHANGES, train

STATUS_FILE = "sweep_status.json"
LOCK_FILE = ".sweep.lock"
JOB_CONFIG = "job.yaml"  # a subprocess job's resolved config, in its run directory
JOB_LOG = "job.log"  # a subprocess job's output, appended to by every attempt
BASE_AXIS = "base"  # the grid key whose values are run config files, not config keys
REFERENCE = re.compile(r"\$\{upstream\.([^}]*)\}")
SUCCESS = ("already_done", "trained", "resumed")
UNSETTLED = ("pending", "running")
POLL_SECONDS = 0.5
INTERRUPT_GRACE_SECONDS = 120  # a worker stopped by the sweep saves a checkpoint first
# Short prefixes for job names (`liu-nl4-op4-s0`); other keys use their last part.
LABEL_PREFIXES = {"method.latent_budget": "nl", "task.operands": "op", "train.seed": "s",
                  "method.orthogonality": "lam", "method.chunk_size": "r"}
BARE_LABELS = ("method.name", "task.name", "model.name", BASE_AXIS)  # the value says it all


# ------------------------------------------------------------------------------------------
# The sweep file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpstreamSpec(_Strict):
    """A run that jobs start from; one instance per distinct resolved config."""

    config: str | dict[str, Any] | None = Field(
        None, description="a run config file (relative to the sweep file) or an inline config; "
        "default: the job's own base")
    overrides: list[str] = Field(default_factory=list, description="dotted `key=value` changes "
                                 "to that config, after the sweep's `overrides`")
    inherit: list[str] = Field(default_factory=list, description="grid keys whose value the "
                               "upstream takes from each job that refers to it (one upstream "
                               "per distinct combination, e.g. per seed)")


class SweepSpec(_Strict):
    """What a sweep file holds (docs/sweeps_reports.md)."""

    base: str | None = Field(None, description="the run config every job starts from, "
                             "relative to the sweep file")
    config: dict[str, Any] | None = Field(None, description="an inline run config instead")
    out_dir: str = Field(description="jobs go to OUT_DIR/<job name> (relative to the current "
                         "directory, like a run config's out_dir)")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="dotted key -> values; the jobs are the cartesian "
        "product")
    apply_if: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="grid key -> {other grid key: values}: the key is set "
        "only in jobs whose other keys take one of those values")
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="partial "
                                          "assignments: grid jobs matching one are dropped")
    include: list[dict[str, Any]] = Field(default_factory=list, description="extra jobs, each "
                                          "given by its own assignment of dotted keys")
    upstream: dict[str, UpstreamSpec] = Field(default_factory=dict)
    overrides: list[str] = Field(default_factory=list, description="dotted `key=value` changes "
                                 "for every job and upstream")
    gpus: Literal["auto"] | Annotated[int, Field(ge=0)] | list[int | str] = Field(
        "auto", description="GPUs the workers use: 'auto' (all visible), N (the first N; 0: "
        "none) or a list of CUDA_VISIBLE_DEVICES ids")
    workers: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="0: jobs one after another in this process; N: N subprocesses at a "
        "time, worker i on GPU i mod len(gpus); 'auto': one per GPU when 2+ GPUs, else 0")


def read_sweep_spec(path: Path, out_dir: str | Path | None = None) -> SweepSpec:
    """The validated sweep file (`out_dir` replacing its own); a mistake raises `ConfigError`
    naming the key and the fix."""
    data = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(exc, path) from None
    if out_dir is not None:
        spec = spec.model_copy(update={"out_dir": str(out_dir)})
    _check_spec(spec, path)
    return spec


def _check_spec(spec: SweepSpec, path: Path) -> None:
    """What the field types cannot say: how keys relate to each other."""
    where = f"sweep file {path}"
    sources = [name for name, given in (("base", spec.base is not None),
                                        ("config", spec.config is not None),
                                        ("grid.base", BASE_AXIS in spec.grid)) if given]
    if len(sources) != 1:
        raise ConfigError(f"{where}: the jobs' run config comes from "
                          f"{' and '.join(sources) or 'nowhere'}",
                          "give exactly one of base: FILE, config: {...} or a grid axis "
                          "base: [FILE, ...]")
    if "{" in spec.out_dir or "}" in spec.out_dir:
        raise ConfigError(f"{where}: out_dir {spec.out_dir!r} has braces",
                          "give a plain directory; the sweep names each job's run directory")
    for section, keys in (("grid", list(spec.grid)),
                          ("include", [k for entry in spec.include for k in entry])):
        if "out_dir" in keys:
            raise ConfigError(f"{where}: {section} sets out_dir",
                              "remove it; each job runs in OUT_DIR/<job name>")
    named = [(f"apply_if.{k}", [k, *cond]) for k, cond in spec.apply_if.items()]
    named += [("exclude", list(rule)) for rule in spec.exclude]
    named += [(f"upstream.{n}.inherit", u.inherit) for n, u in spec.upstream.items()]
    for section, keys in named:
        unknown = [k for k in keys if k not in spec.grid]
        if unknown:
            which = "is not a grid key" if len(unknown) == 1 else "are not grid keys"
            known = ", ".join(spec.grid) or "the grid is empty"
            raise ConfigError(f"{where}: {section} names {', '.join(unknown)}, which {which}",
                              f"name grid keys only ({known})")


def _spec_error(exc: ValidationError, path: Path) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model = UpstreamSpec if loc[0] == "upstream" else SweepSpec
        close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
        hint = (f"did you mean {close[0]}?" if close
                else f"valid keys here: {', '.join(model.model_fields)}")
        return ConfigError(f"sweep file {path}: unknown key {key}", f"remove it; {hint}")
    if err["type"] == "missing":
        return ConfigError(f"sweep file {path}: {key} is required", f"set {key}")
    message = err["msg"]
    if loc[0] in _UNIONS:  # pydantic reports one member's complaint: say what is expected
        key, message = loc[0], f"expected {SweepSpec.model_fields[loc[0]].description}"
    return ConfigError(f"sweep file {path}: {key} = {err.get('input')!r} is invalid: {message}",
                       f"change {key} (docs/sweeps_reports.md)")


_UNIONS = ("gpus", "workers")


# ------------------------------------------------------------------------------------------
# Planning: the sweep file -> jobs


@dataclass(frozen=True)
class Job:
    """One run of a sweep."""

    name: str
    kind: Literal["upstream", "grid"]
    # The grid values that made this job (an upstream: the ones it inherited).
    assignment: dict[str, Any]
    run_dir: Path
    config: RunConfig | None  # None: the resolved config is invalid; `error` says why
    error: str | None
    needs: tuple[str, ...]  # names of the upstream jobs it starts from


@dataclass(frozen=True)
class SweepPlan:
    path: Path
    spec: SweepSpec
    out_dir: Path
    jobs: list[Job]  # every upstream before the jobs that need it, then the grid in order


def load_sweep(path: str | Path, overrides: Sequence[str] = (),
               out_dir: str | Path | None = None) -> SweepPlan:
    """Expand a sweep file into jobs, without running anything.

    `overrides` (dotted `key=value`) apply to every job and upstream after everything else;
    `out_dir` replaces the file's. Mistakes in the sweep file raise `ConfigError`; a job whose
    resolved config is invalid is kept with its `error`, so that it fails alone.
    """
    path = Path(path)
    spec = read_sweep_spec(path, out_dir)
    planner = _Planner(path, spec, [parse_override(o) for o in overrides])
    grid = planner.grid_jobs()
    return SweepPlan(path, spec, Path(spec.out_dir), [*planner.upstreams, *grid])


class _Planner:
    def __init__(self, path: Path, spec: SweepSpec, extra: list[tuple[str, Any]]) -> None:
        self.path = path
        self.spec = spec
        self.out_dir = Path(spec.out_dir)
        self.file_overrides = [parse_override(o) for o in spec.overrides]
        self.extra = extra
        self.upstreams: list[Job] = []
        self.by_key: dict[str, Job] = {}  # canonical resolved config -> its job
        self.names: set[str] = set()
        self._bases: dict[str, dict[str, Any]] = {}

    def grid_jobs(self) -> list[Job]:
        spec = self.spec
        jobs: list[Job] = []
        for values in itertools.product(*spec.grid.values()):
            raw = dict(zip(spec.grid, values, strict=True))
            if any(all(raw[k] == v for k, v in rule.items()) for rule in spec.exclude):
                continue
            applied = {k: v for k, v in raw.items() if self._applies(k, raw)}
            # Only keys that vary name a job; a one-value axis is a setting.
            labels = [k for k in applied if len(spec.grid[k]) > 1]
            job = self._job(applied, labels)
            if job is not None:
                jobs.append(job)
        for entry in spec.include:
            job = self._job(dict(entry), list(entry))
            if job is not None:
                jobs.append(job)
        return jobs

    def _applies(self, key: str, raw: dict[str, Any]) -> bool:
        return all(raw[other] in allowed
                   for other, allowed in self.spec.apply_if.get(key, {}).items())

    def _job(self, assignment: dict[str, Any], labels: list[str]) -> Job | None:
        """The job of one assignment, or None when an earlier job has the same config (two
        assignments that differ only in keys `apply_if` dropped)."""
        data = self._base(self._source(assignment))
        apply_overrides(data, [*self.file_overrides,
                               *((k, v) for k, v in assignment.items() if k != BASE_AXIS),
                               *self.extra])
        needs: list[str] = []
        data = self._resolve(data, assignment, needs, ())
        name = _job_name([(k, assignment[k]) for k in labels]) or "run"
        job, new = self._register("grid", name, assignment, data, needs)
        return job if new else None

    def _upstream(self, name: str, assignment: dict[str, Any], stack: tuple[str, ...]) -> Job:
        spec = self.spec.upstream.get(name)
        if spec is None:
            known = ", ".join(self.spec.upstream) or "none defined"
            raise ConfigError(f"sweep file {self.path}: ${{upstream.{name}}} names no upstream "
                              f"run ({known})", f"define upstream.{name}, or fix the name")
        if name in stack:
            raise ConfigError(f"sweep file {self.path}: upstream {name} starts from itself "
                              f"through {' -> '.join(stack)}", "remove the circular reference")
        inherit = list(spec.inherit)
        if spec.config is None and BASE_AXIS in self.spec.grid and BASE_AXIS not in inherit:
            inherit.insert(0, BASE_AXIS)  # built from the job's base: one per base file
        inherited = {k: assignment[k] for k in inherit if k in assignment}
        source = spec.config if spec.config is not None else self._source(assignment)
        data = self._base(source)
        apply_overrides(data, [*self.file_overrides,
                               *((k, v) for k, v in inherited.items() if k != BASE_AXIS),
                               *(parse_override(o) for o in spec.overrides), *self.extra])
        needs: list[str] = []
        data = self._resolve(data, assignment, needs, (*stack, name))
        job_name = "-".join(["upstream", _label("", name),
                             *(_label(k, v) for k, v in inherited.items()
                               if len(self.spec.grid[k]) > 1)])
        job, new = self._register("upstream", job_name, inherited, data, needs)
        if new:
            self.upstreams.append(job)  # after the upstreams it needs itself
        return job

    def _register(self, kind: Literal["upstream", "grid"], name: str,
                  assignment: dict[str, Any], data: dict[str, Any],
                  needs: list[str]) -> tuple[Job, bool]:
        """The job of a resolved config, and whether it is new. Jobs are keyed by their
        validated config (every default filled in): an upstream that many jobs need is one
        job, and a grid assignment that repeats an earlier job's config (one that differs only
        in keys `apply_if` dropped) adds none."""
        try:
            config: RunConfig | None = validate(data)
            error = None
        except ConfigError as err:
            config, error = None, str(err)
        identity = config.model_dump(exclude={"out_dir"}) if config else data
        key = f"{kind}:{_canonical(identity)}"
        if key in self.by_key:
            return self.by_key[key], False
        if name in self.names:  # two assignments whose labels read alike
            name = f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"
        self.names.add(name)
        run_dir = self.out_dir / name
        if config is not None:
            config = config.model_copy(update={"out_dir": str(run_dir)})
        job = Job(name, kind, assignment, run_dir, config, error, tuple(needs))
        self.by_key[key] = job
        return job, True

    def _source(self, assignment: dict[str, Any]) -> str | dict[str, Any]:
        source = assignment.get(BASE_AXIS, self.spec.base if self.spec.base is not None
                                else self.spec.config)
        if source is None:
            raise ConfigError(f"sweep file {self.path}: an include entry has no base while the "
                              "run config comes from the grid axis base",
                              "add base: FILE to the entry")
        return source

    def _base(self, source: str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(source, dict):
            return copy.deepcopy(source)
        if source not in self._bases:  # relative to the sweep file; `extends:` is followed
            self._bases[source] = read_config_file(self.path.parent / source)
        return copy.deepcopy(self._bases[source])

    def _resolve(self, value: Any, assignment: dict[str, Any], needs: list[str],
                 stack: tuple[str, ...]) -> Any:
        """`value` with every `${upstream.NAME}` replaced by that upstream's run directory (the
        instance for this job's inherited values); the upstreams used are added to `needs`."""
        if isinstance(value, dict):
            return {k: self._resolve(v, assignment, needs, stack) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v, assignment, needs, stack) for v in value]
        if not isinstance(value, str):
            return value

        def run_dir(match: re.Match[str]) -> str:
            job = self._upstream(match.group(1), assignment, stack)
            if job.name not in needs:
                needs.append(job.name)
            return str(job.run_dir)

        return REFERENCE.sub(run_dir, value)


def _canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, default=str)


def _job_name(items: Sequence[tuple[str, Any]]) -> str:
    """A readable directory name from grid values: `liu-nl4-op4-s0`."""
    return "-".join(_label(key, value) for key, value in items)


def _label(key: str, value: Any) -> str:
    if isinstance(value, str) and REFERENCE.search(value):  # "${upstream.base}": from-base
        return re.sub(r"[^A-Za-z0-9._+-]", "_", "from-" + "+".join(REFERENCE.findall(value)))
    if key == BASE_AXIS:
        text = Path(str(value)).stem if isinstance(value, str) else _digest(value)
    elif isinstance(value, dict | list):
        text = _digest(value)
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    prefix = "" if key in BARE_LABELS else LABEL_PREFIXES.get(key, key.rsplit(".", 1)[-1])
    return re.sub(r"[^A-Za-z0-9._+-]", "_", prefix + text)


def _digest(value: Any) -> str:
    return hashlib.sha1(_canonical({"v": value}).encode()).hexdigest()[:6]


# ------------------------------------------------------------------------------------------
# Running


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

    def table(self) -> str:
        return format_table(self.jobs)


def run_sweep(path: str | Path, overrides: Sequence[str] = (), workers: int | None = None,
              out_dir: str | Path | None = None) -> SweepResult:
    """Run every job of a sweep file that is not finished yet; returns what became of each.

    `overrides` and `out_dir` as in `load_sweep`; `workers` replaces the file's `workers`.
    Prints progress and a final table. A failed job does not stop the others (jobs that start
    from it are marked upstream_failed); Ctrl-C or SIGTERM stops the sweep after the running
    jobs saved a checkpoint, and raises (`KeyboardInterrupt` or `Interrupted`).
    """
    plan = load_sweep(path, overrides, out_dir)
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


def is_finished(run_dir: Path) -> bool:
    """Training ended and the final scores are written: `results.json` exists and the newest
    checkpoint, if any, says training is done (a run stopped early by `train.stop_after`
    writes the scores of its model so far, but is not finished)."""
    if not (run_dir / "results.json").is_file():
        return False
    latest = CheckpointManager(run_dir).latest()
    if latest is None:  # checkpoints deleted to save space: the results are final
        return True
    try:
        return bool(json.loads((latest / STATE_FILE).read_text()).get("done"))
    except (OSError, ValueError):
        return False


def plan_table(plan: SweepPlan) -> str:
    """What running the sweep now would do with each job (for a dry run)."""
    rows = []
    for job in plan.jobs:
        note: str | None
        if job.error is not None:
            state, note = "invalid", job.error
        elif is_finished(job.run_dir):
            state, note = "finished", _headline(job.run_dir)
        else:
            state = "resume" if (job.run_dir / CONFIG_FILE).is_file() else "train"
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
    elif is_finished(job.run_dir):
        conflict = _config_conflict(job.config, job.run_dir)
        if conflict:
            tracker.set(job, "failed", error=conflict)
        else:
            tracker.set(job, "already_done", result=_headline(job.run_dir))
    else:
        # A directory with a config but no final results is a run that stopped: resume it
        # (from its last checkpoint, or from the start if it saved none).
        return "resume" if (job.run_dir / CONFIG_FILE).is_file() else "train"
    return None


def _config_conflict(config: RunConfig, run_dir: Path) -> str | None:
    """Why the finished run in `run_dir` is not this job's (None if it is): a sweep file edited
    after its runs finished must not pass off old results as new ones."""
    try:
        saved = load_config(run_dir / CONFIG_FILE).model_dump()
    except LatentlabError as err:
        return f"{run_dir} holds a finished run whose config cannot be read ({err.problem})"
    now = config.model_dump()
    for dump in (saved, now):
        for key in RESUMABLE_CHANGES:
            dump["train"].pop(key, None)
    differ = differing_keys(saved, now)
    if not differ:
        return None
    return (f"{run_dir} holds a finished run of another config (it differs in "
            f"{', '.join(differ)}); move that directory away or set out_dir to rerun")


def _headline(run_dir: Path) -> str | None:
    """The run's main score, test split first: "test accuracy 0.412"."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    for split in ("test", "valid"):
        scores = results.get(split)
        if isinstance(scores, dict):
            for metric, fmt in (("accuracy", ".3f"), ("perplexity", ".2f")):
                if isinstance(scores.get(metric), int | float):
                    return f"{split} {metric} {scores[metric]:{fmt}}"
    return None


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
                        result=_headline(job.run_dir))
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
                    result=_headline(job.run_dir))
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
