"""Deferred shared gradients (parameters, a cached prefix's keys and values): the same
gradients as autograd's per-call ones, for every operator they cover, in any backward order; a
call that misses the loss is an error."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from presets import PRESETS, backbone_for
from torch import Tensor, nn

from latentlab.backbones import train_tokenizer
from latentlab.engine.deferred_grads import defer_shared_grads
from latentlab.engine.generation import with_cache
from latentlab.engine.piecewise_cache import PiecewiseLayer, piecewise_cache
from latentlab.errors import RunError


def param_grads(model: nn.Module, loss_of: Callable[[], Tensor]) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
def test_pieces_through_a_cache_get_the_gradients_of_per_call_autograd(preset: str) -> None:
    """GPT-2 covers addmm (Conv1D), layer norms and the position embedding; Qwen-3 F.linear.
    The passes are not chained, so backward runs them in no fixed order."""
    tokenizer = train_tokenizer(["a b c d e f g h"] * 20, 300)
    model = backbone_for(preset, tokenizer, seed=0).eval()
    embeds = torch.randn(2, 11, model.config.hidden_size)
    weights = torch.randn(2, 11, model.config.hidden_size)
    calls: list[tuple[str, int]] = []

    def loss(defer: bool) -> Tensor:
        cache = piecewise_cache(model, 11)
        outputs = []
        with defer_shared_grads(model) if defer else contextlib.nullcontext() as mode:
            for start, end in ((0, 6), (6, 7), (7, 8), (8, 11)):
                outputs.append(model.base_model(
                    inputs_embeds=embeds[:, start:end], **with_cache(model.base_model, cache),
                    position_ids=torch.arange(start, end).expand(2, -1),
                    use_cache=True).last_hidden_state)
        if mode is not None:
            calls.extend((key[0], group.calls) for key, group in mode.groups.items())
        return (torch.cat(outputs, dim=1) * weights).sum()

    plain = param_grads(model, lambda: loss(False))
    deferred = param_grads(model, lambda: loss(True))
    # Every parameter is used by the four passes; each layer's cached prefix (the first
    # piece) is read by the two one-column passes.
    layers = model.config.num_hidden_layers
    assert calls.count(("prefix", 2)) == layers
    assert {c for c in calls if c[0] != "prefix"} <= {(kind, 4) for kind, _ in calls}
    assert len(calls) > 3 * layers
    assert deferred.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(deferred[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class Tiny(nn.Module):
    """Every routed operator, each used by three calls of different row counts."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.linear = nn.Linear(8, 8)
        self.conv_weight = nn.Parameter(torch.randn(8, 8))  # GPT-2's Conv1D: b + x @ W
        self.conv_bias = nn.Parameter(torch.randn(8))

    def forward(self, ids: Tensor) -> Tensor:
        x = self.linear(self.norm(self.embed(ids)))
        return torch.addmm(self.conv_bias, x.reshape(-1, 8), self.conv_weight).sum(0)


@pytest.mark.parametrize("autocast", [False, True])
def test_every_operator_matches_autograd(autocast: bool) -> None:
    torch.manual_seed(0)
    model = Tiny()
    ids = [torch.tensor([[1, 0, 3]]), torch.tensor([[4]]), torch.tensor([[5, 6], [0, 9]])]
    target = torch.randn(8)

    def loss(defer: bool) -> Tensor:
        with (torch.autocast("cpu", torch.bfloat16, enabled=autocast),
              defer_shared_grads(model) if defer else contextlib.nullcontext()):
            out = sum(model(i) for i in ids)
        return (out.float() * target).sum()

    plain = param_grads(model, lambda: loss(False))
    deferred = param_grads(model, lambda: loss(True))
    assert deferred.keys() == plain.keys() == dict(model.named_parameters()).keys()
    assert not deferred["embed.weight"][0].any()  # the padding row gets no gradient
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for name, grad in plain.items():
        torch.testing.assert_close(deferred[name], grad, **tolerance, msg=name)


def test_retained_graph_runs_backward_again() -> None:
    model = Tiny()
    with defer_shared_grads(model):
        loss = sum(model(torch.tensor([[i, i + 1]])) for i in range(3)).sum()
    loss.backward(retain_graph=True)
    once = model.linear.weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(model.linear.weight.grad, 2 * once)


def test_a_call_that_misses_the_loss_is_an_error() -> None:
    model = Tiny()
    with defer_shared_grads(model):
        used = model(torch.tensor([[1, 2]]))
        model(torch.tensor([[3]]))  # never reaches the loss: its backward never runs
    with pytest.raises(RunError, match="do not reach the loss"):
        used.sum().backward()


