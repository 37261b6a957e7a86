"""Latent-SFT's options, special tokens and position kinds, shared by its two phases."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from latentlab.methods.base import MethodConfig

THINK, END_THINK, COMPRESS = "<think>", "</think>", "<L>"

# What each position of a sequence is; the masks are written in terms of these.
PAD, PROMPT, TEXT, MARK, LATENT, CHUNK, TAIL = range(7)
# PROMPT: `x <think>`; TEXT: chunk tokens read by the encoder; MARK: the encoder's compress
# tokens; LATENT: a decoder position that reads a latent; CHUNK: decoder chunk tokens; TAIL:
# `</think> y <eos>` (and the encoder's closing `</think>`).

# The three steps of phase `encoder`: which of (encoder, decoder) trains.
SCHEDULE = (("encoder-only", True, False), ("decoder-only", False, True), ("union", True, True))


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
    orthogonality: float = Field(0.0, ge=0.0, description="λ of the orthogonality penalty on "
                                 "each example's latents z (METHODS.md section 6): the "
                                 "encoder's in phase encoder, the fed slots' in phase latent")
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


class LatentSFTAnalysis(BaseModel):
    """Options of Latent-SFT's own analyses (`latentlab analyze --option NAME=VALUE`)."""

    model_config = ConfigDict(extra="forbid")
    ecr_k: int = Field(50, ge=1, description="K of ECR@K: the top-K tokens of a latent, by the "
                       "encoder's readout logits, searched for its chunk's tokens (D: 50)")
