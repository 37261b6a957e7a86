"""Recipes in plain code: train a run from a config, evaluate a finished run.

`train` builds task -> tokenizer -> backbone -> method, hands the engine a dataset, a collate
function and a validation callback, and scores the best model on the final splits. `evaluate`
scores any method on any list of examples; `load_run` rebuilds a trained method from disk.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any, overload

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, set_seed, tqdm
from torch import Tensor

from latentlab.backbones import (
    add_special_tokens,
    build_backbone,
    build_tokenizer,
    check_tokenizer_matches,
    compile_transformers,
    count_parameters,
    load_pretrained_dir,
    load_saved_tokenizer,
)
from latentlab.config import (
    RunConfig,
    differing_keys,
    dump_config,
    flatten_dotted,
    load_config,
)
from latentlab.engine.checkpoint import (
    BEST_FILE,
    atomic_write_text,
    existing_dir,
    replace_dir,
    run_lock,
)
from latentlab.engine.interface import batch_to
from latentlab.engine.trainer import TIE_BREAK_METRIC, Trainer
from latentlab.errors import ConfigError, DataError, NumericalError, RunError, require_file
from latentlab.methods import METHODS, Method
from latentlab.methods.base import (
    answer_text,
    extract_answer,
    extract_steps,
    prompt_text,
    steps_text,
)
from latentlab.tasks import build_task
from latentlab.tasks.base import Example, Split, Task, resolve_path
from latentlab.tasks.text import TextTask

CONFIG_FILE = "config.yaml"
# What a run writes besides config.yaml and deletes or replaces when it runs again: a directory
# holding any of them but no config.yaml is not a run, and is refused rather than overwritten.
RUN_ENTRIES = ("checkpoints", "best", "metrics.jsonl", "results.json", "environment.json")
# Keys a `--resume` may change: where this invocation ends, how NaNs are handled from now on
# (a run stopped by one continues with `train.on_nonfinite=skip`), how the model runs
# (compiled, replayed from CUDA graphs) and how many processes prepare its batches. `out_dir`
# may change too: a run directory can be moved.
RESUMABLE_CHANGES = ("train.stop_after", "train.on_nonfinite", "train.max_skipped_steps",
                     "train.max_skipped_share", "model.compile", "train.cuda_graphs",
                     "train.data_workers", "train.save_every_minutes", "train.trackers")
TOKENIZER_DOCUMENTS = 200  # documents a text run trains its tokenizer on
TOKENIZER_EXAMPLES = 5_000  # streamed examples a reasoning run trains its tokenizer on
STREAM_ATTEMPTS = 100  # draws per streamed example before every draw is called too long


def make_accelerator(mixed_precision: str, find_unused_parameters: bool = False,
                     trackers: Sequence[str] = (), run_dir: Path | None = None) -> Accelerator:
    if mixed_precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if bf16 else "no"
    elif mixed_precision == "fp16" and not torch.cuda.is_available():
        # Accelerate would train in float32 while config.yaml said fp16.
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU, and none is visible",
                          fix="set train.mixed_precision=auto, no or bf16 (CPUs run bf16)")
    for tracker in trackers:
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"train.trackers names {tracker}, which is not installed",
                              fix=f"pip install {tracker}, or drop it from train.trackers")
    handlers = ([DistributedDataParallelKwargs(find_unused_parameters=True)]
                if find_unused_parameters else [])
    # Processes launched on CPUs alone (torchrun): without `cpu`, accelerate sets up no process
    # group there, and every process takes itself for the main one.
    launched_on_cpus = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers,
                       cpu=launched_on_cpus, log_with=list(trackers) or None,
                       project_dir=run_dir)


def train(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the run `config` describes; returns the final results."""
    run_dir = config.run_dir()
    _check_run_dir(run_dir, config, resume)
    acc = make_accelerator(config.train.mixed_precision,
                           METHODS[config.method.name].ddp_find_unused_parameters(config.method),
                           config.train.trackers, run_dir)
    # One command per run directory (the main process holds it for the run's processes).
    with run_lock(run_dir) if acc.is_main_process else contextlib.nullcontext():
        if acc.is_main_process:
            _check_run_dir(run_dir, config, resume)  # again: another command may have started
        try:
            return _train(config, resume, run_dir, acc)
        finally:
            acc.end_training()


