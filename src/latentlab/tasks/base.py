"""The task interface: load a split, hand out examples, score a prediction.

A task knows its data (files, generators, hub ids) and how to judge an answer. It knows nothing
about tokens or models: methods decide how an `Example` is laid out as text.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from latentlab.errors import ConfigError, DataError, PathError, not_utf8, require_file
from latentlab.paths import resolve_path

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    """One reasoning problem: question `x`, steps `s_1..s_K` (the CoT) and answer `y`.

    `meta` holds what a task needs to score or analyse the example (Countdown's numbers and
    target, ProsQA's graph, ...). It must be JSON-serialisable.
    """

    question: str
    steps: tuple[str, ...]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "steps": list(self.steps), "answer": self.answer,
                **({"meta": self.meta} if self.meta else {})}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Example:
        return cls(question=row["question"], steps=tuple(row["steps"]), answer=row["answer"],
                   meta=row.get("meta", {}))


class TaskConfig(BaseModel):
    """Options every task shares. A split with no file is generated (where the task can)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    train: str | None = Field(None, description="file for the train split; None: generate")
    valid: str | None = Field(None, description="file for the valid split; None: generate")
    test: str | None = Field(None, description="file for the test split; None: generate")
    n_train: int = Field(20_000, ge=1, description="examples to generate for train")
    n_valid: int = Field(500, ge=1, description="examples to generate for valid")
    n_test: int = Field(1_000, ge=1, description="examples to generate for test")
    seed: int = Field(0, description="seed of the generator (each split derives its own)")
    limit: dict[str, int] = Field(default_factory=dict,
                                  description="keep at most this many rows of a split")
    stream: bool = Field(
        False, description="train on fresh generated examples: every epoch draws n_train new "
        "ones, example i of epoch e seeded by (seed, e, i), so a resumed run sees the same "
        "examples as an uninterrupted one (default: one fixed list re-read every epoch, which "
        "a from-scratch model memorises)")
    curriculum: list[dict[str, Any]] = Field(
        default_factory=list, description="phases of a streamed task, easiest first: each "
        "names `epochs` (how many epochs it lasts) and the task options it changes, e.g. "
        "[{epochs: 2, max_concepts: 10, max_hops: 3}]; later epochs use the options above")

    @model_validator(mode="after")
    def _check_curriculum(self) -> TaskConfig:
        if self.curriculum and not self.stream:
            raise ValueError("a curriculum needs stream: true (it changes what is generated "
                             "per epoch)")
        for phase in self.curriculum:
            epochs = phase.get("epochs")
            if type(epochs) is not int or epochs < 1:
                raise ValueError(f"curriculum phase {phase} needs `epochs`, a positive integer")
            changed = {k for k in phase if k != "epochs"}
            fixed = changed & {"name", "stream", "curriculum", "seed", "train", "valid", "test",
                               "n_train", "n_valid", "n_test", "limit"}
            if fixed:
                raise ValueError(f"curriculum phase {phase} changes {', '.join(sorted(fixed))}, "
                                 "which a phase cannot change")
        return self

    def path(self, split: Split) -> str | None:
        return getattr(self, split)

    def size(self, split: Split) -> int:
        return getattr(self, f"n_{split}")

    def phase_at(self, epoch: int) -> int | None:
        """The curriculum phase of training epoch `epoch` (counted over the whole run); None
        once the phases are over."""
        start = 0
        for index, phase in enumerate(self.curriculum):
            start += phase["epochs"]
            if epoch < start:
                return index
        return None

    def at_epoch(self, epoch: int) -> TaskConfig:
        """The options in force at training epoch `epoch`."""
        index = self.phase_at(epoch)
        if index is None:
            return self
        phase = self.curriculum[index]
        update = {k: v for k, v in phase.items() if k != "epochs"}
        try:
            return type(self).model_validate(
                {**self.model_dump(), **update, "curriculum": [], "stream": True})
        except ValidationError as exc:
            raise ConfigError(f"curriculum phase {phase} of task {self.name!r} is invalid: "
                              f"{exc.errors()[0]['msg']}",
                              fix="correct that phase of task.curriculum") from None


class Task(ABC):
    """A task: where its examples come from and how a predicted answer is judged."""

    name: ClassVar[str]
    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    # What the recipes train on it: reasoning examples scored by accuracy, or text windows
    # scored by perplexity (`latentlab.recipes.RECIPES`).
    kind: ClassVar[Literal["reasoning", "text"]] = "reasoning"

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    def load(self, split: Split) -> list[Example]:
        """The examples of a split: read from the configured file, else generated."""
        path = self.config.path(split)
        if path is not None:
            examples = self.read_file(resolve_path(path), split)
        else:
            examples = self.generate(split, self.config.size(split), self.config.seed)
        if not examples:
            raise DataError(f"the {split} split of task {self.name!r} is empty"
                            + (f" ({path} holds no examples)" if path else ""),
                            fix=f"point task.{split} at a file with at least one example")
        if split in self.config.limit:
            examples = examples[: self.config.limit[split]]
        return examples

    @abstractmethod
    def read(self, path: Path, split: Split) -> list[Example]:
        """Parse a data file of this task."""

    def read_file(self, path: Path, split: Split) -> list[Example]:
        """`read`, with errors that say which task's format the file was read in: the usual
        cause of a malformed row is a file of another task."""
        require_file(path, "data file", "check the path", DataError)
        try:
            return self.read(path, split)
        except DataError as err:
            raise DataError(err.problem, fix=f"{err.fix} (the file is read as {self.name} "
                                             "data)") from None

    def generate(self, split: Split, n: int, seed: int) -> list[Example]:
        """n examples of a split, drawn in order from one generator seeded by (seed, split)."""
        rng = random.Random(f"{self.name}-{seed}-{split}")
        return [self.generate_one(rng, split) for _ in range(n)]

    def generate_one(self, rng: random.Random, split: Split) -> Example:
        """One generated example of a split; tasks that generate data override this."""
        raise DataError(f"task {self.name!r} cannot generate data and task.{split} is not set",
                        fix=f"set task.{split} to a data file")

    @property
    def generates(self) -> bool:
        return type(self).generate_one is not Task.generate_one

    def streamed(self, epoch: int, index: int, attempt: int = 0) -> Example:
        """Training example `index` of epoch `epoch` of a stream (`task.stream`), with the
        options the curriculum sets for that epoch; `attempt` draws a replacement."""
        rng = random.Random(f"{self.name}-{self.config.seed}-stream-{epoch}-{index}-{attempt}")
        return self._at_epoch(epoch).generate_one(rng, "train")

    def _at_epoch(self, epoch: int) -> Task:
        """This task with the options of the curriculum phase of `epoch` (itself without one),
        built once per phase: it serves every example of the phase's epochs."""
        index = self.config.phase_at(epoch)
        if index is None:
            return self
        phases = self.__dict__.setdefault("_phases", {})
        if index not in phases:
            phases[index] = type(self)(self.config.at_epoch(epoch))
        return phases[index]

    def write(self, examples: Iterable[Example], path: Path) -> None:
        """Write examples in the format `read` accepts (JSON lines by default)."""
        write_jsonl((e.to_json() for e in examples), path)

    @abstractmethod
    def score(self, prediction: str, example: Example) -> bool:
        """Whether a predicted answer (the text after the answer marker) is correct."""

    def solutions(self, example: Example) -> list[tuple[str, ...]] | None:
        """Every distinct correct step list of an example (each as the CoT writes it), for
        metrics over solution paths (Latent-SFT's N_eff); None where the task has no
        enumerator."""
        return None

    def step_metrics(self, steps: list[str], example: Example,
                     skipped: int = 0) -> dict[str, float]:
        """Numbers about a model's generated reasoning steps (one string per line), averaged
        over the examples that generated any; none by default. `skipped`: the leading steps
        the model's latents stand for (`Method.steps_in_latents`), so the written ones go on
        from there."""
        return {}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) of a JSON-lines file, with errors that name file and line."""
    require_file(path, "data file", "check the path in the config", DataError)
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg})",
                                    fix="repair or delete that line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno} is not a JSON object",
                                    fix="each line must be one JSON object")
                yield lineno, row
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, "data file", DataError) from None


def require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Raise a DataError naming the first missing field of a data row."""
    for key in keys:
        if key not in row:
            raise DataError(f"{where} has no field {key!r}",
                            fix=f"every row needs the fields {', '.join(keys)}")


