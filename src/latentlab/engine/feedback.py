"""Training passes whose inputs come from the model's own states (continuous thoughts).

Coconut and CODI feed column bot+j the model's last-layer state at column bot+j-1 (CODI
through a projection), so a training step runs n+1 passes over one `piecewise_cache`: pass 0
covers columns [0, bot]; pass j (1..n-1) the single column bot+j; the last pass column bot+n
to the end. Every column is fed its final input exactly once, after all the columns it
attends to, which is all a causal model with a cache needs to be exact (tests/test_coconut.py
and tests/test_codi.py check it against full recomputation, loss and every gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from latentlab.engine.generation import pad_safe_attention, with_cache
from latentlab.engine.piecewise_cache import piecewise_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# SDPA backends for the single-column passes while a CUDA graph records the step without
# deferred gradients (deferred, those passes' attention is `DeferredPrefixAttention`), in
# order of preference. For one query row over 357 keys, cuDNN's kernel takes 60% of flash's time
# once replayed (forward and backward, H100: 105 against 166 us; H200: 90 against 151), but
# launched eagerly its host-side setup can cost more than that (H200: 505 against 232 us).
# benchmarks/sdpa_single_query.py; results in benchmarks/results/sdpa_single_query_*.json.
SINGLE_QUERY_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                         SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# feed(j, previous, given): the input of column bot+j from the last-layer state of column
# bot+j-1 (`previous`, [B, 1, d]) and the input the column holds (`given`, [B, 1, d]).
Feed = Callable[[int, Tensor, Tensor], Tensor]


def feedback_passes(model: PreTrainedModel, embeds: Tensor, mask: Tensor, left_padded: bool,
                    bot: int, n: int, feed: Feed, last_pass_layers: bool = False
                    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Last-layer states [B, T, d] of every column of `embeds` (rows aligned so that every
    row's thoughts start after column `bot`; `mask` marks the real tokens), columns bot+1 ..
    bot+n fed by `feed`; with `last_pass_layers`, also every layer's states (`hidden_states`,
    embedding output first) of the last pass's columns."""
    width = embeds.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding starts each row at 0
    cache = piecewise_cache(model, width)  # no copy of earlier columns per pass
    # One mask for all passes (pass j reads its rows start:end). Only left pads can be queries
    # that see nothing (see generation.padded_attention); right padding alone is exact under
    # the causal mask and gets none, so SDPA may take its flash kernel. The caller's collate
    # knows which: no device sync decides it (reading the mask cost a sync per pass).
    allowed = pad_safe_attention(model, mask, width) if left_padded else None
    recording = embeds.is_cuda and torch.cuda.is_current_stream_capturing()
    outputs: list[Tensor] = []
    layers = None
    for j in range(n + 1):
        # Bounds by arithmetic on `bot` (not a list of them): a traced step keeps `bot`
        # symbolic, so torch.compile does not recompile per question length.
        start = 0 if j == 0 else bot + j
        end = width if j == n else bot + j + 1
        chunk = embeds[:, start:end]
        if j > 0:
            first = feed(j, outputs[-1][:, -1:], chunk[:, :1]).to(chunk.dtype)
            chunk = first if end - start == 1 else torch.cat([first, chunk[:, 1:]], 1)
        with (sdpa_kernel(SINGLE_QUERY_BACKENDS, set_priority=True)
              if recording and 0 < j < n else contextlib.nullcontext()):
            out = model.base_model(
                inputs_embeds=chunk,
                attention_mask=None if allowed is None else allowed[..., start:end, :end],
                position_ids=positions[:, start:end], **with_cache(model.base_model, cache),
                use_cache=True, output_hidden_states=last_pass_layers and j == n)
        outputs.append(out.last_hidden_state)
        if last_pass_layers and j == n:
            layers = out.hidden_states
    return torch.cat(outputs, dim=1), layers