def _train(config: RunConfig, resume: bool, run_dir: Path, acc: Accelerator) -> dict[str, Any]:
    set_seed(config.train.seed)
    task = build_task(config.task)
    text = isinstance(task, TextTask)
    if text:  # pretraining: token windows, judged by perplexity
        sample = islice(task.documents("train"), TOKENIZER_DOCUMENTS)
        method = build_method(config, sample, run_dir)
        train_data = task.windows("train", method.tokenizer)
        valid_data = task.windows("valid", method.tokenizer)
        encode: Any = method.encode_text
    else:
        if config.task.stream and not task.generates:
            raise ConfigError(f"task.stream needs generated data; task {task.name!r} only "
                              "reads files", fix="set task.stream=false")
        train_data = (StreamedEpoch(task, 0, TOKENIZER_EXAMPLES) if config.task.stream
                      else task.load("train"))
        valid_data = task.load("valid")
        for split in config.eval.splits:  # fail now, not after training, on a missing file
            if (path := config.task.path(split)) is not None:
                require_file(resolve_path(path), f"task.{split}",
                             fix=f"set task.{split} to an existing file (or LATENTLAB_SHARED "
                                 "to the folder holding the reference data)")
        texts = (prompt_text(e) + steps_text(e.steps) + answer_text(e) for e in train_data)
        method = build_method(config, texts, run_dir)
        encode = method.encode
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()

    def record_run() -> None:
        # config.yaml makes the directory a run. It is written once training gets going, so
        # that a start that fails (bad data or model, a damaged checkpoint) writes nothing.
        if acc.is_main_process:
            dump_config(config, run_dir / CONFIG_FILE)
            write_environment(run_dir / "environment.json", _resolved_paths(config))
        if config.train.trackers:
            # Trackers take scalar hyperparameters: lists and None as JSON text.
            acc.init_trackers("trackers", config={
                k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
                for k, v in flatten_dotted(config.model_dump(mode="json")).items()})

    n_params = count_parameters(method)
    n_trainable = count_parameters(method, trainable_only=True)
    n_train = config.task.n_train if config.task.stream else len(train_data)
    acc.print(f"[latentlab] {config.method.name} on {config.task.name}: {n_params:,} parameters "
              f"({n_trainable:,} trained), {n_train:,} "
              f"{'fresh streamed examples per epoch' if config.task.stream else 'train'} / "
              f"{len(valid_data):,} valid {'windows' if text else 'examples'}, "
              f"run directory {run_dir}")
    stages = method.stages(config.train.epochs)
    fixed: dict[int, list[dict[str, Any]]] = {}  # a fixed list's features, per stage

    def prepare(stage: int, epoch: int) -> Sequence[dict[str, Any]]:
        if config.task.stream:
            run_epoch = sum(s.epochs for s in stages[:stage]) + epoch
            return StreamedEpoch(task, run_epoch, n_train, encode, config.train.max_length)
        if stage not in fixed:
            fixed.clear()
            features = [encode(e) for e in train_data]
            kept = [f for f in features if feature_length(f) <= config.train.max_length]
            if not kept:
                raise DataError(f"every training example is longer than train.max_length="
                                f"{config.train.max_length} tokens", fix="raise train.max_length")
            if len(kept) < len(features):
                acc.print(f"[latentlab] stage {stage}: skipped {len(features) - len(kept)} "
                          f"examples longer than train.max_length={config.train.max_length}")
            fixed[stage] = kept
        return fixed[stage]

    eval_subset = valid_data[: config.train.eval_samples]

    def validate(step: int) -> dict[str, Any]:
        if text:
            return perplexity(method, eval_subset, config.eval.batch_size)
        metrics = evaluate(method, task, eval_subset, config.eval, acc)[0]
        if not method.scores_held_out_loss():
            return metrics
        # The teacher-forced loss breaks ties between models of equal accuracy.
        loss = validation_loss(method, [encode(e) for e in eval_subset],
                               config.eval.batch_size, acc)
        return {**metrics, TIE_BREAK_METRIC: loss}

    trainer = Trainer(method, config.train, run_dir, acc, method.collate, validate,
                      select_metric="perplexity" if text else "accuracy",
                      select_mode="min" if text else "max")
    state = trainer.fit(stages, prepare, num_examples=n_train, resume=resume,
                        on_start=record_run)
    if not state.done:  # stopped early (train.stop_after): no final scores yet
        acc.print(f"[latentlab] stopped at step {state.step}; continue with --resume")
        return {"task": config.task.name, "method": config.method.name,
                "run_dir": str(run_dir), "stopped_at_step": state.step}

    if state.skipped_steps > config.train.max_skipped_share * state.step:
        raise NumericalError(
            f"{state.skipped_steps} of the run's {state.step} steps were skipped (a non-finite "
            f"loss or gradient, or fp16 overflows), more than train.max_skipped_share="
            f"{config.train.max_skipped_share:g}: the model was mostly not trained, and is not "
            "scored", fix="train again in a new out_dir with a lower train.lr, or "
                          "train.mixed_precision=bf16 or no (docs/reliability.md)")
    if state.skipped_steps:
        acc.print(f"[latentlab] warning: {state.skipped_steps} of {state.step} steps were "
                  "skipped (results.json: skipped_steps)")

    # Score the best model (chosen on validation) on the final splits.
    best, _ = load_run(run_dir, acc.device)
    results: dict[str, Any] = {"task": config.task.name, "method": config.method.name,
                               "model": config.model.name, "run_dir": str(run_dir),
                               "parameters": n_params, "trainable_parameters": n_trainable,
                               "best_step": state.best_step, "steps": state.step,
                               "skipped_steps": state.skipped_steps}
    for split in config.eval.splits:
        with acc.autocast():
            if text:
                windows = valid_data if split == "valid" else task.windows(split, best.tokenizer)
                results[split] = perplexity(best, windows, config.eval.batch_size)
                continue
            examples = valid_data if split == "valid" else task.load(split)
            metrics, rows = evaluate(best, task, examples, config.eval, acc)
        results[split] = metrics
        if acc.is_main_process:
            write_predictions(run_dir / f"predictions-{split}.jsonl", rows)
    if acc.is_main_process:
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
    return results


