"""A key/value cache for training passes that feed one sequence in pieces, with gradients.

Coconut's training step feeds a sequence in n+1 passes (the prefix, then one thought column at
a time) and backpropagates through the cache. Transformers' `DynamicCache` concatenates each
pass's keys and values onto the cache: a copy of the whole cache per pass and layer, and
autograd keeps every copy for the backward pass (on an H100, 10% of a GPT-2 small Coconut step
went to these copies, docs/results.md).

`piecewise_cache` gives each plain layer a buffer of the sequence's full width instead. A pass
writes its keys and values into the buffer at their columns, and attention reads the columns
written so far as a view: no copy of earlier columns, nothing extra kept for backward.
`Assemble` is that read for autograd: its backward hands each piece its columns of the
gradient, which is what the concatenation's backward does.

The writes bypass autograd's in-place check on purpose. A pass writes only columns after those
that earlier passes read, so what their backward needs is never changed; the check cannot see
that (it counts writes per tensor, not per column), so writes go through an alias of the buffer
with its own version counter (`Tensor.data`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from latentlab.engine.deferred_grads import when_backward_ends


class ColumnGrads:
    """The bookkeeping of `Assemble`'s backward for one `Columns`: where each piece sits, how
    many passes read it, and during the backward pass the gradient of the whole width. It
    holds no tensor of the autograd graph: `Assemble`'s nodes keep it alive, and a reference
    back to the graph would keep the graph alive past the step (a reference cycle)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.bounds: list[tuple[int, int]] = []  # per piece: its columns
        self.readers: list[int] = []  # per piece: the passes whose attention read it
        self.pending: list[int] | None = None  # per piece: readers whose backward is to come
        self.grad: Tensor | None = None

    def add_piece(self, width: int) -> int:
        """Record a piece of `width` columns after the others, read by this pass and all
        later ones; the end of its columns."""
        start = self.bounds[-1][1] if self.bounds else 0
        end = start + width
        if end > self.width:
            raise ValueError(f"the passes feed {end} columns into a cache of {self.width}")
        self.bounds.append((start, end))
        self.readers = [r + 1 for r in self.readers] + [1]
        return end

    def gradients(self, grad: Tensor) -> list[Tensor | None]:
        """One reader's gradient added to the width's; a piece gets its columns of it once its
        last reader has added its own (autograd sums what each reader returns)."""
        if self.pending is None:
            self.pending = list(self.readers)
            self.grad = grad.new_zeros(*grad.shape[:-2], self.width, grad.shape[-1])
            when_backward_ends(self._check)
        assert self.grad is not None
        self.grad[..., :grad.shape[-2], :] += grad
        out: list[Tensor | None] = []
        for i, (start, end) in enumerate(self.bounds[:len(self.pending)]):
            if start >= grad.shape[-2]:
                break
            self.pending[i] -= 1
            out.append(self.grad[..., start:end, :] if self.pending[i] == 0 else None)
        if not any(self.pending):
            self.pending, self.grad = None, None  # a retained graph may run backward again
        return out

    def _check(self) -> None:
        """When autograd finishes: every piece got its gradient (a reader whose output does
        not reach the loss never runs its backward, and its pieces would wait for it)."""
        if self.pending is not None:
            self.pending, self.grad = None, None
            raise RuntimeError("piecewise cache: a pass's attention output does not reach the "
                               "loss, so the gradients of the keys and values it read are "
                               "incomplete; feed every pass's output into the loss")


class Columns:
    """One layer's keys (or values): the full-width buffer and the pieces written into it."""

    def __init__(self, like: Tensor, width: int) -> None:
        self.buffer = like.new_empty(*like.shape[:-2], width, like.shape[-1])
        # An alias with its own version counter: writes through it are not seen by the
        # in-place check of earlier passes' saved views (see the module docstring).
        self.writer = self.buffer.data
        self.pieces: list[Tensor] = []
        self.grads = ColumnGrads(width)

    def write(self, piece: Tensor) -> Tensor:
        """Add `piece` after the columns written so far; the columns written so far."""
        end = self.grads.add_piece(piece.shape[-2])
        self.writer[..., end - piece.shape[-2]:end, :] = piece.detach()
        self.pieces.append(piece)
        return Assemble.apply(self.buffer[..., :end, :], self.grads, *self.pieces)


class Assemble(torch.autograd.Function):
    """`columns` (a view of the buffer), which hold `pieces` side by side, for autograd.

    Backward: autograd would add up each piece's gradient from every later pass that read it,
    one small addition per piece and pass; instead each reader adds its gradient into one
    buffer of the full width, and a piece takes its columns when its last reader is done
    (`ColumnGrads`).
    """

    @staticmethod
    def forward(ctx: Any, columns: Tensor, grads: ColumnGrads,  # type: ignore[override]
                *pieces: Tensor) -> Tensor:
        ctx.grads = grads
        return columns

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return None, None, *ctx.grads.gradients(grad)


class PiecewiseLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers of a fixed width (see above)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_columns = Columns(key_states, self.width)
        self.value_columns = Columns(value_states, self.width)
        self.is_initialized = True

    # Eager under torch.compile: traced, the bookkeeping of `Columns` would run only once.
    @torch.compiler.disable
    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self.key_columns.write(key_states)
        self.values = self.value_columns.write(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.key_columns.grads.bounds[-1][1] if self.is_initialized else 0


def piecewise_cache(model: PreTrainedModel, width: int) -> DynamicCache:
    """A `DynamicCache` for `model` whose plain layers are `PiecewiseLayer`s of `width`
    columns (other kinds, e.g. sliding-window layers, keep transformers' own)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PiecewiseLayer(width) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
