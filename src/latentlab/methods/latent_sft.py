"""Latent-SFT: latent reasoning as a chain of superposition (Deng et al., arXiv 2510.15522;
METHODS.md section 5). docs/methods/latent_sft.md draws the masks and gives the pipeline.

A latent is a convex combination of the decoder's input embeddings, `z = α^T E`. Two phases,
one method (`phase`), each a run of its own:

- `encoder` (stage 1): the method owns an `encoder` (a copy of the backbone). It reads
  `x <think> S_1 <L> S_2 <L> ... S_N <L> </think>` (the CoT cut into chunks of `chunk_size`
  tokens) under the Latent Token Induction Mask; at each compress token `<L>` its last state
  `h_i` gives `α_i = softmax(top_k(h_i E^T))` and `z_i = α_i^T E`. The decoder (the backbone)
  reads `x <think> z_1 S_2 z_2 ... S_N z_N </think> y <eos>` under the Latent Token Supervision
  Mask with dual-track positions, and `l_sup` (cross-entropy on the chunks, `</think>` and the
  answer) trains both. Three stages: encoder only, decoder only, both.
- `latent` (stage 2): the trained encoder's `α` of every training example are stored once
  (`build_soft_labels`); the backbone learns `x <think> [N slots] </think> y <eos>` where slot
  `t` reads `p̃_t^T E`, `p̃_t = softmax((log α_t + g_t) / τ)` with Gumbel noise `g_t`, and
  `L = L_exp + λ L_lat`, `L_lat = mean_t KL(p̃_t || q_t)`.

Inference (either phase; the decoder is an LM): after `<think>` the model's next-token
distribution `q` either says `</think>` (argmax) or becomes the next input `q_k^T E` (top-k,
renormalised), on one KV cache; then the answer is decoded as text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, NonNegativeInt, model_validator
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from latentlab.engine.checkpoint import atomic_write_text, existing_dir
from latentlab.engine.generation import (
    DecodeState,
    attention_bias,
    decode_completions,
    extend,
    greedy_decode,
    left_pad,
    prefill,
)
from latentlab.errors import ConfigError, DataError
from latentlab.methods.base import (
    IGNORE,
    Batch,
    Features,
    Method,
    MethodConfig,
    Stage,
    StepOutput,
    part_lm_loss,
    right_padded_states,
    sequence,
    steps_text,
)
from latentlab.tasks.base import Example, resolve_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

THINK, END_THINK, COMPRESS = "<think>", "</think>", "<L>"

# What each position of a sequence is; the masks are written in terms of these.
PAD, PROMPT, TEXT, MARK, LATENT, CHUNK, TAIL = range(7)
# PROMPT: `x <think>`; TEXT: chunk tokens read by the encoder; MARK: the encoder's compress
# tokens; LATENT: a decoder position that reads a latent; CHUNK: decoder chunk tokens; TAIL:
# `</think> y <eos>` (and the encoder's closing `</think>`).

# The three steps of phase `encoder`: which of (encoder, decoder) trains.
SCHEDULE = (("encoder-only", True, False), ("decoder-only", False, True), ("union", True, True))
LABELS_FORMAT = "latentlab-latent-sft-soft-labels/1"
MAX_REDRAWS = 100  # Gumbel redraws of a slot whose noisy top-1 is </think>, before masking it


class LatentSFTConfig(MethodConfig):
    name: Literal["latent_sft"] = "latent_sft"
    phase: Literal["encoder", "latent"] = Field(
        "encoder", description="encoder: stage 1 (Latent Token Encoder + decoder, l_sup); "
        "latent: stage 2 (the LM learns to produce the encoder's latents, L_exp + λ L_lat)")
    chunk_size: int = Field(4, ge=1, description="r: CoT tokens per latent (D: 2 or 4 on GSM8K)")
    top_k: int = Field(10, ge=0, description="the superposition keeps the k most likely tokens "
                       "(D's code: 10); 0: the full vocabulary (D's first version)")
    readout: Literal["embeddings", "lm_head"] = Field(
        "embeddings", description="encoder logits from its input embeddings h E^T (D's code) "
        "or its LM head (better with untied embeddings); the same for tied models")
    latent_space: Literal["vocabulary", "hidden"] = Field(
        "vocabulary", description="vocabulary: z = α^T E; hidden: z = the last-layer state "
        "itself (D's ablation)")
    induction_mask: bool = Field(True, description="encoder: no position sees an earlier "
                                 "compress token (false: causal; D's ablation)")
    supervision_mask: bool = Field(True, description="decoder: chunk tokens see only their "
                                   "latent and their own chunk (false: causal; D's ablation)")
    loss_average: Literal["chunk", "token"] = Field(
        "chunk", description="l_sup averaged per chunk then over chunks (D's paper) or over "
        "all tokens (D's code)")
    schedule_epochs: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] = Field(
        (1, 1, 1), description="phase encoder: epochs of encoder only (decoder frozen), "
        "decoder only, then both (D's schedule); replaces train.epochs")
    gumbel_scale: float = Field(1.0, ge=0.0, description="phase latent: g = scale * "
                                "clamp(Gumbel(0, 1)); 0: no noise")
    temperature: float = Field(1.0, gt=0.0, description="τ of p̃ = softmax((log α + g) / τ)")
    gumbel_clamp: tuple[float, float] | None = Field(
        (-1.5, 3.0), description="bounds of the standard Gumbel draw (D's code); null: none")
    reject_end_token: bool = Field(True, description="redraw a slot's noise while its noisy "
                                   "top-1 is </think> (D's code)")
    max_latent_steps: int = Field(32, ge=1, description="inference: latents before </think> "
                                  "is forced")
    encoder_from: str | None = Field(None, description="phase latent: the run directory of a "
                                     "phase-encoder run; its encoder makes the soft labels")
    lat_weight: float = Field(1.0, ge=0.0, description="λ of L_lat (D: 1)")
    noise_seed: int = Field(0, description="phase latent: the Gumbel noise of example i in "
                            "epoch e is drawn from (noise_seed, e, i)")

    @model_validator(mode="after")
    def _check(self) -> LatentSFTConfig:
        if self.phase == "latent" and self.encoder_from is None:
            raise ValueError("phase latent needs encoder_from (a phase-encoder run directory)")
        if self.phase == "encoder" and self.encoder_from is not None:
            raise ValueError("encoder_from is for phase latent; phase encoder trains its own")
        if sum(self.schedule_epochs) == 0:
            raise ValueError("schedule_epochs has no epoch at all")
        if self.gumbel_clamp is not None and self.gumbel_clamp[0] >= self.gumbel_clamp[1]:
            raise ValueError(f"gumbel_clamp {self.gumbel_clamp} is not (low, high)")
        return self


# ------------------------------------------------------------------------------ the masks


def induction_mask(kinds: Tensor, enabled: bool = True) -> Tensor:
    """The encoder's "may attend" mask [B, T, T] (query, key) from position kinds [B, T].

    Causal, except (when `enabled`) that no position sees an earlier compress token, so `L_i`
    sees `x`, `<think>`, `S_1..S_i` and itself. Padding is seen by nobody; a padding query sees
    itself only (a row with no key at all would make attention NaN, also in the backward).
    """
    t = kinds.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=kinds.device)
    real = kinds != PAD
    allowed = torch.ones_like(eye).tril() & real[:, None, :] & real[:, :, None]
    if enabled:
        allowed = allowed & ((kinds != MARK)[:, None, :] | eye)
    return allowed | (eye & ~real[:, :, None])


def supervision_mask(kinds: Tensor, blocks: Tensor, enabled: bool = True) -> Tensor:
    """The decoder's "may attend" mask [B, T, T] from position kinds and blocks [B, T].

    `blocks` numbers the latents and the chunk after each (`z_i` and `S_{i+1}` share block i).
    When `enabled`: `x <think>` is causal; `z_i` sees `x <think>` and `z_1..z_i`; a chunk token
    sees its block's latent and the earlier tokens of its chunk; `</think> y <eos>` sees
    `x <think>`, every latent and itself causally, no chunk text. Otherwise causal.
    """
    t = kinds.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=kinds.device)
    real = kinds != PAD
    allowed = torch.ones_like(eye).tril() & real[:, None, :] & real[:, :, None]
    if enabled:
        query, key = kinds[:, :, None], kinds[:, None, :]
        context = (key == PROMPT) | (key == LATENT)
        own_block = (blocks[:, :, None] == blocks[:, None, :]) & ((key == LATENT) | (key == CHUNK))
        rule = torch.where(query == CHUNK, own_block,
                           torch.where(query == TAIL, context | (key == TAIL), context))
        allowed = allowed & rule
    return allowed | (eye & ~real[:, :, None])


# --------------------------------------------------------------------- superposition maths


def top_k_distribution(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`α = softmax(logits restricted to the top k)` as (indices [S, k], probabilities [S, k]),
    most likely first; k = 0 (or >= V) keeps the whole vocabulary."""
    vocab = logits.shape[-1]
    top = logits.float().topk(vocab if k == 0 else min(k, vocab), dim=-1)
    return top.indices, top.values.softmax(-1)


