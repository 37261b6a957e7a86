"""Latent-SFT phase 2, the latent LM (paper D, stage 2; METHODS.md section 5).

The trained encoder's `α` of every training example are stored once (`soft_labels`); the
backbone learns `x <think> [N slots] </think> y <eos>` where slot `t` reads `p̃_t^T E`,
`p̃_t = softmax((log α_t + g_t) / τ)` with Gumbel noise `g_t`, and `L = L_exp + λ L_lat`,
`L_lat = mean_t KL(p̃_t || q_t)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from latentlab.errors import LatentlabError, RunError
from latentlab.latents import padded_rows, with_orthogonality
from latentlab.methods.base import (
    Features,
    Stage,
    StepOutput,
    TokenBatch,
    part_lm_loss,
    right_padded_states,
    sequence,
)
from latentlab.methods.latent_sft.config import LatentSFTAnalysis, LatentSFTConfig
from latentlab.methods.latent_sft.encoder_phase import LatentSFTEncoder, require_trained_encoder
from latentlab.methods.latent_sft.method import LatentSFT
from latentlab.methods.latent_sft.metrics import latent_measures, report
from latentlab.methods.latent_sft.soft_labels import SoftLabels, encoder_labels
from latentlab.methods.latent_sft.superposition import (
    gumbel_targets,
    latent_kl,
    mixture,
    noise_generator,
)
from latentlab.tasks.base import Example, Task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class LatentBatch(TokenBatch, total=False):
    """The latent phase's batch (`LatentSFTLatent.collate`): CoT's right-padded rows with the
    slots and their noisy targets, in row-major order of the S slots of the batch."""

    slot: Tensor  # [B, T] bool: the slot columns
    slot_indices: Tensor  # [S, k]: vocabulary targets, the tokens of each slot's soft label
    slot_probs: Tensor  # [S, k]: their probabilities
    slot_values: Tensor  # [S, d]: hidden-state targets (instead of the two above)


class LatentSFTLatent(LatentSFT):
    phase = "latent"

    def __init__(self, config: LatentSFTConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        self.epoch = 0  # the epoch whose noise `encode` draws
        self._labels: SoftLabels | None = None

    def upstream_options(self) -> list[str]:
        return ["encoder_from"]

    def stages(self, epochs: int) -> list[Stage]:
        """One stage per epoch, so that the engine re-encodes the data each epoch and `encode`
        draws that epoch's noise."""
        return [Stage(f"epoch-{e}", 1) for e in range(epochs)]

    def set_stage(self, index: int) -> None:
        self.epoch = index

    def scores_held_out_loss(self) -> bool:
        return False  # the targets are soft labels of the training split only

    # -- data ------------------------------------------------------------------------------
    def encode(self, example: Example) -> Features:
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

    def collate(self, features: list[Features]) -> LatentBatch:
        """The right-padded batch of every method, plus the slots and their noisy targets:
        `slot` [B, T] marks slot columns; `slot_indices`/`slot_probs` [S, k] (vocabulary) or
        `slot_values` [S, d] (hidden) hold the targets of the S slots in row-major order."""
        batch = LatentBatch(**super().collate(features))
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
    def forward(self, batch: LatentBatch) -> StepOutput:
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
        metrics |= {"l_exp": l_exp.detach(), "l_lat": l_lat.detach()}
        if self.config.orthogonality:
            latents, valid = padded_rows(inputs, slot)
            loss = with_orthogonality(loss, metrics, latents, self.config.orthogonality, valid)
        return StepOutput(loss, metrics)

    def soft_labels(self) -> SoftLabels:
        """The encoder run's soft labels of its training split, built on first use (by the
        main process; the others wait) under `ENCODER_RUN/soft_labels/`."""
        if self._labels is None:
            self._labels = encoder_labels(self.open_run("encoder_from"), self.config,
                                          self.tokenizer)
        return self._labels

    # -- analyses --------------------------------------------------------------------------
    def analyses(self, task: Task, examples: list[Example], run_dir: Path,
                 options: BaseModel | None, batch_size: int,
                 max_new_tokens: int) -> dict[str, dict[str, Any]]:
        """ECR@K of the encoder run this model learned from, `#L` against the CoT's length,
        Pass@1 and, where the task enumerates its solutions, N_eff."""
        k = options.ecr_k if isinstance(options, LatentSFTAnalysis) else LatentSFTAnalysis().ecr_k
        encoder, source = self._encoder_model(run_dir)
        ecr = encoder.ecr(examples, k, batch_size)
        del encoder  # a second model: freed before generating
        out = report(self, source, k, ecr)
        return {"latent_sft": latent_measures(self, task, examples, out, batch_size,
                                              max_new_tokens)}

    def _encoder_model(self, run_dir: Path) -> tuple[LatentSFTEncoder, Path]:
        """The trained encoder of the run `encoder_from` names, with errors that name the path
        and the fix."""
        where = f"the encoder run {self.config.encoder_from} (method.encoder_from of {run_dir})"
        fix = (f"restore the phase-encoder run at {self.config.encoder_from}, or set "
               f"method.encoder_from in {run_dir / 'config.yaml'} to where it is now")
        try:
            upstream = self.open_run("encoder_from")
            encoder = upstream.load()
        except LatentlabError as err:
            raise RunError(f"{where} cannot be loaded: {err.problem}", fix=fix) from err
        if not isinstance(encoder, LatentSFTEncoder):
            raise RunError(f"{where} is not a latent_sft phase-encoder run", fix=fix)
        require_trained_encoder(upstream.run_dir)
        return encoder, upstream.run_dir
