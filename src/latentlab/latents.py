"""Objectives on latents shared by every method that produces them (METHODS.md section 6)."""

from __future__ import annotations

import torch
from torch import Tensor


def orthogonality_penalty(latents: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over i != j of (Ẑ_i · Ẑ_j)^2 for each example's unit-normalised latents, averaged
    over the examples that have a pair. `latents`: [B, N_L, d]; `valid` [B, N_L] marks the
    latents an example has where their number varies (default: all). Zero when an example's
    latents are orthogonal.

    Paper A gives no formula; this is METHODS.md's choice. An example with fewer than two
    latents has no pair and adds nothing.
    """
    n = latents.shape[1]
    if n < 2:
        return latents.new_zeros(())
    unit = torch.nn.functional.normalize(latents.float(), dim=-1)
    squared = (unit @ unit.transpose(1, 2)).pow(2)  # [B, N_L, N_L] squared cosines
    pairs = ~torch.eye(n, dtype=torch.bool, device=latents.device)
    if valid is None:
        return squared[:, pairs].mean()
    weight = (valid[:, :, None] & valid[:, None, :] & pairs).float()
    count = weight.sum((1, 2))
    per_example = (squared * weight).sum((1, 2)) / count.clamp(min=1)
    has_pair = (count > 0).float()
    return (per_example * has_pair).sum() / has_pair.sum().clamp(min=1)


def with_orthogonality(loss: Tensor, metrics: dict[str, Tensor], latents: Tensor,
                       weight: float, valid: Tensor | None = None) -> Tensor:
    """`loss` + `weight` x `orthogonality_penalty(latents, valid)`, the penalty logged as
    `metrics["orthogonality"]`; `loss` itself when the weight is 0."""
    if not weight:
        return loss
    penalty = orthogonality_penalty(latents, valid)
    metrics["orthogonality"] = penalty.detach()
    return loss + weight * penalty


def padded_rows(values: Tensor, where: Tensor) -> tuple[Tensor, Tensor]:
    """Vectors given row-major for the True entries of `where` [B, T] (`values` [S, d], as
    boolean indexing lists them) as [B, N, d], N the most any row has, with the mask [B, N] of
    the entries each row has (for `orthogonality_penalty`)."""
    counts = where.sum(1)
    n = int(counts.max()) if where.numel() else 0  # a host read: for the penalty's width only
    rows = where.nonzero()[:, 0]
    rank = (where.cumsum(1) - 1)[where]
    out = values.new_zeros((where.shape[0], n, values.shape[-1]))
    out = out.index_put((rows, rank), values)
    valid = torch.arange(n, device=where.device) < counts[:, None]
    return out, valid
