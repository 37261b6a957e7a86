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

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Assemble(torch.autograd.Function):
    """The first `end` columns of `buffer` (dim -2), which hold `pieces` side by side."""

    @staticmethod
    def forward(ctx: Any, buffer: Tensor, end: int, *pieces: Tensor) -> Tensor:
        # Kept for the backward's widths and for `engine.deferred_grads`, which reads them off
        # the output's `grad_fn` (this ctx): the pieces are inputs, so holding them makes no
        # reference cycle with the graph.
        ctx.pieces = pieces
        return buffer[..., :end, :]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return None, None, *grad.split([p.shape[-2] for p in ctx.pieces], dim=-2)


class PiecewiseLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers of a fixed width (see above)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.length = 0
        self.key_pieces: list[Tensor] = []
        self.value_pieces: list[Tensor] = []

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (*key_states.shape[:-2], self.width)
        self.key_buffer = key_states.new_empty(*shape, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(*shape, value_states.shape[-1])
        # Aliases with their own version counters: writes through them are not seen by the
        # in-place check of earlier passes' saved views (see the module docstring).
        self.key_writer, self.value_writer = self.key_buffer.data, self.value_buffer.data
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.width:
            raise ValueError(f"the passes feed {end} columns into a cache of {self.width}")
        self.key_writer[..., start:end, :] = key_states.detach()
        self.value_writer[..., start:end, :] = value_states.detach()
        self.key_pieces.append(key_states)
        self.value_pieces.append(value_states)
        self.length = end
        self.keys = Assemble.apply(self.key_buffer, end, *self.key_pieces)
        self.values = Assemble.apply(self.value_buffer, end, *self.value_pieces)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class PiecewiseCache(DynamicCache):
    # The bookkeeping (lists of pieces, a length) runs outside compiled code: traced, it would
    # be guarded on, and a compiled layer would compile again for every pass of every stage.
    update = torch.compiler.disable(DynamicCache.update)


def piecewise_cache(model: PreTrainedModel, width: int) -> DynamicCache:
    """A `DynamicCache` for `model` whose plain layers are `PiecewiseLayer`s of `width`
    columns (other kinds, e.g. sliding-window layers, keep transformers' own)."""
    cache = PiecewiseCache(config=model.config)
    cache.layers = [PiecewiseLayer(width) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
