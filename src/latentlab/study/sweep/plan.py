"""Planning a sweep: the sweep file -> jobs, each a validated `RunConfig` with its own run
directory `OUT_DIR/<job name>`, upstream runs (`${upstream.NAME}`) before the jobs that need
them. Nothing runs here."""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from latentlab.config import (
    RunConfig,
    apply_overrides,
    parse_override,
    read_config_file,
    validate,
)
from latentlab.errors import ConfigError
from latentlab.study.sweep.spec import (
    BASE_AXIS,
    JOB_KEY,
    REFERENCE,
    SweepSpec,
    read_sweep_spec,
)

# Short prefixes for job names (`liu-nl4-op4-s0`); other keys use their last part.
LABEL_PREFIXES = {"method.latent_budget": "nl", "task.operands": "op", "train.seed": "s",
                  "method.orthogonality": "lam", "method.chunk_size": "r"}
UPSTREAM_PREFIX = "upstream-"  # upstream jobs are named UPSTREAM_PREFIX + their name
BARE_LABELS = ("method.name", "task.name", "model.name", BASE_AXIS)  # the value says it all


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


def select(plan: SweepPlan, names: Sequence[str]) -> SweepPlan:
    """The plan cut to the jobs named, each by its name or a shell-style pattern (`liu-*-s0`),
    and the upstream jobs they need, transitively, in plan order (a part of a sweep that fits
    one machine's time); a name or pattern that matches no job raises `ConfigError` listing
    the jobs."""
    by_name = {job.name: job for job in plan.jobs}
    matched = {n: fnmatch.filter(by_name, n) for n in names}
    unknown = [n for n, found in matched.items() if not found]
    if unknown:
        raise ConfigError(f"the sweep {plan.path} has no job {', '.join(unknown)}",
                          fix=f"choose from {', '.join(by_name)}")
    wanted: set[str] = set()
    stack = [job for found in matched.values() for job in found]
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(by_name[name].needs)
    return SweepPlan(plan.path, plan.spec, plan.out_dir,
                     [job for job in plan.jobs if job.name in wanted])


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
        # No grid: one job of the base config, unless `include` lists the jobs.
        grid = [] if not spec.grid and spec.include else itertools.product(*spec.grid.values())
        for values in grid:
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
            assignment = {k: v for k, v in entry.items() if k != JOB_KEY}
            job = self._job(assignment, list(assignment), entry.get(JOB_KEY))
            if job is not None:
                jobs.append(job)
        return jobs

    def _applies(self, key: str, raw: dict[str, Any]) -> bool:
        return all(raw[other] in allowed
                   for other, allowed in self.spec.apply_if.get(key, {}).items())

    def _job(self, assignment: dict[str, Any], labels: list[str],
             name: str | None = None) -> Job | None:
        """The job of one assignment, or None when an earlier job has the same config (two
        assignments that differ only in keys `apply_if` dropped)."""
        data = self._base(self._source(assignment))
        apply_overrides(data, [*self.file_overrides,
                               *((k, v) for k, v in assignment.items() if k != BASE_AXIS),
                               *self.extra])
        needs: list[str] = []
        data = self._resolve(data, assignment, needs, ())
        name = name or _job_name([(k, assignment[k]) for k in labels]) or "run"
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
        job_name = UPSTREAM_PREFIX + "-".join([_label("", name), *(
            _label(k, v) for k, v in inherited.items() if len(self.spec.grid[k]) > 1)])
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
