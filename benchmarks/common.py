"""Shared pieces of the benchmarks: a word-level tokenizer with exact lengths, a timer, an
operator profile."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from latentlab.backbones import EOS, PAD
from latentlab.engine.profiling import operator_table, profiler_for

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word `w<i>`; `###` is a word too."""
    words = {EOS: 0, PAD: 1, "<unk>": 2, "###": 3} | {f"w{i}": i + 4 for i in range(vocab - 4)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.warmup_seconds = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mean_seconds(self, fn: Callable[[], Any], steps: int, warmup: int) -> float:
        """Mean seconds of `steps` calls after `warmup` untimed ones (whose total, compiling
        included, is left in `warmup_seconds`)."""
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        self.sync()
        self.warmup_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        self.sync()
        return (time.perf_counter() - start) / steps

    def peak_bytes(self, fn: Callable[[], Any], replayed: bool = False) -> int | None:
        """The most memory allocated while `fn` runs; for a CUDA-graph replay (`replayed`),
        which allocates nothing, what is reserved once it ran (its graph's memory pool
        included; every other cached block released first)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        if replayed:
            torch.cuda.empty_cache()
            return torch.cuda.memory_reserved(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def gigabytes(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def profile_table(fn: Callable[[], Any], device: torch.device, calls: int = 1) -> str:
    """Operators of `calls` calls of `fn` by self time on the device (CPU time on a CPU)."""
    prof = profiler_for(device)
    with prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return operator_table(prof, device)


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """The benchmark's JSON, printed and written to `out` (`--out`) if given."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        out.write_text(text)
