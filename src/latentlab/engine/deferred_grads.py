"""Gradients of what the passes of a step share, computed once per step instead of per pass.

Coconut's training step runs the backbone n+1 times: the prefix, then one column per thought,
then the rest. Two things are shared by the passes, and autograd computes the gradient of each
once per pass and adds them up:
- every parameter: per pass and layer, a matrix product per weight, a reduction per bias, a
  layer norm's affine gradients and an addition per parameter;
- the prefix's cached keys and values, which every one-column pass attends to: per pass and
  layer, an attention backward that writes a gradient of the prefix's full width, then an
  addition of it into the prefix's.
For a one-column pass these are small kernels, and replayed from a CUDA graph they are a large
part of what the thought passes cost (docs/results.md).

Inside `defer_shared_grads()`, the linear maps (`F.linear`, and `torch.addmm` as GPT-2's
Conv1D calls it), layer norms and embeddings that use trainable parameters, and the attention
of query rows that all see the same keys read from a `piecewise_cache` over a cached prefix,
run as `Deferred*` functions. Their backward computes the input's gradient at once but only
files what the shared tensors' gradients need with the shared tensors' `_Group`: for a weight,
each call's inputs x_j and output gradients dy_j; for the prefix's keys, each call's score
gradients dS_j and queries q_j (its values: probabilities P_j and output gradients dO_j). The
call whose backward runs last computes the gradient for all calls together: sum_j x_j^T dy_j,
sum_j dS_j^T q_j, sum_j P_j^T dO_j, as one product over the calls' rows stacked (a call with
more rows than all others, the long first pass, gets a product of its own). Autograd sums what
each call returns, so the other calls return no gradient.

Which call runs last does not matter: a group counts its calls in the forward pass. A call
whose output does not reach the loss never runs its backward, so its group would never
complete; that is checked when autograd finishes and raised as an error, never a gradient
silently lost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from latentlab.engine.piecewise_cache import Assemble
from latentlab.errors import RunError

Entry = tuple[Tensor, ...]  # what one call files for the shared tensors' gradients (rows first)
Grads = tuple[Tensor | None, ...]


class _Group:
    """Tensors that several calls share (a weight and its bias; a cached prefix's keys and
    values) and the calls that used them."""

    def __init__(self, mode: DeferSharedGrads, grads_of: Callable[[Entry], Grads]) -> None:
        self.mode = mode
        self.grads_of = grads_of  # one entry (or several stacked) -> the shared tensors' grads
        self.calls = 0
        self.entries: list[Entry] = []

    def file(self, entry: Entry) -> Grads | None:
        """Keep one call's entry; with the last call's, the gradients of all calls."""
        self.mode.check_when_done()
        self.entries.append(entry)
        if len(self.entries) < self.calls:
            return None
        entries, self.entries = self.entries, []  # emptied: a retained graph may run again
        # One product over all calls' rows stacked, except that a call with more rows than
        # all others together (a long first pass) gets its own product: stacking would copy it.
        largest = max(entries, key=lambda e: e[0].shape[0])
        rest = [e for e in entries if e is not largest]
        if 2 * largest[0].shape[0] <= sum(e[0].shape[0] for e in entries):
            largest, rest = _stack(entries), []
        grads = self.grads_of(largest)
        if rest:
            grads = tuple(g if h is None else g.add_(h)  # type: ignore[union-attr]
                          for g, h in zip(grads, self.grads_of(_stack(rest)), strict=True))
        return grads


def _stack(entries: list[Entry]) -> Entry:
    """Several calls' entries as one (rows stacked)."""
    if len(entries) == 1:
        return entries[0]
    return tuple(torch.cat(field) for field in zip(*entries, strict=True))


