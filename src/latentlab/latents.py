"""Objectives on latents shared by every method that produces them (METHODS.md section 6)."""

from __future__ import annotations

import torch
from torch import Tensor


def orthogonality_penalty(latents: Tensor) -> Tensor:
    """Mean over i != j of (Ẑ_i · Ẑ_j)^2 for each example's unit-normalised latents, averaged
    over the batch. `latents`: [B, N_L, d]. Zero when an example's latents are orthogonal.

    Paper A gives no formula; this is METHODS.md's choice. With N_L = 1 there is no pair and
    the penalty is 0.
    """
    n = latents.shape[1]
    if n < 2:
        return latents.new_zeros(())
    unit = torch.nn.functional.normalize(latents.float(), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # [B, N_L, N_L] cosine similarities
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=latents.device)
    return gram[:, off_diagonal].pow(2).mean()
