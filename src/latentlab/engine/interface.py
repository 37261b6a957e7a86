"""What the engine and a trained module exchange: a step's output and a curriculum stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import Tensor


@dataclass
class StepOutput:
    """What a trained module's `forward` returns: the loss and detached numbers to log."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: the engine calls `set_stage(index)` and re-prepares the data."""

    name: str
    epochs: int
    reset_optimizer: bool = False
    # Whether validations in this stage compete for `best/`: a curriculum's early stages train
    # a different model (Coconut's stage 0 is plain CoT) and must not be selected as it.
    select: bool = True


def batch_to(batch: dict[str, Any], device: torch.device | str,
             non_blocking: bool = False) -> dict[str, Any]:
    """A collated batch with its tensors on `device`, nested batches (one per role, as CODI's
    teacher and student) included; host-side entries such as `num_tokens` stay as they are."""
    return send_to_device(batch, device, non_blocking=non_blocking)
