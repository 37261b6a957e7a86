"""`train` and `evaluate_run`: the commands every recipe shares. The task's kind picks the
recipe (`RECIPES`); the recipe builds the method and says what its data and scores are; the
engine trains; the best model is scored on the final splits."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from latentlab.backbones import count_parameters
from latentlab.config import RunConfig, flatten_dotted
from latentlab.engine.trainer import Trainer
from latentlab.errors import ConfigError, NumericalError
from latentlab.recipes import pretraining, reasoning
from latentlab.recipes.building import load_run, make_accelerator, method_class, starts_from
from latentlab.recipes.pipeline import Recipe
from latentlab.recipes.run_dir import RunDir
from latentlab.tasks import Split, build_task

RECIPES: dict[str, Recipe] = {
    "reasoning": Recipe(reasoning.pipeline, reasoning.evaluate_split),
    "text": Recipe(pretraining.pipeline, pretraining.evaluate_split),
}


def train(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the run `config` describes; returns the final results."""
    run = RunDir(config.run_dir())
    run.check_start(config, resume)
    acc = make_accelerator(config.train.mixed_precision,
                           method_class(config).ddp_find_unused_parameters(config.method),
                           config.train.trackers, run.path)
    # One command per run directory (the main process holds it for the run's processes).
    with run.lock() if acc.is_main_process else contextlib.nullcontext():
        if acc.is_main_process:
            run.check_start(config, resume)  # again: another command may have started
        try:
            return _train(config, resume, run, acc)
        finally:
            acc.end_training()


def _train(config: RunConfig, resume: bool, run: RunDir, acc: Accelerator) -> dict[str, Any]:
    set_seed(config.train.seed)
    task = build_task(config.task)
    pipeline = RECIPES[task.kind].pipeline(config, task, run.path, acc)
    method = pipeline.method
    # Read now, while the upstream run surely exists (building the method just loaded it): a
    # run whose upstream moves away meanwhile still writes its results.
    origin = starts_from(config)
    if acc.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()

    def record_run() -> None:
        # config.yaml makes the directory a run. It is written once training gets going, so
        # that a start that fails (bad data or model, a damaged checkpoint) writes nothing.
        if acc.is_main_process:
            run.write_config(config)
            run.write_environment(config)
        if config.train.trackers:
            # Trackers take scalar hyperparameters: lists and None as JSON text.
            acc.init_trackers("trackers", config={
                k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
                for k, v in flatten_dotted(config.model_dump(mode="json")).items()})

    n_params = count_parameters(method)
    n_trainable = count_parameters(method, trainable_only=True)
    acc.print(f"[latentlab] {config.method.name} on {config.task.name}: {n_params:,} parameters "
              f"({n_trainable:,} trained), {pipeline.description}, run directory {run.path}")
    trainer = Trainer(method, config.train, run.path, acc, method.collate, pipeline.validate,
                      select_metric=pipeline.select_metric, select_mode=pipeline.select_mode)
    state = trainer.fit(method.stages(config.train.epochs), pipeline.prepare,
                        num_examples=pipeline.n_train, resume=resume, on_start=record_run)
    if not state.done:  # stopped early (train.stop_after): no final scores yet
        acc.print(f"[latentlab] stopped at step {state.step}; continue with --resume")
        return {"task": config.task.name, "method": config.method.name,
                "run_dir": str(run.path), "stopped_at_step": state.step}

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
    best, _ = load_run(run.path, acc.device)
    results: dict[str, Any] = {"task": config.task.name, "method": config.method.name,
                               "model": config.model.name, "run_dir": str(run.path),
                               "starts_from": origin,
                               "parameters": n_params, "trainable_parameters": n_trainable,
                               "latent_budget": method.latent_budget(),
                               "best_step": state.best_step, "steps": state.step,
                               "skipped_steps": state.skipped_steps}
    # Eagerly, as validation: a compiled model's generation would compile its own call forms
    # (a prefill per length, a decode over each layer's cache) for one pass over the data.
    with torch.compiler.set_stance("force_eager"):
        for split in config.eval.splits:
            results[split] = pipeline.score(best, split)
    if pipeline.compute is not None and config.eval.flops_examples:
        results["flops_per_example"] = pipeline.compute(best)
    if acc.is_main_process:
        run.write_results(results)
    return results


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
    given = {k: v for k, v in options.items() if v is not None}
    metrics = RECIPES[task.kind].evaluate(method, config, task, split, data, given, acc,
                                          run_dir)
    return {"task": config.task.name, "method": config.method.name, "split": split,
            **metrics, "run_dir": str(run_dir), "best_step": RunDir(run_dir).best_step()}
