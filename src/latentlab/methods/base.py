"""The method interface: one small contract every latent-reasoning method implements.

A method wraps a backbone (and any modules or parameters it owns), and
- `encode`s an `Example` into training features (token ids, label masks, ...),
- `collate`s features into a batch,
- turns a batch into a loss in `forward` (so DDP sees every training computation),
- `generate`s answers with its own inference loop,
- may define curriculum `stages` (Coconut) and saves itself with `save_pretrained`.

The engine drives these calls and knows nothing else about the method. Text layout is shared:
`question \\n` [steps, one per line] `### answer <eos>`, so that every method reads and writes
the same strings and scoring never depends on the method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latentlab.engine.generation import decode_completions, greedy_decode, left_pad, prefill
from latentlab.engine.interface import Stage, StepOutput
from latentlab.tasks.base import Example

ANSWER_MARKER = "###"
IGNORE = -100  # label of positions that carry no loss (the convention of torch's cross-entropy)


class MethodConfig(BaseModel):
    """Options of a method; subclasses add theirs and narrow `name` to a Literal."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


Features = dict[str, Any]
Batch = dict[str, Any]


class Method(nn.Module, ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer

    # -- vocabulary -------------------------------------------------------------------------
    @classmethod
    def special_tokens(cls, config: MethodConfig) -> list[str]:
        """Tokens this method adds to the vocabulary (e.g. `<pause>`); added before __init__."""
        return []

    # -- data ------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, example: Example) -> Features:
        """Training features of one example (plain Python data, no tensors)."""

    def collate(self, features: list[Features]) -> Batch:
        """Right-pad `input_ids`/`labels` into a batch; `num_tokens` counts real tokens."""
        longest = max(len(f["input_ids"]) for f in features)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(features), longest), pad, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "num_tokens": int(mask.sum())}

    # -- training --------------------------------------------------------------------------
    @abstractmethod
    def forward(self, batch: Batch) -> StepOutput:
        """The training loss of a batch."""

    def stages(self, epochs: int) -> list[Stage]:
        """The curriculum; by default one stage of `epochs` epochs."""
        return [Stage("train", epochs)]

    def set_stage(self, index: int) -> None:
        """Switch to curriculum stage `index` (changes what `encode` produces)."""

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int) -> list[str]:
        """Greedy completions of each example's prompt (KV-cached, batched, left-padded)."""
        prompts = [self.prompt_ids(e) for e in examples]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        state = prefill(self.backbone, mask, input_ids=ids)
        tokens = greedy_decode(self.backbone, state, max_new_tokens,
                               self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        return decode_completions(self.tokenizer, tokens)

    def prompt_ids(self, example: Example) -> list[int]:
        """The tokens the model reads before it starts to answer."""
        return self.tokens(prompt_text(example))

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, path: Path) -> None:
        """Backbone and tokenizer in Hugging Face format under `model/`, the method's own
        parameters (soft tokens, a coprocessor, ...) in `method.safetensors`."""
        self.backbone.save_pretrained(path / "model")
        self.tokenizer.save_pretrained(path / "model")
        extra = self.extra_state_dict()
        if extra:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()},
                      path / "method.safetensors")

    def load_extra_state(self, path: Path) -> None:
        file = path / "method.safetensors"
        if file.is_file():
            self.load_state_dict(load_file(file), strict=False)

    def extra_state_dict(self) -> dict[str, Tensor]:
        """Parameters and buffers the method owns beyond the backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # -- helpers ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(example: Example) -> str:
    return example.question + "\n"


def steps_text(steps: tuple[str, ...] | list[str]) -> str:
    return "".join(step + "\n" for step in steps)


def answer_text(example: Example) -> str:
    return f"{ANSWER_MARKER} {example.answer}"


def extract_answer(completion: str) -> str:
    """The answer in a completion: the line after the last answer marker ('' if none)."""
    if ANSWER_MARKER not in completion:
        return ""
    tail = completion.rsplit(ANSWER_MARKER, 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


def sequence(pieces: list[tuple[list[int], bool]]) -> Features:
    """Concatenate token pieces; those flagged True are predicted (carry labels)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in pieces:
        input_ids += ids
        labels += ids if trained else [IGNORE] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def lm_loss(backbone: PreTrainedModel, hidden: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of `labels[t]` predicted from the last-layer state at `t-1`.

    Only the positions that carry a label go through the LM head: with a 50k vocabulary the
    full logits tensor would dominate memory, and most positions (the question) have no label.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = backbone.get_output_embeddings()(hidden[:, :-1][keep])
    return nn.functional.cross_entropy(logits.float(), targets[keep])
