"""The `model` section of a run config: which backbone and tokenizer a run uses (built by
`latentlab.backbones`). Kept apart from the builders so that reading a config never imports
the model code of transformers (seconds of start-up before a config error)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from latentlab.engine.config import Section


class ModelConfig(Section):
    name: str = Field("gpt2-tiny", description="a preset (see `latentlab.backbones.PRESETS`), "
                      "a Hugging Face hub id, or a local model directory")
    tokenizer: str = Field("auto", description="'auto': trained on the task's training text "
                           "for presets, the model's own otherwise; 'train'; 'gpt2-bpe' (GPT-2's "
                           "BPE files from $LATENTLAB_SHARED/data/gpt2_tokenizer); or a hub id/dir")
    tokenizer_vocab_size: int = Field(1024, ge=300, description="size of a trained tokenizer")
    init_from: str | None = Field(None, description="start from the best model of an earlier "
                                  "run directory (e.g. a CoT- or No-CoT-trained Base)")
    preset_overrides: dict[str, Any] = Field(default_factory=dict, description="architecture "
                                             "fields changed on a preset, e.g. {n_layer: 4}")
    token_shift: int = Field(0, ge=0, description="a learned causal mix of each position with "
                             "the token_shift - 1 before it, added at every decoder layer's "
                             "input and zero at initialisation (latentlab.token_shift; 0: off, "
                             "the backbone as published). From scratch, it lets in-context "
                             "lookups form (README, Backbones)")
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each Hugging Face model's transformer body (dynamic "
        "shapes) and its LM head's cross-entropy (no float32 logits stored): 'auto' on a CUDA "
        "device (a step on the task shapes about 4x the eager one, a GPT-2 small text step "
        "1.5x, on an H200; about a minute of compiling first), true on any device, false "
        "never (docs/results.md, 'Training throughput')")
    compile_scope: Literal["body", "layers"] = Field(
        "body", description="what model.compile compiles: 'body', each transformer body as one "
        "graph; 'layers', each decoder layer on its own (regional compilation): the layers "
        "share one compiled code, so compiling takes a fraction of the body's time (a "
        "12 x 384 Qwen-3 training step: 22 s against 96 s on a CPU, the same step time after), "
        "while passes over a key/value cache compile once per layer")
