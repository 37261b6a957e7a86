"""Latent-SFT phase 1, the Latent Token Encoder (paper D, stage 1; METHODS.md section 5).

The method owns an `encoder` (a copy of the backbone). It reads
`x <think> S_1 <L> S_2 <L> ... S_N <L> </think>` (the CoT cut into chunks of `chunk_size`
tokens) under the Latent Token Induction Mask; at each compress token `<L>` its last state
`h_i` gives `α_i = softmax(top_k(h_i E^T))` and `z_i = α_i^T E`. The decoder (the backbone)
reads `x <think> z_1 S_2 z_2 ... S_N z_N </think> y <eos>` under the Latent Token Supervision
Mask with dual-track positions, and `l_sup` (cross-entropy on the chunks, `</think>` and the
answer) trains both, in three steps: encoder only, decoder only, both.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from latentlab.engine.generation import attention_bias
from latentlab.errors import ConfigError, DataError, RunError
from latentlab.latents import padded_rows, with_orthogonality
from latentlab.methods.base import IGNORE, Features, MethodConfig, Stage, StepOutput
from latentlab.methods.latent_sft.config import (
    CHUNK,
    LATENT,
    MARK,
    PAD,
    PROMPT,
    SCHEDULE,
    TAIL,
    TEXT,
    LatentSFTAnalysis,
    LatentSFTConfig,
)
from latentlab.methods.latent_sft.method import LatentSFT
from latentlab.methods.latent_sft.metrics import batches, ecr_at_k, report
from latentlab.methods.latent_sft.superposition import mixture, top_k_distribution
from latentlab.tasks.base import Example, Task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


class EncoderBatch(TypedDict):
    """The encoder phase's batch (`LatentSFTEncoder.collate`): the encoder's sequence and the
    decoder's, right-padded, each with its "may attend" mask."""

    encoder_ids: Tensor  # [B, E]: question, then the encoder's latent slots
    encoder_kinds: Tensor  # [B, E]: the kind of each position (PAD, ...)
    encoder_mask: Tensor  # [B, E, E]: may attend (the induction mask)
    input_ids: Tensor  # [B, T]: the decoder's sequence
    latent: Tensor  # [B, T] bool: the decoder's latent positions
    mask: Tensor  # [B, T, T]: may attend (the supervision mask)
    positions: Tensor  # [B, T]: position ids
    labels: Tensor  # [B, T]
    weights: Tensor  # [B, T]: each label's weight in the loss
    num_tokens: int


