"""The LM head's cross-entropy, compiled along with a compiled model.

Apart from `backbones` so that methods use it without importing transformers' model code (a
config is checked before anything slow loads).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedModel

_COMPILED = "latentlab_compiled_head"  # a plain attribute: state dicts and copies keep working


def compile_head_loss(model: PreTrainedModel) -> None:
    """Make `head_cross_entropy` run compiled for `model` (`compile_transformers` does)."""
    setattr(model, _COMPILED, True)


def head_cross_entropy(model: PreTrainedModel, states: Tensor, targets: Tensor,
                       ignore_index: int, hits: bool = False) -> tuple[Tensor, Tensor | None]:
    """Cross-entropy of each row of `targets` under `model`'s LM head applied to `states`
    (float32 logits), and, with `hits`, whether the head's top token is the target.

    On a compiled model this runs compiled too: the upcast, the log-sum-exp and the argmax
    fuse into a pass over the head's output, so the float32 logits (tokens x vocabulary,
    3.3 GB for 16 x 1,024 GPT-2 tokens) are never written to memory.
    """
    head = model.get_output_embeddings()
    loss = _compiled_head_loss() if getattr(model, _COMPILED, False) else _head_loss
    return loss(head.weight, head.bias, states, targets, ignore_index, hits)


def _head_loss(weight: Tensor, bias: Tensor | None, states: Tensor, targets: Tensor,
               ignore_index: int, hits: bool) -> tuple[Tensor, Tensor | None]:
    logits = torch.nn.functional.linear(states, weight, bias).float()
    nll = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index,
                                            reduction="none")
    return nll, (logits.argmax(-1) == targets) if hits else None


@cache
def _compiled_head_loss() -> Callable[..., tuple[Tensor, Tensor | None]]:
    # One compiled function for every model, dynamic from the start: the number of labelled
    # rows changes from step to step.
    return torch.compile(_head_loss, dynamic=True)
