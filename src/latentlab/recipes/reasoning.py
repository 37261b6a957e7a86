"""The reasoning recipe: train a method on question / steps / answer examples, select the best
model by validation accuracy, score it by generating answers (`evaluate`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, tqdm

from latentlab.config import EvalConfig, RunConfig
from latentlab.engine.checkpoint import atomic_write_text
from latentlab.engine.interface import batch_to
from latentlab.engine.trainer import TIE_BREAK_METRIC
from latentlab.errors import ConfigError, DataError, require_file
from latentlab.methods import Method
from latentlab.methods.base import (
    Features,
    answer_text,
    extract_answer,
    extract_steps,
    prompt_text,
    steps_text,
)
from latentlab.paths import resolve_path
from latentlab.recipes.building import build_method
from latentlab.recipes.compute import flops_per_example
from latentlab.recipes.dependence import latent_dependence
from latentlab.recipes.pipeline import Pipeline, fixed_list
from latentlab.tasks import Example, Split, Task

TOKENIZER_EXAMPLES = 5_000  # streamed examples a run trains its tokenizer on
STREAM_ATTEMPTS = 100  # draws per streamed example before every draw is called too long


def pipeline(config: RunConfig, task: Task, run_dir: Path, acc: Accelerator) -> Pipeline:
    """The method built for a reasoning run, its data (a fixed list or a stream), validation
    by generated accuracy, final scores with the latent ablations, and its FLOPs."""
    if config.task.stream and not task.generates:
        raise ConfigError(f"task.stream needs generated data; task {task.name!r} only reads "
                          "files", fix="set task.stream=false")
    train_data = (StreamedEpoch(task, 0, TOKENIZER_EXAMPLES) if config.task.stream
                  else task.load("train"))
    valid_data = task.load("valid")
    for split in config.eval.splits:  # fail now, not after training, on a missing file
        if (path := config.task.path(split)) is not None:
            require_file(resolve_path(path), f"task.{split}",
                         fix=f"set task.{split} to an existing file (or LATENTLAB_SHARED to "
                             "the folder holding the reference data)")
    texts = (prompt_text(e) + steps_text(e.steps) + answer_text(e) for e in train_data)
    method = build_method(config, texts, run_dir)
    n_train = config.task.n_train if config.task.stream else len(train_data)
    stages = method.stages(config.train.epochs)
    if config.task.stream:
        def prepare(stage: int, epoch: int) -> Sequence[Features]:
            run_epoch = sum(s.epochs for s in stages[:stage]) + epoch
            return StreamedEpoch(task, run_epoch, n_train, method.encode,
                                 method.feature_length, config.train.max_length)
    else:
        prepare = fixed_list(train_data, method.encode, method.feature_length,
                             config.train.max_length, acc)

    eval_subset = valid_data[: config.train.eval_samples]

    def validate(step: int) -> dict[str, Any]:
        metrics = evaluate(method, task, eval_subset, config.eval, acc)[0]
        if not method.scores_held_out_loss():
            return metrics
        # The teacher-forced loss breaks ties between models of equal accuracy.
        loss = validation_loss(method, [method.encode(e) for e in eval_subset],
                               config.eval.batch_size, acc)
        return {**metrics, TIE_BREAK_METRIC: loss}

    def score(best: Method, split: Split) -> dict[str, Any]:
        examples = valid_data if split == "valid" else task.load(split)
        return scored(best, task, examples, config.eval, acc, run_dir, split)

    def compute(best: Method) -> dict[str, Any]:
        k = config.eval.flops_examples
        return flops_per_example(best, train_data[:k], valid_data[:k], config.eval.max_new_tokens)

    kind = "fresh streamed examples per epoch" if config.task.stream else "train"
    return Pipeline(method, n_train, f"{n_train:,} {kind} / {len(valid_data):,} valid examples",
                    prepare, validate, "accuracy", "max", score, compute)


def evaluate_split(method: Method, config: RunConfig, task: Task, split: Split,
                   data: Path | None, options: dict[str, int], acc: Accelerator,
                   run_dir: Path) -> dict[str, Any]:
    """A finished run's best model on a split, or on any file of its task (`data`); the
    predictions go to `RUN_DIR/predictions-SPLIT[-FILE].jsonl`."""
    if data is not None:
        examples = task.read_file(resolve_path(data), split)
        if not examples:
            raise DataError(f"{data} holds no examples", fix="give a non-empty data file")
    else:
        examples = task.load(split)
    eval_config = config.eval.model_copy(update=options)
    name = split if data is None else f"{split}-{Path(data).stem}"
    metrics = scored(method, task, examples, eval_config, acc, run_dir, name)
    return {**metrics, "data": str(data) if data else None}


def scored(method: Method, task: Task, examples: list[Example], eval_config: EvalConfig,
           acc: Accelerator, run_dir: Path | None, name: str) -> dict[str, Any]:
    """`evaluate`, with the predictions written to `RUN_DIR/predictions-NAME.jsonl`, and the
    accuracy under the latent ablations (`recipes.dependence`) where the method has them."""
    with acc.autocast():
        metrics, rows = evaluate(method, task, examples, eval_config, acc)
        result: dict[str, Any] = dict(metrics)
        if eval_config.latent_ablations and method.has_latent_inputs():
            result["latent_dependence"] = latent_dependence(
                method, task, examples, eval_config.batch_size, eval_config.max_new_tokens,
                acc=acc)
    if acc.is_main_process and run_dir is not None:
        write_predictions(run_dir / f"predictions-{name}.jsonl", rows)
    return result


class StreamedEpoch(Sequence[Any]):
    """One epoch of a streamed task (`task.stream`): item i is the task's example i of that
    epoch, encoded when `encode` is given. An example whose `length` is over `max_length` is
    replaced by another draw for the same index, so every epoch has `n` examples and every run
    the same."""

    def __init__(self, task: Task, epoch: int, n: int,
                 encode: Callable[[Example], Features] | None = None,
                 length: Callable[[Features], int] | None = None,
                 max_length: int | None = None) -> None:
        self.task, self.epoch, self.n = task, epoch, n
        self.encode, self.length, self.max_length = encode, length, max_length

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not 0 <= index < self.n:
            raise IndexError(index)
        for attempt in range(STREAM_ATTEMPTS):
            example = self.task.streamed(self.epoch, index, attempt)
            if self.encode is None:
                return example
            features = self.encode(example)
            if self.length is None or self.max_length is None or \
                    self.length(features) <= self.max_length:
                return features
        raise DataError(f"{STREAM_ATTEMPTS} streamed examples in a row are longer than "
                        f"train.max_length={self.max_length} tokens",
                        fix="raise train.max_length or generate smaller examples")


@torch.no_grad()
def validation_loss(method: Method, features: list[Features], batch_size: int,
                    acc: Accelerator) -> float:
    """Mean teacher-forced training loss over `features`, split across processes and summed
    over them (every process must take the same best-model decision). The global RNG is
    left as it was: a method that samples in its forward must not change training's draws."""
    was_training = method.training
    method.eval()
    total = torch.zeros(2, device=acc.device)  # loss x examples, examples
    mine = features[acc.process_index::acc.num_processes]
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            batch = batch_to(method.collate(chunk), acc.device)
            total += torch.stack([method(batch).loss.float() * len(chunk),
                                  torch.tensor(float(len(chunk)), device=acc.device)])
    method.train(was_training)
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def evaluate(method: Method, task: Task, examples: list[Example], eval_config: EvalConfig,
             acc: Accelerator | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate an answer per example and score it; examples are split across processes.

    Prompts are batched by length (less left padding); rows come back in input order.
    """
    rank, world = (acc.process_index, acc.num_processes) if acc else (0, 1)
    was_training = method.training
    method.eval()
    mine = list(range(rank, len(examples), world))
    mine.sort(key=lambda i: len(examples[i].question))
    rows: list[dict[str, Any]] = []
    size = eval_config.batch_size
    skipped = method.steps_in_latents()
    for start in tqdm(range(0, len(mine), size), desc="eval", leave=False,
                      disable=len(mine) <= size or not sys.stderr.isatty()):
        idx = mine[start:start + size]
        completions, steps = method.generate_with_steps([examples[i] for i in idx],
                                                        eval_config.max_new_tokens)
        for i, completion, n_steps in zip(idx, completions, steps, strict=True):
            answer = extract_answer(completion)
            row = {"index": i, "question": examples[i].question, "gold": examples[i].answer,
                   "completion": completion, "prediction": answer,
                   "correct": task.score(answer, examples[i]),
                   **task.step_metrics(extract_steps(completion), examples[i], skipped)}
            if n_steps is not None:
                row["latent_steps"] = n_steps
            rows.append(row)
    if acc is not None and world > 1:
        rows = gather_object(rows)
    rows.sort(key=lambda r: r["index"])
    method.train(was_training)
    n = len(rows)
    accuracy = sum(r["correct"] for r in rows) / n if n else 0.0
    metrics: dict[str, float] = {"accuracy": accuracy, "n": n}
    # Per-row numbers (Latent-SFT's #L, a task's step metrics), averaged over the rows that
    # have them: a model that wrote no steps has no step metrics.
    names = sorted({k for r in rows for k in r} - {"index", "question", "gold", "completion",
                                                    "prediction", "correct"})
    for name in names:
        values = [r[name] for r in rows if name in r]
        metrics[name] = sum(values) / len(values)
    return metrics, rows


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
