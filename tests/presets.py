"""Backbones the method tests run on: the two architectures of the presets, each also with a
token shift (`model.token_shift`), whose every pass must equal the same recomputations.

Both shifted: Qwen-3 has no biases, so a left pad (a zero embedding) stays zero through every
layer and hides a shift that reads across padding; GPT-2's biases and position embeddings do
not. GPT-2's blocks take the cache as a positional argument, Qwen-3's as a keyword."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latentlab.backbones import build_backbone
from latentlab.model_config import ModelConfig

SHIFT = "+token_shift"
PRESETS = ["gpt2-tiny", "qwen3-tiny", "gpt2-tiny" + SHIFT, "qwen3-tiny" + SHIFT]


def backbone_for(preset: str, tokenizer: PreTrainedTokenizerBase,
                 seed: int = 0) -> PreTrainedModel:
    """`preset` with random weights; a shift's weights random too (at their zero
    initialisation the shift would change nothing a test could see)."""
    if not preset.endswith(SHIFT):
        return build_backbone(ModelConfig(name=preset), tokenizer, seed=seed)
    model = build_backbone(ModelConfig(name=preset.removesuffix(SHIFT), token_shift=4),
                           tokenizer, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".token_shift." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model