def example_from_row(row: dict[str, Any], where: str) -> Example:
    """An `Example` from a row written by `Example.to_json`, checking each field's type."""
    require(row, ("question", "steps", "answer"), where)
    for key in ("question", "answer"):
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} is not a string",
                            fix=f"write {key!r} as a JSON string")
    steps = row["steps"]
    if not isinstance(steps, list) or not all(isinstance(step, str) for step in steps):
        raise DataError(f"{where}: field 'steps' is not a list of strings",
                        fix="write 'steps' as a JSON list of strings")
    if not isinstance(row.get("meta", {}), dict):
        raise DataError(f"{where}: field 'meta' is not an object",
                        fix="write 'meta' as a JSON object")
    return Example.from_json(row)


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """Write rows as JSON lines, atomically (`atomic_text_file`)."""
    with atomic_text_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_text_file(path: Path) -> Iterator[TextIO]:
    """A handle on a temporary sibling of `path` that takes `path`'s place when the block ends
    without error, so no reader ever sees a half-written data file. If the block, or the
    rename, fails, the temporary file is removed and `path` is left as it was."""
    if path.is_dir():  # else the rename would fail and its error would name the temporary file
        raise PathError(f"{path} is a directory, not a file", fix="give the path of a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    handle = tmp.open("w", encoding="utf-8")  # outside `try`: if this fails, nothing to remove
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C too: a stray temporary file would be left for the user
        tmp.unlink(missing_ok=True)
        raise
