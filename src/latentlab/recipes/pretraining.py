"""The pretraining recipe: train on windows of plain text, select and score by perplexity."""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from latentlab.config import RunConfig
from latentlab.engine.interface import batch_to
from latentlab.errors import DataError
from latentlab.methods import Method
from latentlab.recipes.building import build_method
from latentlab.recipes.pipeline import Pipeline, fixed_list
from latentlab.tasks import Split, Task, TextTask

TOKENIZER_DOCUMENTS = 200  # documents a run trains its tokenizer on


def pipeline(config: RunConfig, task: Task, run_dir: Path, acc: Accelerator) -> Pipeline:
    assert isinstance(task, TextTask)  # RECIPES maps text tasks here
    method = build_method(config, islice(task.documents("train"), TOKENIZER_DOCUMENTS), run_dir)
    train_data = task.windows("train", method.tokenizer)
    valid_data = task.windows("valid", method.tokenizer)
    eval_subset = valid_data[: config.train.eval_samples]

    def score(best: Method, split: Split) -> dict[str, Any]:
        windows = valid_data if split == "valid" else task.windows(split, best.tokenizer)
        with acc.autocast():
            return perplexity(best, windows, config.eval.batch_size)

    return Pipeline(
        method, len(train_data), f"{len(train_data):,} train / {len(valid_data):,} valid "
        "windows",
        prepare=fixed_list(train_data, method.encode_text, method.feature_length,
                           config.train.max_length, acc),
        validate=lambda step: perplexity(method, eval_subset, config.eval.batch_size),
        select_metric="perplexity", select_mode="min", score=score)


def evaluate_split(method: Method, config: RunConfig, task: Task, split: Split,
                   data: Path | None, options: dict[str, int], acc: Accelerator,
                   run_dir: Path) -> dict[str, Any]:
    """A finished run's perplexity on a split of its corpus."""
    assert isinstance(task, TextTask)
    if data is not None:
        raise DataError("--data is for reasoning tasks; a text run is scored on its corpus "
                        "splits", fix="drop --data, choose --split valid or test")
    with acc.autocast():
        return perplexity(method, task.windows(split, method.tokenizer),
                          options.get("batch_size", config.eval.batch_size))


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