class LatentSFTEncoder(LatentSFT):
    phase = "encoder"
    encoder: PreTrainedModel

    def __init__(self, config: LatentSFTConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        self.encoder = copy.deepcopy(backbone)  # saved in method.safetensors
        # Everything trainable until `set_stage`: the engine builds its optimizer from the
        # parameters that require grad *before* the first stage, and each stage then only
        # switches gradients off for what it freezes.
        self.schedule_step = len(SCHEDULE) - 1

    # -- stages ----------------------------------------------------------------------------
    def stages(self, epochs: int) -> list[Stage]:
        """D's three steps (`schedule_epochs`; `train.epochs` is not used); only the last (both
        trained) may become `best/`."""
        return [Stage(name, n, reset_optimizer=i > 0, select=i == len(SCHEDULE) - 1)
                for i, ((name, _, _), n) in enumerate(zip(SCHEDULE, self.config.schedule_epochs,
                                                          strict=True))]

    def set_stage(self, index: int) -> None:
        if not 0 <= index < len(SCHEDULE):
            raise ValueError(f"stage {index} is outside 0..{len(SCHEDULE) - 1}")
        self.schedule_step = index
        _, train_encoder, train_decoder = SCHEDULE[index]
        self.encoder.requires_grad_(train_encoder)
        self.backbone.requires_grad_(train_decoder)
        self.train(self.training)

    def train(self, mode: bool = True) -> LatentSFTEncoder:
        super().train(mode)
        _, train_encoder, train_decoder = SCHEDULE[self.schedule_step]
        # A frozen module is a fixed function during its step: no dropout.
        if not train_encoder:
            self.encoder.eval()
        if not train_decoder:
            self.backbone.eval()
        return self

    @classmethod
    def ddp_find_unused_parameters(cls, config: MethodConfig) -> bool:
        return True  # the steps freeze the encoder, then the decoder, in turn

    # -- data ------------------------------------------------------------------------------
    def encode(self, example: Example) -> Features:
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

    def feature_length(self, features: Features) -> int:
        return len(features["encoder_ids"]) + len(features["input_ids"])

    def collate(self, features: list[Features]) -> EncoderBatch:
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
        return EncoderBatch(
            encoder_ids=pad("encoder_ids", self.tokenizer.pad_token_id, torch.long),
            encoder_kinds=encoder_kinds,
            encoder_mask=induction_mask(encoder_kinds, self.config.induction_mask),
            input_ids=pad("input_ids", self.tokenizer.pad_token_id, torch.long),
            latent=kinds == LATENT,
            mask=supervision_mask(kinds, blocks, self.config.supervision_mask),
            positions=pad("positions", 0, torch.long),
            labels=pad("labels", IGNORE, torch.long),
            weights=pad("weights", 0.0, torch.float),
            num_tokens=int((encoder_kinds != PAD).sum() + (kinds != PAD).sum()))

    # -- training --------------------------------------------------------------------------
    def forward(self, batch: EncoderBatch) -> StepOutput:
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
        metrics = {"l_sup_token": nll.detach().mean()}
        if self.config.orthogonality:
            latents, valid = padded_rows(z, batch["latent"])
            loss = with_orthogonality(loss, metrics, latents, self.config.orthogonality, valid)
        return StepOutput(loss, metrics)

    def encoder_states(self, ids: Tensor, kinds: Tensor, allowed: Tensor) -> Tensor:
        """The encoder's last-layer states at its compress tokens, in row-major order [S, d]."""
        encoder = self.encoder
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
        encoder = self.encoder
        if self.config.readout == "lm_head":
            return encoder.get_output_embeddings()(states)
        return states @ encoder.get_input_embeddings().weight.T

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
        batch = self.collate([self.encode(e) for e in examples])
        kinds = batch["encoder_kinds"].to(self.device)
        states = self.encoder_states(batch["encoder_ids"].to(self.device), kinds,
                                     batch["encoder_mask"].to(self.device))
        return states, (kinds == MARK).sum(-1).tolist()

    @torch.no_grad()
    def ecr(self, examples: Sequence[Example], k: int = 50, batch_size: int = 64) -> float:
        """ECR@K over `examples`: each latent's K most likely tokens by the encoder's readout
        logits over the whole vocabulary (not only α's `top_k` support) against the chunk it
        summarises."""
        vocab = self.backbone.get_input_embeddings().num_embeddings
        if not 1 <= k <= vocab:
            raise ConfigError(f"ECR@K needs 1 <= K <= the vocabulary size ({vocab}), got "
                              f"K = {k}", fix=f"give --option ecr_k=K with K between 1 and "
                                              f"{vocab}")
        indices = [i for batch in batches(examples, batch_size)
                   for i, _ in self.encoder_alphas(batch, k)]
        chunks = [self.chunks(e) for e in examples]
        if not any(chunks):
            raise DataError("no example has CoT steps, so there is no chunk to compress",
                            fix="analyse a split whose examples have steps")
        return ecr_at_k(indices, chunks, k)

    def analyses(self, task: Task, examples: list[Example], run_dir: Path,
                 options: BaseModel | None, batch_size: int,
                 max_new_tokens: int) -> dict[str, dict[str, Any]]:
        """ECR@K of this run's encoder (its decoder was not trained to produce latents)."""
        k = options.ecr_k if isinstance(options, LatentSFTAnalysis) else LatentSFTAnalysis().ecr_k
        require_trained_encoder(run_dir)
        out = report(self, run_dir, k, self.ecr(examples, k, batch_size))
        out["n_eff_note"] = ("N_eff and the length statistics need a phase-latent run: this "
                             "encoder run's decoder was not trained to produce latents")
        return {"latent_sft": out}


def require_trained_encoder(run_dir: Path) -> None:
    """Refuse a phase-encoder run whose best model has no encoder weights: its encoder would be
    as built, a copy of the decoder."""
    if not (run_dir / "best" / "method.safetensors").is_file():
        raise RunError(f"{run_dir / 'best'} has no method.safetensors (the encoder's weights)",
                       fix=f"train the phase-encoder run {run_dir} again")
