"""The piecewise cache: a sequence fed in pieces equals one full pass, forward and backward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from presets import PRESETS, backbone_for

from latentlab.backbones import train_tokenizer
from latentlab.engine.generation import with_cache
from latentlab.engine.piecewise_cache import PiecewiseLayer, piecewise_cache


@pytest.mark.parametrize("preset", PRESETS)
def test_pieces_equal_one_full_pass_with_gradients(preset: str) -> None:
    tokenizer = train_tokenizer(["a b c d e f g h"] * 20, 300)
    model = backbone_for(preset, tokenizer, seed=0).eval()
    embeds = torch.randn(2, 11, model.config.hidden_size, requires_grad=True)
    weights = torch.randn(2, 11, model.config.hidden_size)  # a loss that reads every state

    full = model.base_model(inputs_embeds=embeds).last_hidden_state
    (full * weights).sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    full_input_grad = embeds.grad.clone()
    model.zero_grad(set_to_none=True)
    embeds.grad = None

    cache = piecewise_cache(model, 11)
    assert all(isinstance(layer, PiecewiseLayer) for layer in cache.layers)
    outputs = []
    for start, end in ((0, 6), (6, 7), (7, 8), (8, 11)):  # a prefix, two columns, the rest
        out = model.base_model(inputs_embeds=embeds[:, start:end],
                               **with_cache(model.base_model, cache),
                               position_ids=torch.arange(start, end).expand(2, -1),
                               use_cache=True)
        outputs.append(out.last_hidden_state)
    pieces = torch.cat(outputs, dim=1)
    (pieces * weights).sum().backward()
    torch.testing.assert_close(pieces, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeds.grad, full_input_grad, rtol=1e-4, atol=1e-5)
    for name, param in model.named_parameters():
        if name in full_grads:
            torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=name)


def test_feeding_past_the_width_is_an_error() -> None:
    layer = PiecewiseLayer(3)
    layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="4 columns into a cache of 3"):
        layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))


def test_each_piece_gets_the_gradient_of_every_pass_that_read_it() -> None:
    """By hand: pass i reads pieces 0..i, so with a loss summing every read, piece p's
    gradient is the number of passes from p on (3, 2, 1), for keys and values alike."""
    layer = PiecewiseLayer(4)
    keys = [torch.randn(1, 1, w, 2, requires_grad=True) for w in (2, 1, 1)]
    values = [torch.randn(1, 1, w, 2, requires_grad=True) for w in (2, 1, 1)]
    reads = [layer.update(k, v) for k, v in zip(keys, values, strict=True)]
    sum(k.sum() + 2 * v.sum() for k, v in reads).backward()
    for readers, key, value in zip((3, 2, 1), keys, values, strict=True):
        assert torch.equal(key.grad, torch.full_like(key, readers))
        assert torch.equal(value.grad, torch.full_like(value, 2 * readers))


def test_the_graph_is_freed_with_the_step() -> None:
    """Nothing of the cache keeps the autograd graph alive past the step by a reference cycle
    (a graph kept alive keeps its AccumulateGrad nodes, and a CUDA graph recorded next would
    then wait on the eager step's stream)."""

    class Probe:  # held by the first pass's read node only: alive as long as the graph is
        def __call__(self, grads: tuple[torch.Tensor, ...]) -> None:
            return None

    layer = PiecewiseLayer(3)
    weight = torch.randn(2, requires_grad=True)
    piece, read = torch.randn(1, 1, 1, 2) * weight, torch.zeros(())
    for i in range(3):  # as in Coconut, each piece is made from the previous pass's read
        keys = layer.update(piece, piece)[0]
        if i == 0:
            probe = Probe()
            keys.grad_fn.register_prehook(probe)
            alive = weakref.ref(probe)
            del probe
        piece, read = keys[..., -1:, :] * weight, read + keys.sum()
    read.backward()
    gc.disable()
    try:
        del layer, read, piece, keys
        assert alive() is None
    finally:
        gc.enable()
