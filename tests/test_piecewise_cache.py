"""The piecewise cache: a sequence fed in pieces equals one full pass, forward and backward."""

from __future__ import annotations

import pytest
import torch

from latentlab.backbones import build_backbone, train_tokenizer
from latentlab.config import ModelConfig
from latentlab.engine.piecewise_cache import PiecewiseLayer, piecewise_cache


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
def test_pieces_equal_one_full_pass_with_gradients(preset: str) -> None:
    tokenizer = train_tokenizer(["a b c d e f g h"] * 20, 300)
    model = build_backbone(ModelConfig(name=preset), tokenizer, seed=0).eval()
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
        out = model.base_model(inputs_embeds=embeds[:, start:end], past_key_values=cache,
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
