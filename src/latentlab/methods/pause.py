"""Single-model latent baselines: pause tokens and the soft-embedding baseline.

Both put `N_L` latent positions between the question and the answer and train the whole model
in one forward pass (METHODS.md section 2):
- **pause** (`<pause>` x N_L): one learned token repeated, as in Goyal et al. and Coconut's
  "pause as thought" baseline;
- **soft** (paper A's "unified" baseline): `N_L` distinct trainable vectors, an `N_L x d`
  parameter, at the latent positions.
The latents `Z` are the last-layer states at those positions (what the orthogonality penalty
and the analyses read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from latentlab.engine.generation import DecodeState, left_pad, prefill
from latentlab.latents import with_orthogonality
from latentlab.methods.base import (
    Features,
    LatentConfig,
    Method,
    StepOutput,
    TokenBatch,
    part_lm_loss,
    prompt_text,
    right_padded_states,
    sequence,
)
from latentlab.tasks.base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class PauseConfig(LatentConfig):
    name: Literal["pause"] = "pause"


class SoftEmbeddingConfig(LatentConfig):
    name: Literal["soft"] = "soft"


class Pause(Method):
    name = "pause"
    config_class = PauseConfig
    compile_pays = True
    slot_token: ClassVar[str] = "<pause>"

    @classmethod
    def special_tokens(cls, config: LatentConfig) -> list[str]:  # type: ignore[override]
        return [cls.slot_token]

    @property
    def slot_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.slot_token)

    def prompt_ids(self, example: Example) -> list[int]:
        return [*self.tokens(prompt_text(example)), *[self.slot_id] * self.config.latent_budget]

    def encode(self, example: Example) -> Features:
        return sequence([(self.prompt_ids(example), None),
                         *self.target_pieces(example, self.config.keep_steps)])

    def forward(self, batch: TokenBatch) -> StepOutput:
        ids = batch["input_ids"]
        hidden = right_padded_states(self.backbone, self.embed(ids))
        loss, metrics = part_lm_loss(self.backbone, hidden, batch)
        metrics["lm_loss"] = loss.detach()
        if self.config.orthogonality:  # slot_states reads the ids on the host: only when used
            loss = with_orthogonality(loss, metrics, self.slot_states(ids, hidden),
                                      self.config.orthogonality)
        return StepOutput(loss, metrics)

    def slot_states(self, ids: Tensor, hidden: Tensor) -> Tensor:
        """[B, N_L, d]: the states at the latent positions (every row has exactly N_L)."""
        return hidden[ids == self.slot_id].view(ids.shape[0], self.config.latent_budget, -1)

    @torch.no_grad()
    def latent_inputs(self, examples: list[Example]) -> Tensor:
        """The inputs at the N_L slots, [n, N_L, d]: the same for every question (the pause
        token's embedding, or soft's vectors), so only zeros change them."""
        ids, _ = left_pad([self.prompt_ids(e) for e in examples], self.tokenizer.pad_token_id,
                          self.device)
        return self.embed(ids)[:, -self.config.latent_budget:]

    def before_answer(self, examples: list[Example],
                      latent_inputs: Tensor | None = None) -> DecodeState:
        ids, mask = left_pad([self.prompt_ids(e) for e in examples],
                             self.tokenizer.pad_token_id, self.device)
        embeds = self.embed(ids)
        if latent_inputs is not None:  # left padding puts every row's slots last
            n = self.config.latent_budget
            embeds = torch.cat([embeds[:, :-n], latent_inputs.to(embeds.dtype)], 1)
        return prefill(self.backbone, mask, inputs_embeds=embeds)

    @torch.no_grad()
    def latents(self, examples: list[Example]) -> Tensor:
        """The latents `Z` of each example: [n, N_L, d]."""
        ids, mask = left_pad([self.prompt_ids(e) for e in examples],
                             self.tokenizer.pad_token_id, self.device)
        out = self.backbone.base_model(inputs_embeds=self.embed(ids), attention_mask=mask,
                                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        # Left padding puts every row's N_L slots in the last N_L columns.
        return out.last_hidden_state[:, -self.config.latent_budget:]


class SoftEmbedding(Pause):
    name = "soft"
    config_class = SoftEmbeddingConfig
    slot_token = "<latent>"  # a placeholder id; its embedding is replaced by the slot's vector

    def __init__(self, config: LatentConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        table = backbone.get_input_embeddings().weight
        # Initialised at the scale of the token embeddings, so the first steps see inputs of
        # the magnitude the backbone expects.
        self.soft_tokens = nn.Parameter(
            torch.randn(config.latent_budget, table.shape[1]) * table.detach().std())

    def embed(self, ids: Tensor) -> Tensor:
        embeds = super().embed(ids)
        slots = ids == self.slot_id
        index = (slots.cumsum(dim=1) - 1).clamp(min=0)  # which of the N_L vectors goes where
        return torch.where(slots[..., None], self.soft_tokens[index].to(embeds.dtype), embeds)
