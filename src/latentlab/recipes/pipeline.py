"""What a recipe hands the shared training command (`training.train`) for one kind of task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from latentlab.config import RunConfig
from latentlab.errors import DataError
from latentlab.methods import Method
from latentlab.methods.base import Features
from latentlab.tasks import Split, Task


@dataclass
class Pipeline:
    """A run's data and judgement: the engine's `prepare` and `validate`, how the best model
    is chosen, and how it is scored on a final split."""

    method: Method
    n_train: int  # training examples (or windows) per epoch
    description: str  # the data, for the start-up line
    prepare: Callable[[int, int], Sequence[Features]]  # (stage, epoch) -> encoded examples
    validate: Callable[[int], dict[str, Any]]  # step -> validation metrics
    select_metric: str
    select_mode: str  # "max" or "min"
    score: Callable[[Method, Split], dict[str, Any]]  # the best model on a final split
    # The best model's forward FLOPs per example (`recipes.compute`), where the kind of task
    # has them.
    compute: Callable[[Method], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Recipe:
    """One pipeline per kind of task (`Task.kind`): how to train a run, how to score a
    finished run's best model on a split or on a file."""

    pipeline: Callable[[RunConfig, Task, Path, Accelerator], Pipeline]
    evaluate: Callable[[Method, RunConfig, Task, Split, Path | None, dict[str, int],
                        Accelerator, Path], dict[str, Any]]


def fixed_list(items: Sequence[Any], encode: Callable[[Any], Features],
               length: Callable[[Features], int], max_length: int,
               acc: Accelerator) -> Callable[[int, int], Sequence[Features]]:
    """The engine's `prepare` for a fixed list of examples or windows: encoded once per
    curriculum stage (encoding may depend on the stage), without those whose `length` is over
    `max_length`."""
    cache: dict[int, list[Features]] = {}

    def prepare(stage: int, epoch: int) -> Sequence[Features]:
        if stage not in cache:
            cache.clear()
            features = [encode(item) for item in items]
            kept = [f for f in features if length(f) <= max_length]
            if not kept:
                raise DataError(f"every training example is longer than train.max_length="
                                f"{max_length} tokens", fix="raise train.max_length")
            if len(kept) < len(features):
                acc.print(f"[latentlab] stage {stage}: skipped {len(features) - len(kept)} "
                          f"examples longer than train.max_length={max_length}")
            cache[stage] = kept
        return cache[stage]

    return prepare
