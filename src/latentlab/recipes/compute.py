"""Forward FLOPs per example, in training and at inference: the compute column that lets
methods be compared at matched compute as well as at matched `N_L`.

Counted by PyTorch's `FlopCounterMode` (matrix products and attention; elementwise work is not
counted, as usual for FLOPs figures), one example at a time so that no padding is counted:
- `train_forward`: the forward of the training step (`Method.forward` on the example as
  `encode` makes it: every pass, every role, the loss's LM-head rows);
- `inference`: `Method.generate` of its answer, latents and thoughts included, up to
  `eval.max_new_tokens` (greedy decoding stops at the end-of-sequence token, so a model that
  answers shorter costs less).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from latentlab.engine.interface import batch_to
from latentlab.methods import Method
from latentlab.tasks import Example


def _cpu_sdpa_flop(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
                   *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts SDPA's GPU kernels but not its CPU one: without this, CPU counts would leave
# attention out. Like PyTorch's own formula, the full query x key product (causal masking is
# not subtracted). Given to each counter, not registered in PyTorch's global table.
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def counted_flops(run: Callable[[], Any]) -> int:
    """The FLOPs of what `run` computes (compiled parts run eagerly while counting)."""
    with torch.compiler.set_stance("force_eager"), \
            FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        run()
    return int(counter.get_total_flops())


@torch.no_grad()
def flops_per_example(method: Method, train: Sequence[Example], held_out: Sequence[Example],
                      max_new_tokens: int) -> dict[str, float | int]:
    """Mean forward FLOPs of a training step's forward over `train` (examples the method can
    encode: Latent-SFT's latent phase only knows its training split's soft labels) and of
    generating over `held_out`, each one example at a time."""
    was_training = method.training
    method.eval()  # the same products; no dropout draws that would move the RNG
    train_flops = [counted_flops(lambda e=e: method(batch_to(
        method.collate([method.encode(e)]), method.device))) for e in train]
    inference_flops = [counted_flops(lambda e=e: method.generate([e], max_new_tokens))
                       for e in held_out]
    method.train(was_training)
    return {"train_forward": sum(train_flops) / len(train_flops),
            "inference": sum(inference_flops) / len(inference_flops),
            "examples": len(train_flops)}
