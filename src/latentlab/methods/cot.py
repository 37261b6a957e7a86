"""Explicit chain of thought (CoT) and its ablation without steps (No-CoT).

CoT trains on `x s_1..s_K y` with the loss on steps and answer, and generates the steps before
the answer. No-CoT trains on `x y` and answers at once (METHODS.md section 2).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from latentlab.methods.base import (
    Batch,
    Features,
    Method,
    MethodConfig,
    StepOutput,
    lm_loss,
    sequence,
)
from latentlab.tasks.base import Example


class CoTConfig(MethodConfig):
    name: Literal["cot"] = "cot"
    question_loss: bool = Field(
        False, description="also predict the question's tokens (plain language modelling on "
        "the whole sequence; choice: the papers train pretrained backbones on steps and answer "
        "only, but a random-init backbone learns to copy names from the question far faster "
        "with it)")


class NoCoTConfig(CoTConfig):
    name: Literal["nocot"] = "nocot"  # type: ignore[assignment]


class CoT(Method):
    name = "cot"
    config_class = CoTConfig
    config: CoTConfig
    keep_steps: ClassVar[bool] = True

    def encode(self, example: Example) -> Features:
        return sequence([(self.prompt_ids(example), self.config.question_loss),
                         (self.target_ids(example, self.keep_steps), True)])

    def encode_text(self, ids: list[int]) -> Features:
        """Plain next-token prediction on the window (the Base's pretraining)."""
        return {"input_ids": ids, "labels": ids}

    def text_nll(self, batch: Batch) -> dict[str, Tensor]:
        ids = batch["input_ids"]
        logits = self.backbone(input_ids=ids).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return {"nll": nll}

    def forward(self, batch: Batch) -> StepOutput:
        # Right padding puts every pad after every real token, so the causal mask alone is
        # exact. No mask lets transformers drop it and SDPA use its flash kernel instead of
        # materialising B x H x T x T attention weights (about 20 GB per process for ProsQA
        # batches of GPT-2 small); an all-ones mask would do the same after reading it on the
        # host (a device sync per step). Embeddings, not ids: given ids and no mask,
        # transformers looks for pad tokens in them on the host (a sync, and a warning).
        embeds = self.backbone.get_input_embeddings()(batch["input_ids"])
        hidden = self.backbone.base_model(inputs_embeds=embeds).last_hidden_state
        return StepOutput(lm_loss(self.backbone, hidden, batch["labels"],
                                  batch.get("label_index")))


class NoCoT(CoT):
    name = "nocot"
    config_class = NoCoTConfig
    keep_steps = False