def mixture(table: Tensor, indices: Tensor, probs: Tensor) -> Tensor:
    """`z = α^T E` for sparse α ([S, k] indices and probabilities): [S, d]."""
    dense = probs.new_zeros((probs.shape[0], table.shape[0])).scatter(1, indices, probs)
    return dense.to(table.dtype) @ table


def latent_kl(logits: Tensor, indices: Tensor, probs: Tensor) -> Tensor:
    """Mean over rows of `KL(p̃ || q)`, `q = softmax(logits)` over the full vocabulary [S, V],
    `p̃` sparse ([S, k]; zero outside `indices`)."""
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(1, indices)
    probs = probs.float()
    return (torch.xlogy(probs, probs) - probs * log_q).sum(-1).mean()


def noise_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, example index): a resumed run, any process
    and any batch composition draw the same noise for the same example and epoch."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _gumbel(shape: tuple[int, ...], generator: torch.Generator,
            clamp: tuple[float, float] | None) -> Tensor:
    # U in [tiny, 1): -log(-log U) is finite
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
    uniform = uniform.clamp(min=torch.finfo(torch.float64).tiny)
    noise = -torch.log(-torch.log(uniform))
    if clamp is not None:
        noise = noise.clamp(*clamp)
    return noise.float()


def gumbel_targets(probs: Tensor, is_end: Tensor, generator: torch.Generator, scale: float = 1.0,
                   clamp: tuple[float, float] | None = (-1.5, 3.0), tau: float = 1.0,
                   reject_end: bool = True) -> Tensor:
    """`p̃ = softmax((log α + g) / τ)` per row of α ([S, k] probabilities; zeros stay zero),
    `g = scale * clamp(Gumbel(0, 1))`. With `reject_end`, a row whose noisy top-1 is the end
    token (`is_end` [S, k] marks it) is redrawn; after MAX_REDRAWS (α's top-1 is the end token
    and the noise cannot move it) the end token leaves that row's support, unless it is all of it.
    """
    log_alpha = probs.float().log()
    noise = scale * _gumbel(tuple(probs.shape), generator, clamp)
    if reject_end:
        for _ in range(MAX_REDRAWS):
            bad = is_end.gather(1, (log_alpha + noise).argmax(-1, keepdim=True))[:, 0]
            if not bad.any():
                break
            noise[bad] = scale * _gumbel((int(bad.sum()), probs.shape[1]), generator, clamp)
        else:
            others = ((probs > 0) & ~is_end).any(-1)
            log_alpha = log_alpha.masked_fill(is_end & (bad & others)[:, None], -math.inf)
    return ((log_alpha + noise) / tau).softmax(-1)


