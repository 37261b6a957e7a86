"""Latent-SFT's soft labels: the phase-encoder run's α (or hidden latents) of every training
example, computed once and stored in one safetensors file that phase-latent runs read."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from latentlab.engine.checkpoint import atomic_write_text, existing_dir
from latentlab.errors import ConfigError, DataError
from latentlab.methods.base import UpstreamRun
from latentlab.methods.latent_sft.config import LatentSFTConfig
from latentlab.methods.latent_sft.encoder_phase import LatentSFTEncoder
from latentlab.tasks.base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LABELS_FORMAT = "latentlab-latent-sft-soft-labels/1"


def example_key(example: Example) -> bytes:
    """What identifies an example's soft labels: a digest of its question, steps and answer."""
    text = json.dumps([example.question, list(example.steps), example.answer])
    return hashlib.sha1(text.encode()).digest()


def vocabulary_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    return hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


@dataclass(frozen=True)
class SoftLabels:
    """The soft labels of a dataset, as stored: example i's latents are rows
    `offsets[i]:offsets[i+1]` of `indices`/`probs` (vocabulary) or `values` (hidden)."""

    offsets: Tensor  # int64 [n + 1]
    indices: Tensor | None  # int32 [total, k]
    probs: Tensor | None  # float16 [total, k]
    values: Tensor | None  # float16 [total, d]
    rows: dict[bytes, int]  # example_key -> i
    metadata: dict[str, str]

    def row(self, example: Example) -> int:
        key = example_key(example)
        if key not in self.rows:
            raise DataError(f"no soft label for the training example {example.question[:60]!r}",
                            fix="train phase latent on the encoder run's training split, or "
                                "delete the soft-label file so that it is built again")
        return self.rows[key]

    def count(self, row: int) -> int:
        return int(self.offsets[row + 1] - self.offsets[row])

    def alphas_of(self, row: int) -> tuple[Tensor, Tensor]:
        if self.indices is None or self.probs is None:
            raise DataError("these soft labels hold hidden-state latents, not α",
                            fix="use method.latent_space=hidden")
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.indices[start:end], self.probs[start:end].float()

    def values_of(self, row: int) -> Tensor:
        if self.values is None:
            raise DataError("these soft labels hold α, not hidden-state latents",
                            fix="use method.latent_space=vocabulary")
        return self.values[int(self.offsets[row]):int(self.offsets[row + 1])]


def load_soft_labels(path: Path) -> SoftLabels:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != LABELS_FORMAT:
            raise DataError(f"{path} is not a latent_sft soft-label file",
                            fix="delete it; phase latent builds it again")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    keys = tensors["keys"]
    return SoftLabels(offsets=tensors["offsets"], indices=tensors.get("indices"),
                      probs=tensors.get("probs"), values=tensors.get("values"),
                      rows={bytes(keys[i].tolist()): i for i in range(keys.shape[0])},
                      metadata=metadata)


