"""Recipes in plain code: train a run from a config, evaluate a finished run.

`train` builds task -> tokenizer -> backbone -> method, hands the engine a dataset, a collate
function and a validation callback, and scores the best model on the final splits. `evaluate`
scores any method on any list of examples; `load_run` rebuilds a trained method from disk.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed, tqdm

from latentlab.backbones import (
    add_special_tokens,
    build_backbone,
    build_tokenizer,
    count_parameters,
    load_pretrained_dir,
)
from latentlab.config import RunConfig, dump_config, load_config
from latentlab.engine.checkpoint import atomic_write_text
from latentlab.engine.trainer import Trainer
from latentlab.errors import ConfigError, DataError, RunError
from latentlab.methods import METHODS, Method
from latentlab.methods.base import answer_text, extract_answer, prompt_text, steps_text
from latentlab.tasks import build_task
from latentlab.tasks.base import Example, Split, Task, resolve_path

CONFIG_FILE = "config.yaml"


def make_accelerator(mixed_precision: str) -> Accelerator:
    if mixed_precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if bf16 else "no"
    return Accelerator(mixed_precision=mixed_precision)


def train(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the run `config` describes; returns the final results."""
    run_dir = config.run_dir()
    _check_run_dir(run_dir, config, resume)
    acc = make_accelerator(config.train.mixed_precision)
    set_seed(config.train.seed)
    task = build_task(config.task)
    train_set, valid_set = task.load("train"), task.load("valid")
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / CONFIG_FILE)
        write_environment(run_dir / "environment.json")
    acc.wait_for_everyone()

    method = build_method(config, train_set, run_dir)
    n_params = count_parameters(method)
    n_trainable = count_parameters(method, trainable_only=True)
    acc.print(f"[latentlab] {config.method.name} on {config.task.name}: {n_params:,} parameters "
              f"({n_trainable:,} trained), {len(train_set):,} train / {len(valid_set):,} valid "
              f"examples, run directory {run_dir}")

    def prepare(stage: int) -> list[dict[str, Any]]:
        features = [method.encode(e) for e in train_set]
        kept = [f for f in features if len(f["input_ids"]) <= config.train.max_length]
        if not kept:
            raise DataError(f"every training example is longer than train.max_length="
                            f"{config.train.max_length} tokens", fix="raise train.max_length")
        if len(kept) < len(features):
            acc.print(f"[latentlab] stage {stage}: skipped {len(features) - len(kept)} examples "
                      f"longer than train.max_length={config.train.max_length}")
        return kept

    eval_subset = valid_set[: config.train.eval_samples]

    def validate(step: int) -> dict[str, float]:
        metrics, _ = evaluate(method, task, eval_subset, config.eval, acc)
        return metrics

    trainer = Trainer(method, config.train, run_dir, acc, method.collate, validate)
    stages = method.stages(config.train.epochs)
    trainer.fit(stages, prepare, num_examples=len(train_set), resume=resume)

    # Score the best model (chosen on validation) on the final splits.
    best, _ = load_run(run_dir, acc.device)
    results: dict[str, Any] = {"task": config.task.name, "method": config.method.name,
                               "model": config.model.name, "run_dir": str(run_dir),
                               "parameters": n_params, "trainable_parameters": n_trainable}
    for split in config.eval.splits:
        examples = valid_set if split == "valid" else task.load(split)
        with acc.autocast():
            metrics, rows = evaluate(best, task, examples, config.eval, acc)
        results[split] = metrics
        if acc.is_main_process:
            write_predictions(run_dir / f"predictions-{split}.jsonl", rows)
    if acc.is_main_process:
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
    return results


