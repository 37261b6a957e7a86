"""Typed run configuration: YAML files plus dotted `key=value` overrides, validated by pydantic.

A run is `task` x `model` x `method` x `train` x `eval`. Task and method sections are tagged
unions keyed by `name`, so each task or method module owns its own options.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from latentlab.engine.config import Section, TrainConfig
from latentlab.errors import ConfigError, not_utf8, require_file
from latentlab.methods import METHOD_CONFIGS
from latentlab.model_config import ModelConfig
from latentlab.tasks import TASK_CONFIGS


class EvalConfig(Section):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    splits: list[Literal["valid", "test"]] = Field(
        default_factory=lambda: ["valid", "test"], description="scored with the best model "
        "when training ends")
    latent_ablations: bool = Field(True, description="score the final splits again with the "
                                   "latent inputs replaced by zeros, their mean, and another "
                                   "question's (`latent_dependence` in results.json), for "
                                   "methods that insert a fixed number of latents")
    flops_examples: int = Field(8, ge=0, description="examples whose forward FLOPs (training "
                                "step and generation, one at a time) the results report, as "
                                "`flops_per_example` (0: not counted)")


# Tagged unions built from the registries: a new task or method module joins automatically.
TaskSection = Annotated[Union[TASK_CONFIGS], Field(discriminator="name")]  # noqa: UP007
MethodSection = Annotated[Union[METHOD_CONFIGS], Field(discriminator="name")]  # noqa: UP007


class RunConfig(Section):
    task: TaskSection  # type: ignore[valid-type]
    method: MethodSection  # type: ignore[valid-type]
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    out_dir: str = Field("runs/{task}-{method}-{model}", description="run directory; "
                         "{task}, {method}, {model} and {seed} are filled in")

    @model_validator(mode="after")
    def _one_way_to_cut_launches(self) -> RunConfig:
        if self.train.cuda_graphs and self.model.compile is True:
            raise ValueError("train.cuda_graphs and model.compile are not supported together; "
                             "choose one")
        return self

    def run_dir(self) -> Path:
        return Path(self.out_dir.format(task=self.task.name, method=self.method.name,
                                        model=Path(self.model.name).name, seed=self.train.seed))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (or start from `base`), apply `a.b.c=value` overrides, validate."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        data = deep_merge(data, read_config_file(Path(path)))
    apply_overrides(data, [parse_override(item) for item in overrides])
    return validate(data)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value read as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value",
                          fix="write e.g. train.lr=3e-4")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], items: Sequence[tuple[str, Any]]) -> None:
    """Set dotted keys in order, a task or method switch (`method.name=...`) first: the
    switch drops the old section's options the new one lacks, never an option given here."""
    switches = ("task.name", "method.name")
    ordered = [i for i in items if i[0] in switches] + [i for i in items if i[0] not in switches]
    for key, value in ordered:
        set_dotted(data, key, copy.deepcopy(value))


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config; `extends: other.yaml` (relative to this file) is read first and this
    file's keys are merged over it, so a variant states only what differs."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path} extends itself through {seen[-1]}",
                          fix="remove the circular `extends`")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return deep_merge(read_config_file(path.parent / str(parent), (*seen, path.resolve())), data)


def read_yaml(path: Path) -> dict[str, Any]:
    require_file(path, "config file", "give the path of a YAML file, e.g. "
                 "configs/countdown_cot.yaml", ConfigError)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, "config file", ConfigError) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({' '.join(str(exc).split())})",
                          fix="repair the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a mapping of sections",
                          fix="write sections such as `task:`, `method:`, `train:`")
    return data


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(*describe_validation_error(exc, data)) from None


def describe_validation_error(exc: ValidationError, data: dict[str, Any]) -> tuple[str, str]:
    """Turn pydantic's report into one problem and one fix, naming the dotted key."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        section = _model_at(loc[:-1], data)
        known = sorted(section.model_fields) if section else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)" if close else \
            f"; valid keys here: {', '.join(known)}"
        return f"unknown config key {key}", f"remove it{hint}"
    if err["type"] == "union_tag_invalid":
        return (f"{key}.name is {err['input'].get('name')!r}, which is not known" if isinstance(
            err["input"], dict) else f"{key} is invalid",
            f"use one of {err['ctx']['expected_tags']}")
    if err["type"] == "union_tag_not_found":
        return f"config section {key} has no `name`", f"set {key}.name"
    if err["type"] == "missing":
        return f"config key {key} is required", f"set {key}"
    if isinstance(err.get("input"), dict):  # a check across a section's keys: name the section
        return (f"config section {key} is invalid: {err['msg'].removeprefix('Value error, ')}",
                f"change the values in {key}")
    return (f"config key {key} = {err.get('input')!r} is invalid: {err['msg']}",
            f"change {key}")


def _model_at(loc: list[str], data: dict[str, Any]) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    node: Any = data
    for part in loc:
        node = node.get(part, {}) if isinstance(node, dict) else {}
        if part in ("task", "method"):
            tags = {c.model_fields["name"].default: c for c in
                    (TASK_CONFIGS if part == "task" else METHOD_CONFIGS)}
            found = tags.get(node.get("name") if isinstance(node, dict) else None)
            if found is None:
                return None
            model = found
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


_UNION_TAGS = {c.model_fields["name"].default for c in (*TASK_CONFIGS, *METHOD_CONFIGS)}


def flatten_dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys (`train.lr`)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested configs, sorted."""
    keys: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += differing_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(prefix + key)
    return keys


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section",
                              fix=f"override {part} itself, not a key inside it")
        node = child
    if len(parts) == 2 and parts[1] == "name":
        node = _switched(parts[0], node, value)
        data[parts[0]] = node
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any], top: bool = True
               ) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            section = _switched(key, out[key], value["name"]) if top and "name" in value \
                else out[key]
            out[key] = deep_merge(section, value, top=False)
        else:
            out[key] = value
    return out


# Options of each task and method, by name, for `_switched`.
_TAGGED_FIELDS: dict[str, dict[str, set[str]]] = {
    section: {cls.model_fields["name"].default: set(cls.model_fields) for cls in classes}
    for section, classes in (("task", TASK_CONFIGS), ("method", METHOD_CONFIGS))}


def _switched(section: str, values: dict[str, Any], name: Any) -> dict[str, Any]:
    """`values` of a task or method section about to be named `name`: switching to another
    task or method keeps only the options the new one has, so a variant (`extends:`, or a sweep
    turning a No-CoT Base's config into pause) does not inherit options it cannot take, such as
    No-CoT's `question_loss`. Options written after the switch are validated as usual."""
    fields = _TAGGED_FIELDS.get(section, {}).get(name)
    if fields is None or values.get("name") in (None, name):
        return values
    return {k: v for k, v in values.items() if k in fields}


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