def feature_length(features: dict[str, Any]) -> int:
    """Tokens of an encoded example (all its id sequences), as `train.max_length` counts."""
    return sum(len(v) for k, v in features.items() if k.endswith("ids"))


class StreamedEpoch(Sequence[Any]):
    """One epoch of a streamed task (`task.stream`): item i is the task's example i of that
    epoch, encoded when `encode` is given. An example longer than `max_length` is replaced by
    another draw for the same index, so every epoch has `n` examples and every run the same."""

    def __init__(self, task: Task, epoch: int, n: int,
                 encode: Callable[[Example], dict[str, Any]] | None = None,
                 max_length: int | None = None) -> None:
        self.task, self.epoch, self.n = task, epoch, n
        self.encode, self.max_length = encode, max_length

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
            if self.max_length is None or feature_length(features) <= self.max_length:
                return features
        raise DataError(f"{STREAM_ATTEMPTS} streamed examples in a row are longer than "
                        f"train.max_length={self.max_length} tokens",
                        fix="raise train.max_length or generate smaller examples")


@torch.no_grad()
def validation_loss(method: Method, features: list[dict[str, Any]], batch_size: int,
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
def perplexity(method: Method, windows: list[list[int]], batch_size: int) -> dict[str, Any]:
    """Validation perplexity of a pretraining run, and by position where the method scores
    positions (the k-th token after the latents): `perplexity_by_position[k-1]`."""
    was_training = method.training
    method.eval()
    sums: dict[str, Tensor] = {}
    count = 0
    for start in range(0, len(windows), batch_size):
        features = [method.encode_text(w) for w in windows[start:start + batch_size]]
        batch = batch_to(method.collate(features), method.device)
        terms = method.text_nll(batch)
        for name, nll in terms.items():
            per_position = nll.flatten(0, -2).sum(0)
            sums[name] = sums[name] + per_position if name in sums else per_position
        count += terms["nll"].flatten(0, -2).shape[0]  # rows of scored positions
    method.train(was_training)
    out: dict[str, Any] = {"n": len(windows)}
    for name, total in sums.items():
        prefix = name.removesuffix("nll")
        out[f"{prefix}perplexity"] = math.exp(float(total.sum()) / (count * total.numel()))
        if name != "nll" or "base_nll" in sums:
            out[f"{prefix}perplexity_by_position"] = (total / count).exp().tolist()
    return out


def build_method(config: RunConfig, training_texts: Iterable[str], run_dir: Path) -> Method:
    """Tokenizer (the run's own on resume), backbone, special tokens, method."""
    method_cls = METHODS[config.method.name]
    saved, new_tokenizer = run_dir / "tokenizer", None
    if config.model.init_from:
        best = _init_source(config)
        backbone, tokenizer = load_pretrained_dir(best / "model",
                                                  config.model.attn_implementation)
    else:
        # Only a directory with config.yaml holds a run: a tokenizer/ without it is left by a
        # start that failed, maybe with another config, and is replaced.
        if (run_dir / CONFIG_FILE).is_file() and saved.is_dir():
            tokenizer = load_saved_tokenizer(saved)
        else:
            tokenizer = build_tokenizer(config.model, training_texts)
            check_tokenizer_matches(config.model, tokenizer)
            # Saved as it is now, before the method adds its tokens (a resumed run then builds
            # the same backbone), once the model has loaded.
            new_tokenizer = copy.deepcopy(tokenizer)
        backbone = build_backbone(config.model, tokenizer, config.train.seed)
    new_tokens = add_special_tokens(tokenizer, backbone, method_cls.special_tokens(config.method))
    method = method_cls(config.method, backbone, tokenizer)
    method.init_new_tokens(new_tokens)
    if new_tokenizer is not None and PartialState().is_main_process:  # one writer per run
        replace_dir(saved, new_tokenizer.save_pretrained)
    if config.model.compile:
        compile_transformers(method)
    return method


def _init_source(config: RunConfig) -> Path:
    """The `best/` directory `model.init_from` names, after checking the run it belongs to
    trained the model this config describes (same architecture and tokenizer)."""
    source = resolve_path(str(config.model.init_from))
    where = f"model.init_from={config.model.init_from}"
    if not (source / CONFIG_FILE).is_file():
        raise ConfigError(f"{where} is not a latentlab run directory (no {CONFIG_FILE})"
                          if source.is_dir() else f"{where} does not exist",
                          fix="point it at the directory of a finished `latentlab train` run")
    before = load_config(source / CONFIG_FILE).model
    compared = ("name", "tokenizer", "tokenizer_vocab_size", "preset_overrides")
    differ = [k for k in compared if getattr(before, k) != getattr(config.model, k)]
    if differ:
        theirs = ", ".join(f"model.{k}={getattr(before, k)}" for k in differ)
        raise ConfigError(f"{where} holds a model with {theirs}, not the one this config "
                          "describes", fix=f"set {theirs}, or start from a run of this model")
    best = existing_dir(source / "best")
    if best is None:
        raise ConfigError(f"{where} has no best/ model",
                          fix="point it at a run directory whose training finished")
    return best


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[Method, RunConfig]:
    """The best model of a finished run, ready for `evaluate`."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise RunError(f"{run_dir} is not a latentlab run directory (no {CONFIG_FILE})"
                       if run_dir.exists() else f"run directory {run_dir} does not exist",
                       fix="give the directory a `latentlab train` run wrote")
    config = load_config(config_file)
    best = existing_dir(run_dir / "best")
    if best is None or not (best / "model").is_dir():
        raise RunError(f"run {run_dir} has no best model yet",
                       fix="let training reach its first validation, or resume it")
    backbone, tokenizer = load_pretrained_dir(best / "model", config.model.attn_implementation)
    method_cls = METHODS[config.method.name]
    add_special_tokens(tokenizer, backbone, method_cls.special_tokens(config.method))
    method = method_cls(config.method, backbone, tokenizer)
    method.load_extra_state(best)
    if config.model.compile:
        compile_transformers(method)
    return method.to(device).eval(), config


@torch.no_grad()
def evaluate(method: Method, task: Task, examples: list[Example], eval_config: Any,
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
                   **task.step_metrics(extract_steps(completion), examples[i])}
            if n_steps is not None:
                row["latent_steps"] = n_steps
            rows.append(row)
    if acc is not None and world > 1:
        from accelerate.utils import gather_object
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


def evaluate_run(run_dir: Path, split: Split = "test", data: Path | None = None,
                 batch_size: int | None = None,
                 max_new_tokens: int | None = None) -> dict[str, Any]:
    """Score a finished run's best model on a split, or on any file of the run's task."""
    options = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    for name, value in options.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} is {value}", fix="give 1 or more")
    acc = make_accelerator("auto")
    method, config = load_run(run_dir, acc.device)
    task = build_task(config.task)
    if isinstance(task, TextTask):
        if data is not None:
            raise DataError("--data is for reasoning tasks; a text run is scored on its "
                            "corpus splits", fix="drop --data, choose --split valid or test")
        metrics = perplexity(method, task.windows(split, method.tokenizer),
                             batch_size or config.eval.batch_size)
        return {"task": config.task.name, "method": config.method.name, "split": split,
                **metrics, "run_dir": str(run_dir)}
    if data is not None:
        examples = task.read_file(resolve_path(data), split)
        if not examples:
            raise DataError(f"{data} holds no examples", fix="give a non-empty data file")
    else:
        examples = task.load(split)
    eval_config = config.eval.model_copy(update={
        k: v for k, v in options.items() if v is not None})
    with acc.autocast():
        metrics, rows = evaluate(method, task, examples, eval_config, acc)
    name = split if data is None else f"{split}-{Path(data).stem}"
    if acc.is_main_process:
        write_predictions(run_dir / f"predictions-{name}.jsonl", rows)
    return {"task": config.task.name, "method": config.method.name, "split": split,
            "data": str(data) if data else None, **metrics, "run_dir": str(run_dir),
            "best_step": best_step(run_dir)}


def best_step(run_dir: Path) -> int | None:
    """The training step whose model `best/` holds (None for runs written before it was
    recorded)."""
    best = existing_dir(run_dir / "best")
    try:
        return int(json.loads((best / BEST_FILE).read_text())["step"]) if best else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> None:
    """Refuse to start where results would be overwritten; `--resume` only the same run."""
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()),
                    None)
    if blocking is not None:
        raise RunError(f"run directory {run_dir} cannot be created: {blocking} is a file",
                       fix="set out_dir=... to a new directory")
    existing = run_dir / CONFIG_FILE
    if not existing.exists():
        # Without config.yaml a directory holds no run (a failed start writes none).
        if run_dir.is_dir() and (found := [n for n in RUN_ENTRIES if (run_dir / n).exists()]):
            raise RunError(f"{run_dir} holds {', '.join(found)} but no {CONFIG_FILE}: it is not "
                           "a latentlab run, and starting one there would overwrite them",
                           fix="set out_dir=... to a new or empty directory")
        if resume:
            runs = sorted(str(p.parent) for p in run_dir.parent.glob(f"*/{CONFIG_FILE}"))
            raise RunError(
                f"--resume found no run to continue in {run_dir} (the out_dir this config and "
                "its overrides give), so nothing was trained"
                + (f"; runs beside it: {', '.join(runs[:5])}" if runs else ""),
                fix="repeat the overrides of the run to continue (or set out_dir=... to its "
                    "directory), or drop --resume to start a new run")
        return
    if not resume:
        raise RunError(f"run directory {run_dir} already holds a run",
                       fix="add --resume to continue it, or set out_dir=... to start another")
    before = load_config(existing).model_dump()
    now = config.model_dump()
    for dump in (before, now):
        dump.pop("out_dir")
        for key in RESUMABLE_CHANGES:
            section, name = key.split(".")
            dump[section].pop(name)
    if before != now:
        changed = differing_keys(before, now)
        raise ConfigError(f"--resume with a config that differs from the run's in "
                          f"{', '.join(changed)}",
                          fix=f"resume with the run's own config ({existing})")


def _resolved_paths(config: RunConfig) -> dict[str, str]:
    """The files a config names, as this invocation found them (`${LATENTLAB_SHARED}` and
    relative paths resolved): config.yaml keeps them as written, so that it travels."""
    named = {f"task.{k}": getattr(config.task, k, None) for k in ("train", "valid", "test")}
    named["model.init_from"] = config.model.init_from
    return {k: str(resolve_path(str(v)).resolve()) for k, v in named.items() if v}


def write_environment(path: Path, paths: dict[str, str] | None = None) -> None:
    """Versions, git commit and hardware of this invocation, and the files its config names,
    resolved, for reproducibility; those of the run's earlier invocations (a resume may run
    elsewhere) move to its `earlier` list."""
    versions = {}
    for pkg in ("latentlab", "torch", "transformers", "accelerate", "tokenizers", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    earlier: list[dict[str, Any]] = []
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            earlier = [*previous.pop("earlier", []), previous]
        except (OSError, ValueError, AttributeError):  # unreadable: this invocation's only
            earlier = []
    env = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "platform": platform.platform(),
           "packages": versions, "git_commit": commit, "gpus": gpus,
           "cpu_count": os.cpu_count(), "argv": sys.argv,
           "latentlab_shared": os.environ.get("LATENTLAB_SHARED"), "paths": paths or {},
           "earlier": earlier}
    atomic_write_text(path, json.dumps(env, indent=1))