# ------------------------------------------------------------------------------ the method


class LatentSFT(Method):
    name = "latent_sft"
    config_class = LatentSFTConfig
    config: LatentSFTConfig
    encoder: PreTrainedModel | None

    def __init__(self, config: LatentSFTConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        self.think_id, self.end_id, self.mark_id = (
            tokenizer.convert_tokens_to_ids(t) for t in (THINK, END_THINK, COMPRESS))
        # Phase encoder owns the encoder (saved in method.safetensors); phase latent reads its
        # soft labels from a file instead.
        self.encoder = copy.deepcopy(backbone) if config.phase == "encoder" else None
        # Everything trainable until `set_stage`: the engine builds its optimizer from the
        # parameters that require grad *before* the first stage, and each stage then only
        # switches gradients off for what it freezes.
        self.schedule_step = len(SCHEDULE) - 1
        self.epoch = 0  # phase latent: the epoch whose noise `encode` draws
        self._labels: SoftLabels | None = None

    @classmethod
    def special_tokens(cls, config: MethodConfig) -> list[str]:
        # The same tokens, in the same order, in both phases: the soft labels' token ids then
        # mean the same in the encoder run and in the latent run.
        return [THINK, END_THINK, COMPRESS]

    # -- stages ----------------------------------------------------------------------------
    def stages(self, epochs: int) -> list[Stage]:
        """Phase encoder: D's three steps (`schedule_epochs`; `train.epochs` is not used); only
        the last (both trained) may become `best/`. Phase latent: one stage per epoch, so that
        the engine re-encodes the data each epoch and `encode` draws that epoch's noise."""
        if self.config.phase == "latent":
            return [Stage(f"epoch-{e}", 1) for e in range(epochs)]
        return [Stage(name, n, reset_optimizer=i > 0, select=i == len(SCHEDULE) - 1)
                for i, ((name, _, _), n) in enumerate(zip(SCHEDULE, self.config.schedule_epochs,
                                                          strict=True))]

    def set_stage(self, index: int) -> None:
        if self.config.phase == "latent":
            self.epoch = index
            return
        if not 0 <= index < len(SCHEDULE):
            raise ValueError(f"stage {index} is outside 0..{len(SCHEDULE) - 1}")
        self.schedule_step = index
        _, train_encoder, train_decoder = SCHEDULE[index]
        self._encoder().requires_grad_(train_encoder)
        self.backbone.requires_grad_(train_decoder)
        self.train(self.training)

    def train(self, mode: bool = True) -> LatentSFT:
        super().train(mode)
        if self.encoder is not None:
            _, train_encoder, train_decoder = SCHEDULE[self.schedule_step]
            # A frozen module is a fixed function during its step: no dropout.
            if not train_encoder:
                self.encoder.eval()
            if not train_decoder:
                self.backbone.eval()
        return self

    def _encoder(self) -> PreTrainedModel:
        if self.encoder is None:
            raise ConfigError("this latent_sft model has no encoder (phase latent)",
                              fix="use a run of method.phase=encoder")
        return self.encoder

    # -- data ------------------------------------------------------------------------------
    def chunks(self, example: Example) -> list[list[int]]:
        """The CoT's tokens (as CoT training writes them) cut into `chunk_size` pieces; the last
        one may be shorter."""
        ids = self.tokens(steps_text(example.steps))
        r = self.config.chunk_size
        return [ids[i:i + r] for i in range(0, len(ids), r)]

    def scores_held_out_loss(self) -> bool:
        # Phase latent's targets are soft labels of the training split only.
        return self.config.phase == "encoder"

    def encode(self, example: Example) -> Features:
        return (self._encoder_features(example) if self.config.phase == "encoder"
                else self._latent_features(example))

    def _encoder_features(self, example: Example) -> Features:
        """Stage 1: the encoder's and the decoder's sequences of one example.

        Decoder layout, with `P = len(x <think>)` and N chunks:
        `x <think>` at 0..P-1; `z_i` (i = 1..N) at `P+i-1`; `S_{i+1}` after `z_i` at
        `P+i..P+i+len-1` (it continues from its latent); `</think> y <eos>` from `P+N`.
        Labels: the chunks `S_2..S_N` and `</think> y <eos>`; `weights` make the mean over a
        group (a chunk; the tail) and then over the example's N groups (`loss_average: chunk`).
        """
        prompt = [*self.prompt_ids(example), self.think_id]
        chunks = self.chunks(example)
        n, p = len(chunks), len(prompt)
        encoder_ids = list(prompt)
        encoder_kinds = [PROMPT] * p
        for chunk in chunks:
            encoder_ids += [*chunk, self.mark_id]
            encoder_kinds += [TEXT] * len(chunk) + [MARK]
        encoder_ids.append(self.end_id)
        encoder_kinds.append(TAIL)

        ids, kinds, blocks = list(prompt), [PROMPT] * p, [-1] * p
        positions, labels, groups = list(range(p)), [IGNORE] * p, [-1] * p
        for i in range(n):
            ids.append(self.mark_id)  # a placeholder: the latent z_{i+1} replaces its embedding
            kinds.append(LATENT)
            blocks.append(i)
            positions.append(p + i)
            labels.append(IGNORE)
            groups.append(-1)
            if i + 1 < n:
                chunk = chunks[i + 1]
                ids += chunk
                kinds += [CHUNK] * len(chunk)
                blocks += [i] * len(chunk)
                positions += range(p + i + 1, p + i + 1 + len(chunk))
                labels += chunk
                groups += [i] * len(chunk)
        tail = [self.end_id, *self.target_ids(example, keep_steps=False)]
        ids += tail
        kinds += [TAIL] * len(tail)
        blocks += [-1] * len(tail)
        positions += range(p + n, p + n + len(tail))
        labels += tail
        n_groups = max(n, 1)  # S_2..S_N and the tail
        groups += [n_groups - 1] * len(tail)
        sizes = [groups.count(g) for g in range(n_groups)]
        weights = [0.0 if g < 0 else 1.0 / (sizes[g] * n_groups) for g in groups]
        return {"encoder_ids": encoder_ids, "encoder_kinds": encoder_kinds, "input_ids": ids,
                "kinds": kinds, "blocks": blocks, "positions": positions, "labels": labels,
                "weights": weights}

    def _latent_features(self, example: Example) -> Features:
        """Stage 2: `x <think> [N slots] </think> y <eos>`; the loss L_exp on `</think> y <eos>`.
        The slots' targets come from the soft labels in `collate`, with this epoch's noise."""
        labels = self.soft_labels()
        row = labels.row(example)
        n = labels.count(row)
        prompt = [*self.prompt_ids(example), self.think_id]
        features = sequence([([*prompt, *[self.mark_id] * n], None),
                             ([self.end_id, *self.target_ids(example, keep_steps=False)],
                              "answer")])
        return {**features, "label_row": row, "slots": n, "slot_start": len(prompt),
                "noise_epoch": self.epoch}

    def collate(self, features: list[Features]) -> Batch:
        return (self._encoder_collate(features) if "encoder_ids" in features[0]
                else self._latent_collate(features))

    def _encoder_collate(self, features: list[Features]) -> Batch:
        """Right-padded encoder and decoder sequences and their "may attend" masks [B, T, T]
        (built here, on the CPU, from the position kinds)."""
        def pad(key: str, value: float | int, dtype: torch.dtype) -> Tensor:
            longest = max(len(f[key]) for f in features)
            out = torch.full((len(features), longest), value, dtype=dtype)
            for row, f in enumerate(features):
                out[row, :len(f[key])] = torch.tensor(f[key], dtype=dtype)
            return out

        encoder_kinds = pad("encoder_kinds", PAD, torch.long)
        kinds, blocks = pad("kinds", PAD, torch.long), pad("blocks", -1, torch.long)
        return {
            "encoder_ids": pad("encoder_ids", self.tokenizer.pad_token_id, torch.long),
            "encoder_kinds": encoder_kinds,
            "encoder_mask": induction_mask(encoder_kinds, self.config.induction_mask),
            "input_ids": pad("input_ids", self.tokenizer.pad_token_id, torch.long),
            "latent": kinds == LATENT,
            "mask": supervision_mask(kinds, blocks, self.config.supervision_mask),
            "positions": pad("positions", 0, torch.long),
            "labels": pad("labels", IGNORE, torch.long),
            "weights": pad("weights", 0.0, torch.float),
            "num_tokens": int((encoder_kinds != PAD).sum() + (kinds != PAD).sum())}

    def _latent_collate(self, features: list[Features]) -> Batch:
        """The right-padded batch of every method, plus the slots and their noisy targets:
        `slot` [B, T] marks slot columns; `slot_indices`/`slot_probs` [S, k] (vocabulary) or
        `slot_values` [S, d] (hidden) hold the targets of the S slots in row-major order."""
        batch = super().collate(features)
        slot = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        labels = self.soft_labels()
        indices, targets = [], []
        cfg = self.config
        for row, f in enumerate(features):
            slot[row, f["slot_start"]:f["slot_start"] + f["slots"]] = True
            if labels.values is not None:
                targets.append(labels.values_of(f["label_row"]).float())
                continue
            index, probs = labels.alphas_of(f["label_row"])
            generator = noise_generator(cfg.noise_seed, f["noise_epoch"], f["label_row"])
            targets.append(gumbel_targets(probs, index == self.end_id, generator,
                                          cfg.gumbel_scale, cfg.gumbel_clamp, cfg.temperature,
                                          cfg.reject_end_token))
            indices.append(index.long())
        batch["slot"] = slot
        if indices:
            batch["slot_indices"] = torch.cat(indices)
            batch["slot_probs"] = torch.cat(targets)
        else:
            batch["slot_values"] = torch.cat(targets)
        batch["num_tokens"] += int(slot.sum())
        return batch

    # -- training --------------------------------------------------------------------------
    def forward(self, batch: Batch) -> StepOutput:
        if "encoder_ids" in batch:
            return self._encoder_forward(batch)
        return self._latent_forward(batch)

    def encoder_states(self, ids: Tensor, kinds: Tensor, allowed: Tensor) -> Tensor:
        """The encoder's last-layer states at its compress tokens, in row-major order [S, d]."""
        encoder = self._encoder()
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        hidden = encoder.base_model(input_ids=ids, attention_mask=attention_bias(
            encoder, allowed[:, None]), position_ids=positions).last_hidden_state
        return hidden[kinds == MARK]

    def encoder_latents(self, ids: Tensor, kinds: Tensor, allowed: Tensor
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The latents `z` [S, d] of the compress tokens and, for vocabulary latents, α as
        (indices, probabilities) [S, k] (None, None for hidden latents: `z = h`)."""
        states = self.encoder_states(ids, kinds, allowed)
        if self.config.latent_space == "hidden":
            return states, None, None
        indices, probs = top_k_distribution(self._readout(states), self.config.top_k)
        return mixture(self.backbone.get_input_embeddings().weight, indices, probs), indices, probs

    def _readout(self, states: Tensor) -> Tensor:
        """The encoder's logits at its compress tokens [S, V]: `h E^T` or its LM head."""
        encoder = self._encoder()
        if self.config.readout == "lm_head":
            return encoder.get_output_embeddings()(states)
        return states @ encoder.get_input_embeddings().weight.T

    def _encoder_forward(self, batch: Batch) -> StepOutput:
        z, _, _ = self.encoder_latents(batch["encoder_ids"], batch["encoder_kinds"],
                                       batch["encoder_mask"])
        embeds = self.embed(batch["input_ids"])
        embeds = embeds.masked_scatter(batch["latent"][..., None], z.to(embeds.dtype))
        hidden = self.backbone.base_model(
            inputs_embeds=embeds,
            attention_mask=attention_bias(self.backbone, batch["mask"][:, None]),
            position_ids=batch["positions"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        logits = self.backbone.get_output_embeddings()(hidden[:, :-1][keep]).float()
        nll = nn.functional.cross_entropy(logits, targets[keep], reduction="none")
        if self.config.loss_average == "chunk":
            # weights average within each chunk and over an example's chunks; then over rows
            loss = (nll * batch["weights"][:, 1:][keep]).sum() / targets.shape[0]
        else:
            loss = nll.mean()
        return StepOutput(loss, {"l_sup_token": nll.detach().mean()})

    def _latent_forward(self, batch: Batch) -> StepOutput:
        ids, slot = batch["input_ids"], batch["slot"]
        embeds = self.embed(ids)
        table = self.backbone.get_input_embeddings().weight
        vocabulary = "slot_indices" in batch
        inputs = (mixture(table, batch["slot_indices"], batch["slot_probs"]) if vocabulary
                  else batch["slot_values"])
        embeds = embeds.masked_scatter(slot[..., None], inputs.to(embeds.dtype))
        hidden = right_padded_states(self.backbone, embeds)
        l_exp, metrics = part_lm_loss(self.backbone, hidden, batch)
        before = hidden[:, :-1][slot[:, 1:]]  # the positions predicting each slot [S, d]
        if before.shape[0] == 0:  # no example of the batch has a latent (an empty CoT)
            l_lat = l_exp.new_zeros(())
        elif vocabulary:
            logits = self.backbone.get_output_embeddings()(before)
            l_lat = latent_kl(logits, batch["slot_indices"], batch["slot_probs"])
        else:
            # Hidden latents are fed back like Coconut's thoughts: the state before a slot
            # should be the encoder's latent for it (choice: mean squared error).
            l_lat = nn.functional.mse_loss(before.float(), batch["slot_values"])
        loss = l_exp + self.config.lat_weight * l_lat
        return StepOutput(loss, {**metrics, "l_exp": l_exp.detach(), "l_lat": l_lat.detach()})

    # -- soft labels -----------------------------------------------------------------------
    @torch.no_grad()
    def encoder_alphas(self, examples: list[Example], k: int | None = None
                       ) -> list[tuple[Tensor, Tensor]]:
        """Per example, α at its N compress tokens, on the CPU: the k most likely tokens by the
        readout logits (indices int32 [N, k], most likely first) and their α (float32 [N, k];
        zero beyond the first `top_k`). Default k: `top_k` (all of V if 0)."""
        states, counts = self._encoder_pass(examples)
        logits = self._readout(states).float()
        vocab = logits.shape[-1]
        support = min(self.config.top_k or vocab, vocab)
        shown = min(k or support, vocab)
        top = logits.topk(max(shown, support), dim=-1)
        alpha = top.values[:, :support].softmax(-1)
        probs = nn.functional.pad(alpha, (0, top.values.shape[1] - support))
        return list(zip(top.indices[:, :shown].int().cpu().split(counts),
                        probs[:, :shown].cpu().split(counts), strict=True))

    @torch.no_grad()
    def encoder_hidden(self, examples: list[Example]) -> list[Tensor]:
        """Per example, the encoder's states at its N compress tokens [N, d], on the CPU (the
        latents of `latent_space: hidden`)."""
        states, counts = self._encoder_pass(examples)
        return list(states.float().cpu().split(counts))

    def _encoder_pass(self, examples: list[Example]) -> tuple[Tensor, list[int]]:
        batch = self._encoder_collate([self._encoder_features(e) for e in examples])
        kinds = batch["encoder_kinds"].to(self.device)
        states = self.encoder_states(batch["encoder_ids"].to(self.device), kinds,
                                     batch["encoder_mask"].to(self.device))
        return states, (kinds == MARK).sum(-1).tolist()

    def soft_labels(self) -> SoftLabels:
        """Phase latent: the encoder run's soft labels of its training split, built on first
        use (by the main process; the others wait) under `ENCODER_RUN/soft_labels/`."""
        if self._labels is None:
            self._labels = load_encoder_labels(self.config, self.tokenizer, self.device)
        return self._labels

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int) -> list[str]:
        """Greedy completions after `</think>` (so they start with `### answer`)."""
        return self.generate_with_steps(examples, max_new_tokens)[0]

    @classmethod
    def ddp_find_unused_parameters(cls, config: MethodConfig) -> bool:
        # The encoder phase freezes the encoder, then the decoder, in turn.
        return config.phase == "encoder"  # type: ignore[attr-defined]

    @torch.no_grad()
    def generate_with_steps(self, examples: list[Example], max_new_tokens: int
                            ) -> tuple[list[str], list[int]]:
        """The completions and each example's number of latent steps `#L`."""
        state, steps, _, _ = self._think(examples)
        tokens = greedy_decode(self.backbone, state, max_new_tokens,
                               self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        return decode_completions(self.tokenizer, tokens), steps.tolist()

    @torch.no_grad()
    def latents(self, examples: list[Example]) -> Tensor:
        """The inputs fed at the latent steps of inference: [n, max_latent_steps, d], zero
        after each example's `#L` (a fixed width, so that batches concatenate)."""
        _, _, fed, _ = self._think(examples)
        width = self.config.max_latent_steps
        out = torch.zeros((len(examples), width, self.backbone.get_input_embeddings()
                           .embedding_dim), device=self.device)
        if fed:
            out[:, :len(fed)] = torch.stack(fed, 1)
        return out

    @torch.no_grad()
    def latent_distributions(self, examples: list[Example]) -> list[Tensor]:
        """Per example, the distributions its latents superpose ([#L, V]; top-k renormalised,
        zero elsewhere): the `q_t` of the effective-parallelism metric."""
        if self.config.latent_space == "hidden":
            raise ConfigError("hidden-state latents are no distributions over the vocabulary",
                              fix="use a run with method.latent_space=vocabulary")
        _, steps, _, dists = self._think(examples)
        vocab = self.backbone.get_input_embeddings().num_embeddings
        out = []
        for row, n in enumerate(steps.tolist()):
            rows = [torch.zeros(vocab, device=self.device).scatter(0, idx[row], p[row])
                    for idx, p in dists[:n]]
            out.append(torch.stack(rows) if rows else torch.zeros((0, vocab), device=self.device))
        return out

    def _think(self, examples: list[Example]
               ) -> tuple[DecodeState, Tensor, list[Tensor], list[tuple[Tensor, Tensor]]]:
        """Prefill `x <think>`, run latent steps on the cache until each row says `</think>`
        (or `max_latent_steps`), then feed `</think>` to every row.

        Every column is one step for all rows. A row that has stopped takes a masked column
        (attention mask 0: no later query sees it and positions skip it), so its sequence is
        exactly `x <think> z_1..z_n </think>` and it gets no further latent. Returns the state
        after `</think>`, `#L` per row [B], the inputs fed per step ([B, d], zero for stopped
        rows) and, for vocabulary latents, each step's (indices, probabilities) [B, k].
        """
        prompts = [[*self.prompt_ids(e), self.think_id] for e in examples]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        state = prefill(self.backbone, mask, input_ids=ids)
        table = self.backbone.get_input_embeddings().weight
        active = torch.ones(len(examples), dtype=torch.bool, device=self.device)
        steps = torch.zeros(len(examples), dtype=torch.long, device=self.device)
        fed: list[Tensor] = []
        dists: list[tuple[Tensor, Tensor]] = []
        for _ in range(self.config.max_latent_steps):
            active &= state.logits.argmax(-1) != self.end_id
            if not active.any():
                break
            if self.config.latent_space == "hidden":
                z = state.hidden[:, -1]
            else:
                indices, probs = top_k_distribution(state.logits, self.config.top_k)
                dists.append((indices, probs))
                z = mixture(table, indices, probs)
            fed.append(z * active[:, None])
            steps += active
            state = extend(self.backbone, state, active.long()[:, None],
                           inputs_embeds=z[:, None].to(table.dtype))
        ones = torch.ones_like(mask[:, :1])
        state = extend(self.backbone, state, ones, input_ids=ones * self.end_id)
        return state, steps, fed, dists


# ---------------------------------------------------------------------------- soft labels


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


def write_soft_labels(method: LatentSFT, examples: Sequence[Example], out_path: Path,
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


def build_soft_labels(encoder_run_dir: Path, examples: Sequence[Example], out_path: Path,
                      batch_size: int, device: torch.device | str = "cpu") -> Path:
    """The soft labels of `examples` under the trained encoder of a phase-encoder run (its
    `best/`), in `out_path` (see `write_soft_labels`; an interrupted build resumes)."""
    from latentlab.run import load_run  # run imports the methods: import late

    method, _ = load_run(encoder_run_dir, device)
    if not isinstance(method, LatentSFT) or method.config.phase != "encoder":
        raise ConfigError(f"{encoder_run_dir} is not a latent_sft phase-encoder run",
                          fix="point method.encoder_from at a run of method.phase=encoder")
    return write_soft_labels(method, examples, out_path, batch_size,
                             encoder_digest(encoder_run_dir))


def load_encoder_labels(config: LatentSFTConfig, tokenizer: PreTrainedTokenizerBase,
                        device: torch.device) -> SoftLabels:
    """Phase latent's soft labels: `ENCODER_RUN/soft_labels/train.safetensors`, built first if
    missing, after checking that encoder run fits this one (same latents, same vocabulary)."""
    from accelerate import PartialState

    from latentlab.config import load_config  # config imports the methods: import late
    from latentlab.tasks import build_task

    source = resolve_path(str(config.encoder_from))
    where = f"method.encoder_from={config.encoder_from}"
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"{where} is not a run directory",
                          fix="give the directory of a finished phase-encoder run")
    encoder_config = load_config(source / "config.yaml")
    method = encoder_config.method
    if not isinstance(method, LatentSFTConfig) or method.phase != "encoder":
        raise ConfigError(f"{where} is a {method.name} run, not a latent_sft phase-encoder run",
                          fix="point it at a run of method.phase=encoder")
    differ = [k for k in ("latent_space", "chunk_size")
              if getattr(method, k) != getattr(config, k)]
    if differ:
        theirs = ", ".join(f"method.{k}={getattr(method, k)}" for k in differ)
        raise ConfigError(f"{where} trained with {theirs}", fix=f"set {theirs}")
    path = source / "soft_labels" / "train.safetensors"
    with PartialState().main_process_first():
        if not path.is_file():
            examples = build_task(encoder_config.task).load("train")
            build_soft_labels(source, examples, path, encoder_config.eval.batch_size, device)
    labels = load_soft_labels(path)
    if labels.metadata.get("source") != encoder_digest(source):
        raise ConfigError(f"{path} was built by another state of {source}'s encoder",
                          fix=f"delete {path}; it is built again from the current best/")
    if labels.metadata.get("vocabulary") != vocabulary_digest(tokenizer):
        raise ConfigError(f"{where} has another vocabulary than this run",
                          fix="start this run from the encoder run (model.init_from) or from "
                              "the run the encoder run started from")
    return labels