def write_soft_labels(method: LatentSFTEncoder, examples: Sequence[Example], out_path: Path,
                      batch_size: int, source: str) -> Path:
    """Run `method`'s encoder over `examples` and store their soft labels in `out_path`.

    One shard per batch goes to `OUT.parts/` with `progress.json` naming the finished shards;
    a rerun with the same inputs (`source` names the encoder) skips them, then the shards are
    merged into one safetensors file, written atomically, and the parts are deleted.
    """
    if out_path.is_file():
        return out_path
    cfg = method.config
    keys = [example_key(e) for e in examples]
    settings = {"source": source, "batch_size": batch_size, "latent_space": cfg.latent_space,
                "chunk_size": cfg.chunk_size, "top_k": cfg.top_k, "readout": cfg.readout,
                "induction_mask": cfg.induction_mask,
                "vocabulary": vocabulary_digest(method.tokenizer)}
    fingerprint = hashlib.sha256(json.dumps(settings).encode() + b"".join(keys)).hexdigest()
    parts = out_path.with_name(out_path.name + ".parts")
    progress = parts / "progress.json"
    done: set[int] = set()
    if progress.is_file():
        saved = json.loads(progress.read_text())
        if saved["fingerprint"] == fingerprint:
            done = set(saved["done"])
        else:  # shards of other inputs (another encoder, other examples): start again
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(examples) / batch_size)

    def shard(index: int) -> Path:
        return parts / f"shard-{index:06d}.safetensors"

    was_training = method.training
    method.eval()
    for s in range(n_shards):
        if s in done and shard(s).is_file():
            continue
        batch = list(examples[s * batch_size:(s + 1) * batch_size])
        if cfg.latent_space == "hidden":
            values = method.encoder_hidden(batch)
            tensors = {"values": torch.cat(values).half(),
                       "counts": torch.tensor([len(v) for v in values])}
        else:
            alphas = method.encoder_alphas(batch)
            tensors = {"indices": torch.cat([i for i, _ in alphas]),
                       "probs": torch.cat([p for _, p in alphas]).half(),
                       "counts": torch.tensor([len(i) for i, _ in alphas])}
        tmp = shard(s).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, shard(s))
        done.add(s)
        atomic_write_text(progress, json.dumps({"fingerprint": fingerprint,
                                                "done": sorted(done)}))
    method.train(was_training)

    merged: dict[str, list[Tensor]] = {}
    for s in range(n_shards):
        with safe_open(str(shard(s)), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                merged.setdefault(name, []).append(handle.get_tensor(name))
    counts = torch.cat(merged.pop("counts"))
    tensors = {name: torch.cat(parts_) for name, parts_ in merged.items()}
    tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    tensors["keys"] = torch.tensor([list(k) for k in keys], dtype=torch.uint8)
    metadata = {"format": LABELS_FORMAT, **{k: str(v) for k, v in settings.items()
                                            if k != "batch_size"}}
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out_path)
    shutil.rmtree(parts)
    return out_path


def encoder_digest(encoder_run_dir: Path) -> str:
    """What identifies a phase-encoder run's trained model: a digest of its best/ weights."""
    best = existing_dir(encoder_run_dir / "best")
    if best is None:
        raise ConfigError(f"{encoder_run_dir} has no best/ model",
                          fix="point method.encoder_from at a finished phase-encoder run")
    digest = hashlib.sha256()
    with (best / "method.safetensors").open("rb") as handle:  # the encoder's weights
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def encoder_labels(encoder_run: UpstreamRun, config: LatentSFTConfig,
                   tokenizer: PreTrainedTokenizerBase) -> SoftLabels:
    """Phase latent's soft labels: `ENCODER_RUN/soft_labels/train.safetensors`, built first if
    missing (an interrupted build resumes), after checking that the encoder run fits this one
    (same latents, same vocabulary)."""
    where = f"method.{encoder_run.option}={encoder_run.run_dir}"
    theirs = encoder_run.method_config
    if not isinstance(theirs, LatentSFTConfig) or theirs.phase != "encoder":
        raise ConfigError(f"{where} is a {theirs.name} run, not a latent_sft phase-encoder run",
                          fix="point it at a run of method.phase=encoder")
    differ = [k for k in ("latent_space", "chunk_size")
              if getattr(theirs, k) != getattr(config, k)]
    if differ:
        options = ", ".join(f"method.{k}={getattr(theirs, k)}" for k in differ)
        raise ConfigError(f"{where} trained with {options}", fix=f"set {options}")
    source = encoder_run.run_dir
    path = source / "soft_labels" / "train.safetensors"
    with PartialState().main_process_first():
        if not path.is_file():
            encoder = encoder_run.load()
            assert isinstance(encoder, LatentSFTEncoder)  # its config says phase encoder
            write_soft_labels(encoder, encoder_run.task.load("train"), path,
                              encoder_run.batch_size, encoder_digest(source))
    labels = load_soft_labels(path)
    if labels.metadata.get("source") != encoder_digest(source):
        raise ConfigError(f"{path} was built by another state of {source}'s encoder",
                          fix=f"delete {path}; it is built again from the current best/")
    if labels.metadata.get("vocabulary") != vocabulary_digest(tokenizer):
        raise ConfigError(f"{where} has another vocabulary than this run",
                          fix="start this run from the encoder run (model.init_from) or from "
                              "the run the encoder run started from")
    return labels