class DeferSharedGrads(TorchFunctionMode):
    """The mode `defer_shared_grads` enters (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[tuple[Any, ...], _Group] = {}
        self.casts: dict[int, Tensor] = {}  # parameters cast for autocast, once per step
        self.check_queued = False

    def group(self, key: tuple[Any, ...], grads_of: Callable[[Entry], Grads]) -> _Group:
        if key not in self.groups:
            self.groups[key] = _Group(self, grads_of)
        group = self.groups[key]
        group.calls += 1
        return group

    @overload
    def cast(self, tensor: Tensor, dtype: torch.dtype | None) -> Tensor: ...
    @overload
    def cast(self, tensor: None, dtype: torch.dtype | None) -> None: ...

    def cast(self, tensor: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
        """`tensor` in autocast's `dtype`; a parameter's cast is made once and reused, as
        autocast's own cache does (None: no autocast)."""
        if tensor is None or dtype is None or tensor.dtype == dtype:
            return tensor
        if isinstance(tensor, nn.Parameter):
            if id(tensor) not in self.casts:
                self.casts[id(tensor)] = tensor.to(dtype)
            return self.casts[id(tensor)]
        return tensor.to(dtype)

    def check_when_done(self) -> None:
        """Once per backward pass: when autograd finishes, every group must have completed.
        Not while a CUDA graph records (autograd's end-of-pass callbacks break the recording):
        `GraphedSteps` runs each step eagerly before recording it, so the check runs there."""
        if self.check_queued or (torch.cuda.is_available()
                                 and torch.cuda.is_current_stream_capturing()):
            return
        self.check_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._check)

    def _check(self) -> None:
        self.check_queued = False
        waiting = [g for g in self.groups.values() if g.entries]
        for group in waiting:
            group.entries = []  # nothing stale for a later backward of a retained graph
        if waiting:
            raise RunError(f"{len(waiting)} groups of tensors shared under defer_shared_grads "
                           "got no gradient: some of their calls do not reach the loss, so the "
                           "calls whose backward ran waited for them",
                           fix="turn the deferral off for this computation "
                           "(method.defer_shared_grads=never)")

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        route = ROUTES.get(func)
        if route is not None and torch.is_grad_enabled():
            out = route(self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@contextmanager
def defer_shared_grads(model: nn.Module) -> Iterator[DeferSharedGrads | None]:
    """Within: the gradients of trainable parameters used by linear maps, layer norms and
    embeddings, and of a piecewise cache's prefix read by one-column passes, are computed once
    for all calls (see the module docstring). Enter it once per forward pass of `model`. A
    model with compiled parts runs as usual (yields None): traced by torch.compile, the
    bookkeeping would run only once."""
    if any(m._compiled_call_impl is not None for m in model.modules()):
        yield None
        return
    with DeferSharedGrads() as mode:
        yield mode


def _trainable(tensor: Any) -> bool:
    return isinstance(tensor, nn.Parameter) and tensor.requires_grad


def _autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    kind = tensor.device.type
    if torch.is_autocast_enabled(kind) and tensor.is_floating_point():
        return torch.get_autocast_dtype(kind)
    return None


# -- linear maps --------------------------------------------------------------------------------
class DeferredLinear(torch.autograd.Function):
    """`x @ W^T + b` (nn.Linear's layout) or `b + x @ W` (`transposed`: GPT-2's Conv1D)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                group: _Group, transposed: bool) -> Tensor:
        dtype = _autocast_dtype(x)
        x, w, b = (group.mode.cast(t, dtype) for t in (x, weight, bias))
        assert x is not None and w is not None
        # Conv1D always has a bias (`transposed` is only routed from addmm).
        out = torch.addmm(b, x, w) if transposed else F.linear(x, w, b)
        ctx.save_for_backward(x, w)
        ctx.group, ctx.transposed = group, transposed
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ w.T if ctx.transposed else dy @ w
        grads = ctx.group.file((x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])))
        return dx, *(grads or (None, None)), None, None


def _linear_grads(transposed: bool, has_bias: bool) -> Callable[[Entry], Grads]:
    def grads_of(entry: Entry) -> Grads:
        x, dy = entry
        dw = x.T @ dy if transposed else dy.T @ x
        return dw, dy.sum(0) if has_bias else None
    return grads_of


def _route_linear(mode: DeferSharedGrads, x: Tensor, weight: Tensor,
                  bias: Tensor | None = None) -> Any:
    if not _trainable(weight) or not (bias is None or _trainable(bias)):
        return NotImplemented
    group = mode.group(("linear", id(weight), id(bias)), _linear_grads(False, bias is not None))
    return DeferredLinear.apply(x, weight, bias, group, False)


def _route_addmm(mode: DeferSharedGrads, bias: Tensor, x: Tensor, weight: Tensor,
                 **kwargs: Any) -> Any:
    if kwargs or x.dim() != 2 or not (_trainable(weight) and _trainable(bias)):
        return NotImplemented  # beta, alpha or out: not a plain affine map
    group = mode.group(("addmm", id(weight), id(bias)), _linear_grads(True, True))
    return DeferredLinear.apply(x, weight, bias, group, True)


# -- layer norms ----------------------------------------------------------------------------
class DeferredLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                group: _Group, shape: list[int], eps: float) -> Tensor:
        if _autocast_dtype(x) is not None:
            x = x.float()  # autocast runs layer norms in float32
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.group, ctx.shape = group, shape
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd, weight, bias = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.native_layer_norm_backward(
                dy, x, ctx.shape, mean, rstd, weight, bias, [True, False, False])[0]
        width = math.prod(ctx.shape)
        grads = ctx.group.file((x.reshape(-1, width), mean.reshape(-1, 1),
                                rstd.reshape(-1, 1), dy.reshape(-1, width)))
        return dx, *(grads or (None, None)), None, None, None


def _route_layer_norm(mode: DeferSharedGrads, x: Tensor, shape: Any,
                      weight: Tensor | None = None, bias: Tensor | None = None,
                      eps: float = 1e-5) -> Any:
    if not _trainable(weight) or not (bias is None or _trainable(bias)):
        return NotImplemented
    assert weight is not None
    shape = list(shape)
    width = math.prod(shape)

    def grads_of(entry: Entry) -> Grads:
        x, mean, rstd, dy = entry
        _, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, x, [width], mean, rstd, weight.reshape(-1),
            None if bias is None else bias.reshape(-1), [False, True, bias is not None])
        return dw.reshape(shape), None if bias is None else db.reshape(shape)

    group = mode.group(("layer_norm", id(weight), id(bias)), grads_of)
    return DeferredLayerNorm.apply(x, weight, bias, group, shape, eps)


# -- embeddings -------------------------------------------------------------------------------
class DeferredEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, group: _Group,  # type: ignore[override]
                padding_idx: int) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.group = group
        return F.embedding(ids, weight, None if padding_idx < 0 else padding_idx)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        grads = ctx.group.file((ids.reshape(-1), dy.reshape(-1, dy.shape[-1])))
        return None, grads[0] if grads else None, None, None


def _route_embedding(mode: DeferSharedGrads, ids: Tensor, weight: Tensor,
                     padding_idx: int | None = None, max_norm: float | None = None,
                     norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                     sparse: bool = False) -> Any:
    if not _trainable(weight) or max_norm is not None or scale_grad_by_freq or sparse:
        return NotImplemented
    rows = weight.shape[0]
    pad = -1 if padding_idx is None else padding_idx % rows

    def grads_of(entry: Entry) -> Grads:
        ids, dy = entry
        return (torch.ops.aten.embedding_dense_backward(dy, ids, rows, pad, False),)

    group = mode.group(("embedding", id(weight)), grads_of)
    return DeferredEmbedding.apply(ids, weight, group, pad)


# -- attention over a cached prefix -----------------------------------------------------------
class DeferredPrefixAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v for query rows that all see the same keys, read from a
    piecewise cache: the keys' and values' first piece (the prefix, read by every later pass)
    gets its gradient deferred, the others theirs at once.

    q is [B, Hkv, R, D]: the R query rows of each key/value head (GQA's query heads of one key
    head are rows too). `keys` and `values` are the cache's buffers up to the read's end, no
    autograd: the gradients go to `pieces` (the key pieces, then the value pieces), as
    `Assemble` hands them out. Scores and softmax are float32, as SDPA's kernels keep them.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, keys: Tensor, values: Tensor,  # type: ignore[override]
                mask: Tensor | None, scale: float, dropout_p: float, group: _Group,
                *pieces: Tensor) -> Tensor:
        scores = _matmul_float(q, keys.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            scores = (scores.masked_fill_(~mask, -math.inf) if mask.dtype == torch.bool
                      else scores.add_(mask))
        probs = scores.softmax(-1)
        kept = None
        if dropout_p > 0:
            _, kept = torch.native_dropout(probs, dropout_p, True)
        ctx.save_for_backward(q, keys, values, probs, kept)
        ctx.scale, ctx.dropout_p, ctx.group = scale, dropout_p, group
        ctx.widths = [p.shape[-2] for p in pieces[: len(pieces) // 2]]
        return _dropped(probs, kept, dropout_p).to(values.dtype) @ values

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, keys, values, probs, kept = ctx.saved_tensors
        dprobs = _dropped(_matmul_float(dout, values.transpose(-1, -2)), kept, ctx.dropout_p)
        dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
        dscores = dscores.mul_(ctx.scale).to(q.dtype)
        dq = dscores @ keys if ctx.needs_input_grad[0] else None
        probs = _dropped(probs, kept, ctx.dropout_p).to(dout.dtype)  # what multiplied values
        prefix = ctx.widths[0]
        # The pieces after the prefix (a few columns): their gradients at once.
        dkeys = dscores[..., prefix:].transpose(-1, -2) @ q
        dvalues = probs[..., prefix:].transpose(-1, -2) @ dout
        rest = ctx.widths[1:]
        # The prefix's: filed rows first ([R, B, Hkv, ...]) for the group to stack.
        grads = ctx.group.file(tuple(t.movedim(-2, 0) for t in
                                     (dscores[..., :prefix], q, probs[..., :prefix], dout)))
        dk_prefix, dv_prefix = grads or (None, None)
        return (dq, None, None, None, None, None, None,
                dk_prefix, *dkeys.split(rest, dim=-2), dv_prefix, *dvalues.split(rest, dim=-2))


def _dropped(probs: Tensor, kept: Tensor | None, p: float) -> Tensor:
    """Dropout with a given mask (None: no dropout)."""
    return probs if kept is None else probs * kept / (1 - p)


def _matmul_float(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in float32, from half-precision inputs without casting them (on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        batch = a.shape[:-2]
        return torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]),
                         out_dtype=torch.float32).reshape(*batch, a.shape[-2], b.shape[-1])
    return a.float() @ b.float()


def _prefix_grads(entry: Entry) -> Grads:
    dscores, q, probs, dout = entry  # [R, B, Hkv, ...] each
    return (torch.einsum("rbhk,rbhd->bhkd", dscores, q),
            torch.einsum("rbhk,rbhd->bhkd", probs, dout))


def _route_attention(mode: DeferSharedGrads, query: Tensor, key: Tensor, value: Tensor,
                     attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> Any:
    reads = key.grad_fn, value.grad_fn  # `Assemble`'s ctx when read from a piecewise cache
    prefix_read = all(type(r) is Assemble._backward_cls and len(r.pieces) > 1 for r in reads)
    same_keys = not is_causal and (attn_mask is None or attn_mask.shape[-2] == 1)
    if not (prefix_read and same_keys) or query.dim() != 4:
        return NotImplemented  # not query rows that all see the same keys of a cached prefix
    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    if heads != kv_heads and not enable_gqa:
        return NotImplemented  # SDPA's own error
    if attn_mask is not None and attn_mask.shape[1] != 1 and heads != kv_heads:
        return NotImplemented  # a mask per query head: not rows of one key head
    dtype = _autocast_dtype(query)
    q = mode.cast(query, dtype).reshape(batch, kv_heads, heads // kv_heads * rows, dim)
    key_pieces, value_pieces = (r.pieces for r in reads)  # type: ignore[union-attr]
    group = mode.group(("prefix", id(key_pieces[0]), id(value_pieces[0])), _prefix_grads)
    out = DeferredPrefixAttention.apply(
        q, mode.cast(key.detach(), dtype), mode.cast(value.detach(), dtype), attn_mask,
        1 / math.sqrt(dim) if scale is None else scale, dropout_p, group,
        *key_pieces, *value_pieces)
    return out.reshape(batch, heads, rows, value.shape[-1])


ROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.scaled_dot_product_attention: _route_attention,
    F.linear: _route_linear,
    torch.addmm: _route_addmm,
    F.layer_norm: _route_layer_norm,
    F.embedding: _route_embedding,
}
