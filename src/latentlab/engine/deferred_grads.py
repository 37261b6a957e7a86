"""Parameter gradients of a step that runs a model several times, computed once per step.

Coconut's training step runs the backbone n+1 times: the prefix, then one column per thought,
then the rest. Autograd computes each parameter's gradient once per run and adds them up: per
run and layer a matrix product per weight, a reduction per bias, a layer norm's affine
gradients, and an addition per parameter. For a one-column run these are tiny kernels of a few
microseconds each, over a hundred per layer, and replayed from a CUDA graph they are a large
part of what the thought passes cost (docs/results.md).

Inside `defer_param_grads()`, the linear maps (`F.linear`, and `torch.addmm` as GPT-2's Conv1D
calls it), layer norms and embeddings that use trainable parameters run as `Deferred*`
functions. Their backward computes the input's gradient at once but only files each call's
inputs and output gradient with its parameters' `_Group`. The call whose backward runs last
computes the parameters' gradients for all calls together: for a weight, sum_j x_j^T dy_j as
one product over the largest call's rows plus one over the other calls' rows stacked. Autograd
sums what each call returns, so the other calls return no gradient.

Which call runs last does not matter: a group counts its calls in the forward pass. A call
whose output does not reach the loss never runs its backward, so its group would never
complete; that is checked when autograd finishes and raised as an error, never a gradient
silently lost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from latentlab.errors import RunError

Entry = tuple[Tensor, ...]  # what one call files for its parameters' gradients (rows first)
Grads = tuple[Tensor | None, ...]


class _Group:
    """The parameters of one operator (a weight and its bias) and the calls that used them."""

    def __init__(self, mode: DeferParamGrads, grads_of: Callable[[Entry], Grads]) -> None:
        self.mode = mode
        self.grads_of = grads_of  # one entry (or several stacked) -> the parameters' gradients
        self.calls = 0
        self.entries: list[Entry] = []

    def file(self, entry: Entry) -> Grads | None:
        """Keep one call's entry; with the last call's, the gradients of all calls."""
        self.mode.check_when_done()
        self.entries.append(entry)
        if len(self.entries) < self.calls:
            return None
        entries, self.entries = self.entries, []  # emptied: a retained graph may run again
        largest = max(entries, key=lambda e: e[0].shape[0])
        rest = [e for e in entries if e is not largest]
        grads = self.grads_of(largest)
        if rest:
            stacked = (rest[0] if len(rest) == 1
                       else tuple(torch.cat(field) for field in zip(*rest, strict=True)))
            grads = tuple(g if h is None else g.add_(h)  # type: ignore[union-attr]
                          for g, h in zip(grads, self.grads_of(stacked), strict=True))
        return grads


class DeferParamGrads(TorchFunctionMode):
    """The mode `defer_param_grads` enters (see the module docstring)."""

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
            raise RunError(f"{len(waiting)} parameter groups used under defer_param_grads got "
                           "no gradient: some of their calls do not reach the loss, so the "
                           "calls whose backward ran waited for them",
                           fix="turn the deferral off for this computation "
                           "(method.defer_param_grads=never)")

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
def defer_param_grads(model: nn.Module) -> Iterator[DeferParamGrads | None]:
    """Within: the gradients of trainable parameters used by linear maps, layer norms and
    embeddings are computed once for all calls (see the module docstring). Enter it once per
    forward pass of `model`. A model with compiled parts runs as usual (yields None): traced
    by torch.compile, the bookkeeping would run only once."""
    if any(m._compiled_call_impl is not None for m in model.modules()):
        yield None
        return
    with DeferParamGrads() as mode:
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


def _route_linear(mode: DeferParamGrads, x: Tensor, weight: Tensor,
                  bias: Tensor | None = None) -> Any:
    if not _trainable(weight) or not (bias is None or _trainable(bias)):
        return NotImplemented
    group = mode.group(("linear", id(weight), id(bias)), _linear_grads(False, bias is not None))
    return DeferredLinear.apply(x, weight, bias, group, False)


def _route_addmm(mode: DeferParamGrads, bias: Tensor, x: Tensor, weight: Tensor,
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


def _route_layer_norm(mode: DeferParamGrads, x: Tensor, shape: Any,
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


def _route_embedding(mode: DeferParamGrads, ids: Tensor, weight: Tensor,
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


ROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.linear: _route_linear,
    torch.addmm: _route_addmm,
    F.layer_norm: _route_layer_norm,
    F.embedding: _route_embedding,
}