def build_method(config: RunConfig, train_set: list[Example], run_dir: Path) -> Method:
    """Tokenizer (reused from the run dir on resume), backbone, special tokens, method."""
    method_cls = METHODS[config.method.name]
    if config.model.init_from:
        source = resolve_path(config.model.init_from) / "best"
        if not source.is_dir():
            raise ConfigError(f"model.init_from={config.model.init_from} has no best/ model",
                              fix="point it at a run directory whose training finished")
        backbone, tokenizer = load_pretrained_dir(source / "model",
                                                  config.model.attn_implementation)
    else:
        saved = run_dir / "tokenizer"
        if saved.is_dir():  # resume: the exact tokenizer the run started with
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(saved))
        else:
            texts = (prompt_text(e) + steps_text(e.steps) + answer_text(e) for e in train_set)
            tokenizer = build_tokenizer(config.model, texts)
            tokenizer.save_pretrained(str(saved))
        backbone = build_backbone(config.model, tokenizer, config.train.seed)
    add_special_tokens(tokenizer, backbone, method_cls.special_tokens(config.method))
    return method_cls(config.method, backbone, tokenizer)


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[Method, RunConfig]:
    """The best model of a finished run, ready for `evaluate`."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise RunError(f"{run_dir} is not a latentlab run directory (no {CONFIG_FILE})",
                       fix="give the directory a `latentlab train` run wrote")
    config = load_config(config_file)
    best = run_dir / "best"
    if not (best / "model").is_dir():
        raise RunError(f"run {run_dir} has no best model yet",
                       fix="let training reach its first validation, or resume it")
    backbone, tokenizer = load_pretrained_dir(best / "model", config.model.attn_implementation)
    method_cls = METHODS[config.method.name]
    add_special_tokens(tokenizer, backbone, method_cls.special_tokens(config.method))
    method = method_cls(config.method, backbone, tokenizer)
    method.load_extra_state(best)
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
        completions = method.generate([examples[i] for i in idx], eval_config.max_new_tokens)
        for i, completion in zip(idx, completions, strict=True):
            answer = extract_answer(completion)
            rows.append({"index": i, "question": examples[i].question,
                         "gold": examples[i].answer, "completion": completion,
                         "prediction": answer, "correct": task.score(answer, examples[i])})
    if acc is not None and world > 1:
        from accelerate.utils import gather_object
        rows = gather_object(rows)
    rows.sort(key=lambda r: r["index"])
    method.train(was_training)
    n = len(rows)
    accuracy = sum(r["correct"] for r in rows) / n if n else 0.0
    return {"accuracy": accuracy, "n": n}, rows


def evaluate_run(run_dir: Path, split: Split = "test", data: Path | None = None,
                 batch_size: int | None = None,
                 max_new_tokens: int | None = None) -> dict[str, Any]:
    """Score a finished run's best model on a split, or on any file of the run's task."""
    acc = make_accelerator("auto")
    method, config = load_run(run_dir, acc.device)
    task = build_task(config.task)
    if data is not None:
        examples = task.read(resolve_path(data), split)
        if not examples:
            raise DataError(f"{data} holds no examples", fix="give a non-empty data file")
    else:
        examples = task.load(split)
    eval_config = config.eval.model_copy(update={
        k: v for k, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens))
        if v is not None})
    with acc.autocast():
        metrics, rows = evaluate(method, task, examples, eval_config, acc)
    name = split if data is None else f"{split}-{Path(data).stem}"
    if acc.is_main_process:
        write_predictions(run_dir / f"predictions-{name}.jsonl", rows)
    return {"task": config.task.name, "method": config.method.name, "split": split,
            "data": str(data) if data else None, "n": metrics["n"],
            "accuracy": metrics["accuracy"], "run_dir": str(run_dir)}


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> None:
    existing = run_dir / CONFIG_FILE
    if not resume and existing.exists():
        raise RunError(f"run directory {run_dir} already holds a run",
                       fix="add --resume to continue it, or set out_dir=... to start another")
    if resume and existing.exists():
        before = load_config(existing).model_dump()
        now = config.model_dump()
        # Where the invocation ends may change between invocations; nothing else may.
        before["train"].pop("stop_after"), now["train"].pop("stop_after")
        if before != now:
            changed = _diff_keys(before, now)
            raise ConfigError(f"--resume with a config that differs from the run's in "
                              f"{', '.join(changed)}",
                              fix=f"resume with the run's own config ({existing})")


def _diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(prefix + key)
    return keys


def write_environment(path: Path) -> None:
    """Versions, git commit and hardware of this run, for reproducibility."""
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
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "packages": versions, "git_commit": commit, "gpus": gpus,
           "cpu_count": os.cpu_count(), "argv": sys.argv}
    atomic_write_text(path, json.dumps(env, indent=1))

