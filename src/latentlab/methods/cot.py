"""Explicit chain of thought (CoT) and its ablation without steps (No-CoT).

CoT trains on `x s_1..s_K y` with the loss on steps and answer, and generates the steps before
the answer. No-CoT trains on `x y` and answers at once (METHODS.md section 2).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from latentlab.methods.base import (
    Features,
    Method,
    MethodConfig,
    StepOutput,
    TokenBatch,
    pack_rows,
    part_lm_loss,
    right_padded_states,
    sequence,
)
from latentlab.tasks.base import Example


class CoTConfig(MethodConfig):
    name: Literal["cot"] = "cot"
    question_loss: float = Field(
        0.0, ge=0.0, description="weight of the question's tokens in the loss, which is the "
        "mean over steps and answer plus this times the mean over the question (0: the "
        "papers' loss on steps and answer only; `true` reads as 1). Question text is mostly "
        "random facts whose loss cannot fall far, so with weight 1 it dominates what is logged; "
        "the per-part losses (loss_question, loss_steps, loss_answer) show each")
    packing: bool = Field(
        False, description="pack each batch's examples into as few rows as its longest "
        "example allows (first fit, longest first), each with its own positions and attention "
        "(transformers' packed-sequence masks): no compute on padding, the same examples per "
        "step and the same loss")


class NoCoTConfig(CoTConfig):
    name: Literal["nocot"] = "nocot"  # type: ignore[assignment]


class CoT(Method):
    name = "cot"
    config_class = CoTConfig
    compile_pays = True
    config: CoTConfig
    keep_steps: ClassVar[bool] = True

    def encode(self, example: Example) -> Features:
        question = "question" if self.config.question_loss else None
        return sequence([(self.prompt_ids(example), question),
                         *self.target_pieces(example, self.keep_steps)])

    def encode_text(self, ids: list[int]) -> Features:
        """Plain next-token prediction on the window (the Base's pretraining)."""
        return {"input_ids": ids, "labels": ids}

    def text_nll(self, batch: TokenBatch) -> dict[str, Tensor]:
        ids = batch["input_ids"]
        logits = self.backbone(input_ids=ids).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return {"nll": nll}

    def collate(self, features: list[Features]) -> TokenBatch:
        if not self.config.packing or "parts" not in features[0]:  # text windows are full
            return super().collate(features)
        width = max(len(f["input_ids"]) for f in features)
        rows = pack_rows([len(f["input_ids"]) for f in features], width)
        return self.collate_rows(features, rows, width, packed=True)

    def forward(self, batch: TokenBatch) -> StepOutput:
        embeds = self.backbone.get_input_embeddings()(batch["input_ids"])
        hidden = right_padded_states(self.backbone, embeds, batch.get("position_ids"))
        return StepOutput(*part_lm_loss(self.backbone, hidden, batch, self.config.question_loss))


class NoCoT(CoT):
    name = "nocot"
    config_class = NoCoTConfig
    keep_steps = False
