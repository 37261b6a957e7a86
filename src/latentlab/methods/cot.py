"""Explicit chain of thought (CoT) and its ablation without steps (No-CoT).

CoT trains on `x s_1..s_K y` with the loss on steps and answer, and generates the steps before
the answer. No-CoT trains on `x y` and answers at once (METHODS.md section 2).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from latentlab.methods.base import (
    Batch,
    Features,
    Method,
    MethodConfig,
    StepOutput,
    answer_text,
    lm_loss,
    sequence,
    steps_text,
)
from latentlab.tasks.base import Example


class CoTConfig(MethodConfig):
    name: Literal["cot"] = "cot"


class NoCoTConfig(MethodConfig):
    name: Literal["nocot"] = "nocot"


class CoT(Method):
    name = "cot"
    config_class = CoTConfig
    keep_steps: ClassVar[bool] = True

    def encode(self, example: Example) -> Features:
        pieces = [(self.prompt_ids(example), False)]
        if self.keep_steps:
            pieces.append((self.tokens(steps_text(example.steps)), True))
        pieces.append(([*self.tokens(answer_text(example)), self.tokenizer.eos_token_id], True))
        return sequence(pieces)

    def forward(self, batch: Batch) -> StepOutput:
        # Right padding puts every pad after every real token, so the causal mask alone is
        # exact; passing no padding mask lets SDPA use its flash kernel instead of
        # materialising B x H x T x T attention weights.
        hidden = self.backbone.base_model(input_ids=batch["input_ids"]).last_hidden_state
        return StepOutput(lm_loss(self.backbone, hidden, batch["labels"]))


class NoCoT(CoT):
    name = "nocot"
    config_class = NoCoTConfig
    keep_steps = False