def test_no_grad_and_frozen_parameters_run_as_usual() -> None:
    model = Tiny()
    model.linear.requires_grad_(False)
    with defer_shared_grads(model) as mode:
        model(torch.tensor([[1, 2]]))
        with torch.no_grad():
            model(torch.tensor([[1, 2]]))
    assert mode is not None
    assert {key[0] for key in mode.groups} == {"embedding", "layer_norm", "addmm"}
    assert all(group.calls == 1 for group in mode.groups.values())


def test_the_graph_is_freed_with_the_step() -> None:
    """The deferral's bookkeeping holds no tensor of the graph, so no reference cycle keeps
    the step's graph alive (it would keep AccumulateGrad nodes bound to the eager stream alive
    into the next CUDA-graph recording)."""

    class Probe:  # held by a deferred node only: alive as long as the graph is
        def __call__(self, grads: tuple[Tensor, ...]) -> None:
            return None

    model = Tiny()
    with defer_shared_grads(model):
        out = model.linear(torch.randn(2, 8))
        probe = Probe()
        out.grad_fn.register_prehook(probe)
        alive = weakref.ref(probe)
        del probe
        loss = (model.linear(out) * model.linear(torch.randn(3, 8)).sum()).sum()
    loss.backward()
    gc.disable()
    try:
        del out, loss
        assert alive() is None
    finally:
        gc.enable()


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                        dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout drawn as `DeferredPrefixAttention` draws
    it (one native_dropout over the probabilities of each key head's query rows), by autograd."""
    batch, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads * rows, dim)
    scores = q @ k.transpose(-1, -2) / dim**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    probs = scores.softmax(-1)
    if dropout:
        probs = torch.native_dropout(probs, dropout, True)[0]
    return (probs @ v).reshape(batch, heads, rows, -1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads", "gqa"), [(4, 4, False), (4, 2, True),
                                                        (2, 2, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_a_cached_prefix_matches_autograd(dropout: float, masked: bool,
                                                         heads: int, kv_heads: int, gqa: bool,
                                                         dtype: torch.dtype) -> None:
    """One-column passes over a cached prefix: each pass's attention returns its query's
    gradient at once, and the prefix's key/value gradient is computed once for all passes.
    (4, 2, GQA): SDPA's enable_gqa; (2, 2): two query rows per key head, the way transformers
    packs GQA's query heads for one query column. bf16 inputs against a float32 reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    batch, dim, prefix, passes = 3, 8, 5, 3
    width = prefix + passes

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    prefix_kv = leaf(batch, kv_heads, prefix, dim), leaf(batch, kv_heads, prefix, dim)
    new_kv = [(leaf(batch, kv_heads, 1, dim), leaf(batch, kv_heads, 1, dim))
              for _ in range(passes)]
    rows = 2 if heads == kv_heads == 2 else 1
    queries = [leaf(batch, heads, rows, dim) for _ in range(passes)]
    mask = torch.ones(batch, 1, 1, width, dtype=torch.bool, device=device)
    mask[0, ..., :2] = False  # a left-padded row
    weights = torch.randn(passes, batch, heads, rows, dim, device=device)

    def loss(defer: bool) -> Tensor:
        torch.manual_seed(1)  # the same dropout masks for both
        layer = PiecewiseLayer(width)
        layer.update(*prefix_kv)
        total = torch.zeros((), device=device)
        with defer_shared_grads(nn.Identity()) if defer else contextlib.nullcontext():
            for j, (q, (k, v)) in enumerate(zip(queries, new_kv, strict=True)):
                keys, values = layer.update(k, v)
                m = mask[..., : prefix + j + 1] if masked else None
                out = (F.scaled_dot_product_attention(q, keys, values, attn_mask=m,
                                                      dropout_p=dropout, enable_gqa=gqa)
                       if defer else attention_reference(q.float(), keys.float(),
                                                         values.float(), m, dropout))
                total = total + (out.float() * weights[j]).sum()
        return total

    leaves = [*prefix_kv, *(t for kv in new_kv for t in kv), *queries]
    deferred = torch.autograd.grad(loss(True), leaves)
    reference = torch.autograd.grad(loss(False), leaves)
    tolerance = ({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32
                 else {"rtol": 2e-2, "atol": 2e-2})
    for got, want in zip(deferred, reference, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    if not dropout and dtype == torch.float32:  # and SDPA itself, a different computation
        sdpa = torch.autograd.grad(
            sum((F.scaled_dot_product_attention(
                q, torch.cat([prefix_kv[0], *(k for k, _ in new_kv[: j + 1])], -2),
                torch.cat([prefix_kv[1], *(v for _, v in new_kv[: j + 1])], -2),
                attn_mask=mask[..., : prefix + j + 1] if masked else None,
                enable_gqa=gqa) * weights[j]).sum() for j, q in enumerate(queries)), leaves)
        for got, want in zip(deferred, sdpa, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
