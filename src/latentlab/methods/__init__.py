"""Method registry: each method is one module; adding one means adding it here."""

from __future__ import annotations

from latentlab.methods.base import Method, MethodConfig, Stage, StepOutput, UpstreamRun
from latentlab.methods.coconut import Coconut
from latentlab.methods.codi import CODI
from latentlab.methods.coprocessor import H1, H2, Liu
from latentlab.methods.cot import CoT, NoCoT
from latentlab.methods.latent_sft import LatentSFT
from latentlab.methods.pause import Pause, SoftEmbedding

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    CoT, NoCoT, Pause, SoftEmbedding, Liu, H1, H2, Coconut, LatentSFT, CODI)}
METHOD_CONFIGS: tuple[type[MethodConfig], ...] = tuple(m.config_class for m in METHODS.values())

__all__ = ["METHODS", "METHOD_CONFIGS", "Method", "MethodConfig", "Stage", "StepOutput",
           "UpstreamRun"]
