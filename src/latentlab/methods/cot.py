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
    right_padded_states,
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
        embeds = self.backbone.get_input_embeddings()(batch["input_ids"])
        hidden = right_padded_states(self.backbone, embeds)
        return StepOutput(lm_loss(self.backbone, hidden, batch["labels"],
                                  batch.get("label_index")))


class NoCoT(CoT):
    name = "nocot"
    config_class = NoCoTConfig
    keep_steps = False
