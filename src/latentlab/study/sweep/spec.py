"""The sweep file: what it may hold (`SweepSpec`), read and checked with errors that name the
key and the fix (docs/sweeps_reports.md)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latentlab.config import read_yaml
from latentlab.errors import ConfigError

BASE_AXIS = "base"  # the grid key whose values are run config files, not config keys
JOB_KEY = "job"  # an include entry's optional name (otherwise made from its values)
REFERENCE = re.compile(r"\$\{upstream\.([^}]*)\}")  # `${upstream.NAME}` in a config value


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

    description: str | None = Field(None, description="what the sweep measures, in words "
                                    "(the demo writes it into its report)")
    base: str | None = Field(None, description="the run config every job starts from, "
                             "relative to the sweep file")
    config: dict[str, Any] | None = Field(None, description="an inline run config instead")
    out_dir: str = Field(description="jobs go to OUT_DIR/<job name> (relative to the current "
                         "directory, like a run config's out_dir)")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="dotted key -> values; the jobs are the cartesian "
        "product (no grid: one job of the base config, or only the `include` jobs)")
    apply_if: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="grid key -> {other grid key: values}: the key is set "
        "only in jobs whose other keys take one of those values")
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="partial "
                                          "assignments: grid jobs matching one are dropped")
    include: list[dict[str, Any]] = Field(default_factory=list, description="extra jobs, each "
                                          "given by its own assignment of dotted keys (and "
                                          f"optionally `{JOB_KEY}: NAME`, the job's name)")
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
