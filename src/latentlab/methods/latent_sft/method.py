"""Latent-SFT's model and inference, shared by its two phases (`encoder_phase`,
`latent_phase`): the decoder is an LM whose latent steps superpose token embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from latentlab.engine.generation import (
    DecodeState,
    decode_completions,
    extend,
    greedy_decode,
    left_pad,
    prefill,
)
from latentlab.errors import ConfigError
from latentlab.methods.base import Method, MethodConfig, steps_text
from latentlab.methods.latent_sft.config import (
    COMPRESS,
    END_THINK,
    THINK,
    LatentSFTAnalysis,
    LatentSFTConfig,
)
from latentlab.methods.latent_sft.superposition import mixture, top_k_distribution
from latentlab.tasks.base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class LatentSFT(Method):
    """What both phases share; `implementation` picks the phase's class from the config."""

    name = "latent_sft"
    config_class = LatentSFTConfig
    config: LatentSFTConfig
    analysis_options = LatentSFTAnalysis
    phase: ClassVar[str]
    phases: ClassVar[dict[str, type[LatentSFT]]] = {}
    # Rows that stop their latents early leave masked columns inside a sequence, and the
    # encoder reads chunks through a custom mask.
    token_shift_ok = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        LatentSFT.phases[cls.phase] = cls

    @classmethod
    def implementation(cls, config: MethodConfig) -> type[Method]:
        return cls.phases[config.phase]  # type: ignore[attr-defined]

    def __init__(self, config: LatentSFTConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        self.think_id, self.end_id, self.mark_id = (
            tokenizer.convert_tokens_to_ids(t) for t in (THINK, END_THINK, COMPRESS))

    @classmethod
    def special_tokens(cls, config: MethodConfig) -> list[str]:
        # The same tokens, in the same order, in both phases: the soft labels' token ids then
        # mean the same in the encoder run and in the latent run.
        return [THINK, END_THINK, COMPRESS]

    def chunks(self, example: Example) -> list[list[int]]:
        """The CoT's tokens (as CoT training writes them) cut into `chunk_size` pieces; the last
        one may be shorter."""
        ids = self.tokens(steps_text(example.steps))
        r = self.config.chunk_size
        return [ids[i:i + r] for i in range(0, len(ids), r)]

    def latent_budget(self) -> int:
        # The number of latents varies per example (one per chunk of the CoT; at inference
        # until the model says </think>): this is its bound.
        return self.config.max_latent_steps

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int) -> list[str]:
        """Greedy completions after `</think>` (so they start with `### answer`)."""
        return self.generate_with_steps(examples, max_new_tokens)[0]

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
