"""Latent dependence: does a model use its latents? Its accuracy when what it puts between
question and answer (`Method.latent_inputs`) is replaced by zeros, by the mean over the
evaluated examples, or by another question's (a permutation of the examples with no fixed
point). A method whose accuracy does not drop is not using its latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator
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
                      max_new_tokens: int, seed: int = 0,
                      acc: Accelerator | None = None) -> dict[str, float]:
    """Accuracy on `examples` with the latent inputs ablated each way (`ABLATIONS`). Every
    process computes every example's latents (the mean and the derangement are over all of
    them; one pass each, cheap), then generates for its share of the examples only."""
    rank, world = (acc.process_index, acc.num_processes) if acc else (0, 1)
    was_training = method.training
    method.eval()
    batches = [list(examples[s:s + batch_size]) for s in range(0, len(examples), batch_size)]
    inputs = torch.cat([method.latent_inputs(batch) for batch in batches])
    generator = torch.Generator().manual_seed(seed)
    mine = list(range(rank, len(examples), world))
    correct = torch.zeros(len(ABLATIONS), device=inputs.device)
    for k, kind in enumerate(ABLATIONS):
        replaced = ablated(inputs, kind, generator)
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            batch = [examples[i] for i in idx]
            completions = method.generate(batch, max_new_tokens, latent_inputs=replaced[idx])
            correct[k] += sum(task.score(extract_answer(c), e)
                              for c, e in zip(completions, batch, strict=True))
    if acc is not None and world > 1:
        correct = acc.reduce(correct, reduction="sum")
    method.train(was_training)
    return {kind: float(correct[k]) / len(examples) for k, kind in enumerate(ABLATIONS)}
