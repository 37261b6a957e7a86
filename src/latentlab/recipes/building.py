"""Builders shared by the recipes: the accelerator, a method from a config, a trained method from
its run directory, and the other runs a method reads (`Method.upstream_options`)."""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs

from latentlab.backbones import (
    add_special_tokens,
    build_backbone,
    build_tokenizer,
    check_tokenizer_matches,
    compile_transformers,
    load_pretrained_dir,
    load_saved_tokenizer,
)
from latentlab.config import RunConfig
from latentlab.engine.checkpoint import existing_dir, replace_dir
from latentlab.errors import ConfigError, RunError
from latentlab.methods import METHODS, Method, UpstreamRun
from latentlab.paths import resolve_path
from latentlab.recipes.run_dir import CONFIG_FILE, RunDir
from latentlab.tasks import build_task
from latentlab.token_shift import shift_width


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


def method_class(config: RunConfig) -> type[Method]:
    """The class that runs the config's method (a method may have variants, see
    `Method.implementation`)."""
    return METHODS[config.method.name].implementation(config.method)


def compiles(config: RunConfig, cls: type[Method], device_type: str) -> bool:
    """Whether a training run compiles its bodies: `model.compile`, where 'auto' compiles on
    CUDA the methods whose step it pays for (`Method.compile_pays`), and not under CUDA graphs
    (they record the eager step)."""
    if config.model.compile == "auto":
        return device_type == "cuda" and cls.compile_pays and not config.train.cuda_graphs
    return config.model.compile


def build_method(config: RunConfig, training_texts: Iterable[str], run_dir: Path) -> Method:
    """Tokenizer (the run's own on resume), backbone, special tokens, method."""
    cls = method_class(config)
    saved, new_tokenizer = run_dir / "tokenizer", None
    if config.model.init_from:
        best = _init_source(config)
        backbone, tokenizer = load_pretrained_dir(best / "model",
                                                  config.model.attn_implementation)
    else:
        # Only a directory with config.yaml holds a run: a tokenizer/ without it is left by a
        # start that failed, maybe with another config, and is replaced.
        if RunDir(run_dir).is_run() and saved.is_dir():
            tokenizer = load_saved_tokenizer(saved)
        else:
            tokenizer = build_tokenizer(config.model, training_texts)
            check_tokenizer_matches(config.model, tokenizer)
            # Saved as it is now, before the method adds its tokens (a resumed run then builds
            # the same backbone), once the model has loaded.
            new_tokenizer = copy.deepcopy(tokenizer)
        backbone = build_backbone(config.model, tokenizer, config.train.seed)
    shift = shift_width(backbone.config)
    if shift and not cls.token_shift_ok:
        raise ConfigError(f"method {cls.name!r} cannot run a backbone with a token shift "
                          f"(model.token_shift={shift}): its passes do not keep each "
                          "sequence's columns in order", fix="use a backbone without one "
                          "(model.token_shift=0, a model.init_from run trained without it)")
    new_tokens = add_special_tokens(tokenizer, backbone, cls.special_tokens(config.method))
    method = cls(config.method, backbone, tokenizer)
    method.init_new_tokens(new_tokens)
    method.run_opener = partial(open_upstream, method)
    for option in method.upstream_options():  # fail now, not after the first epoch
        open_upstream(method, option)
    if new_tokenizer is not None and PartialState().is_main_process:  # one writer per run
        replace_dir(saved, new_tokenizer.save_pretrained)
    if compiles(config, cls, PartialState().device.type):
        compile_transformers(method, config.model.compile_scope)
    return method


def _init_source(config: RunConfig) -> Path:
    """The `best/` directory `model.init_from` names, after checking the run it belongs to
    trained the model this config describes (same architecture and tokenizer)."""
    source = RunDir(resolve_path(str(config.model.init_from)))
    where = f"model.init_from={config.model.init_from}"
    if not source.is_run():
        raise ConfigError(f"{where} is not a latentlab run directory (no {CONFIG_FILE})"
                          if source.path.is_dir() else f"{where} does not exist",
                          fix="point it at the directory of a finished `latentlab train` run")
    before = source.config().model
    compared = ("name", "tokenizer", "tokenizer_vocab_size", "preset_overrides", "token_shift")
    differ = [k for k in compared if getattr(before, k) != getattr(config.model, k)]
    if differ:
        theirs = ", ".join(f"model.{k}={getattr(before, k)}" for k in differ)
        raise ConfigError(f"{where} holds a model with {theirs}, not the one this config "
                          "describes", fix=f"set {theirs}, or start from a run of this model")
    best = existing_dir(source.path / "best")
    if best is None:
        raise ConfigError(f"{where} has no best/ model",
                          fix="point it at a run directory whose training finished")
    return best


def starts_from(config: RunConfig) -> str | None:
    """The method of the run `model.init_from` names; None for random initialisation."""
    if not config.model.init_from:
        return None
    return RunDir(resolve_path(str(config.model.init_from))).config().method.name


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[Method, RunConfig]:
    """The best model of a finished run, ready for `evaluate`."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise RunError(f"{run_dir} is not a latentlab run directory (no {CONFIG_FILE})"
                       if run_dir.exists() else f"run directory {run_dir} does not exist",
                       fix="give the directory a `latentlab train` run wrote")
    config = run.config()
    best = run.best()
    if best is None:
        raise RunError(f"run {run_dir} has no best model yet",
                       fix="let training reach its first validation, or resume it")
    backbone, tokenizer = load_pretrained_dir(best / "model", config.model.attn_implementation)
    cls = method_class(config)
    add_special_tokens(tokenizer, backbone, cls.special_tokens(config.method))
    method = cls(config.method, backbone, tokenizer)
    method.load_extra_state(best)
    method.run_opener = partial(open_upstream, method)
    if config.model.compile is True:  # scoring alone: a minute of compiling would not pay
        compile_transformers(method, config.model.compile_scope)
    return method.to(device).eval(), config


def open_upstream(method: Method, option: str) -> UpstreamRun:
    """The run directory the method option `option` names, opened for the method: its config
    is read now, its model when the method asks for it (on the method's device)."""
    where = f"method.{option}={getattr(method.config, option)}"
    run = RunDir(resolve_path(str(getattr(method.config, option))))
    if not run.is_run():
        raise ConfigError(f"{where} is not a run directory",
                          fix="give the directory of a finished latentlab run")
    config = run.config()
    return UpstreamRun(option=option, run_dir=run.path, method_config=config.method,
                       task=build_task(config.task), batch_size=config.eval.batch_size,
                       load=lambda: load_run(run.path, method.device)[0])
