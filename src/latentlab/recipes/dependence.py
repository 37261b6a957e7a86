"""Latent dependence: does a model use its latents? Its accuracy when what it puts between
question and answer (`Method.latent_inputs`) is replaced by zeros, by the mean over the
evaluated examples, or by another question's (a permutation of the examples with no fixed
point). A method whose accuracy does not drop is not using its latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from latentlab.methods import Method
from latentlab.methods.base import extract_answer
from latentlab.tasks import Example, Task

ABLATIONS = ("zeros", "mean", "shuffled")


def derangement(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation of range(n) that moves every index (n >= 2): a random cyclic
    shift of a random order, so example i always gets another example's latents."""
    order = torch.randperm(n, generator=generator)
    shift = int(torch.randint(1, n, (1,), generator=generator))
    result = torch.empty(n, dtype=torch.long)
    result[order] = order.roll(shift)
    return result


def ablated(inputs: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """`inputs` [n, ...] with every example's replaced: by zeros, by the mean over the n
    examples, or by another example's (`derangement`)."""
    if kind == "zeros":
        return torch.zeros_like(inputs)
    if kind == "mean":
        return inputs.mean(0, keepdim=True).expand_as(inputs)
    if kind == "shuffled":
        return inputs[derangement(inputs.shape[0], generator).to(inputs.device)]
    raise ValueError(f"unknown ablation {kind!r}; use one of {ABLATIONS}")


@torch.no_grad()
def latent_dependence(method: Method, task: Task, examples: Sequence[Example], batch_size: int,
                      max_new_tokens: int, seed: int = 0) -> dict[str, float]:
    """Accuracy on `examples` with the latent inputs ablated each way (`ABLATIONS`)."""
    was_training = method.training
    method.eval()
    batches = [list(examples[s:s + batch_size]) for s in range(0, len(examples), batch_size)]
    inputs = torch.cat([method.latent_inputs(batch) for batch in batches])
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for kind in ABLATIONS:
        replaced = ablated(inputs, kind, generator)
        correct, start = 0, 0
        for batch in batches:
            completions = method.generate(batch, max_new_tokens,
                                          latent_inputs=replaced[start:start + len(batch)])
            correct += sum(task.score(extract_answer(c), e)
                           for c, e in zip(completions, batch, strict=True))
            start += len(batch)
        out[kind] = correct / len(examples)
    method.train(was_training)
    return out
