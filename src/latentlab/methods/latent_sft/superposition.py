"""The superposition maths of Latent-SFT: a latent is a convex combination of token embeddings,
`z = α^T E`, with α sparse (top-k) and, in phase latent, Gumbel-noised."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

MAX_REDRAWS = 100  # Gumbel redraws of a slot whose noisy top-1 is </think>, before masking it


def top_k_distribution(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`α = softmax(logits restricted to the top k)` as (indices [S, k], probabilities [S, k]),
    most likely first; k = 0 (or >= V) keeps the whole vocabulary."""
    vocab = logits.shape[-1]
    top = logits.float().topk(vocab if k == 0 else min(k, vocab), dim=-1)
    return top.indices, top.values.softmax(-1)


def mixture(table: Tensor, indices: Tensor, probs: Tensor) -> Tensor:
    """`z = α^T E` for sparse α ([S, k] indices and probabilities): [S, d]."""
    dense = probs.new_zeros((probs.shape[0], table.shape[0])).scatter(1, indices, probs)
    return dense.to(table.dtype) @ table


def latent_kl(logits: Tensor, indices: Tensor, probs: Tensor) -> Tensor:
    """Mean over rows of `KL(p̃ || q)`, `q = softmax(logits)` over the full vocabulary [S, V],
    `p̃` sparse ([S, k]; zero outside `indices`)."""
    log_q = torch.log_softmax(logits.float(), dim=-1).gather(1, indices)
    probs = probs.float()
    return (torch.xlogy(probs, probs) - probs * log_q).sum(-1).mean()


def noise_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, example index): a resumed run, any process
    and any batch composition draw the same noise for the same example and epoch."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _gumbel(shape: tuple[int, ...], generator: torch.Generator,
            clamp: tuple[float, float] | None) -> Tensor:
    # U in [tiny, 1): -log(-log U) is finite
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
    uniform = uniform.clamp(min=torch.finfo(torch.float64).tiny)
    noise = -torch.log(-torch.log(uniform))
    if clamp is not None:
        noise = noise.clamp(*clamp)
    return noise.float()


def gumbel_targets(probs: Tensor, is_end: Tensor, generator: torch.Generator, scale: float = 1.0,
                   clamp: tuple[float, float] | None = (-1.5, 3.0), tau: float = 1.0,
                   reject_end: bool = True) -> Tensor:
    """`p̃ = softmax((log α + g) / τ)` per row of α ([S, k] probabilities; zeros stay zero),
    `g = scale * clamp(Gumbel(0, 1))`. With `reject_end`, a row whose noisy top-1 is the end
    token (`is_end` [S, k] marks it) is redrawn; after MAX_REDRAWS (α's top-1 is the end token
    and the noise cannot move it) the end token leaves that row's support, unless it is all of it.
    """
    log_alpha = probs.float().log()
    noise = scale * _gumbel(tuple(probs.shape), generator, clamp)
    if reject_end:
        for _ in range(MAX_REDRAWS):
            bad = is_end.gather(1, (log_alpha + noise).argmax(-1, keepdim=True))[:, 0]
            if not bad.any():
                break
            noise[bad] = scale * _gumbel((int(bad.sum()), probs.shape[1]), generator, clamp)
        else:
            others = ((probs > 0) & ~is_end).any(-1)
            log_alpha = log_alpha.masked_fill(is_end & (bad & others)[:, None], -math.inf)
    return ((log_alpha + noise) / tau).softmax(-1)
