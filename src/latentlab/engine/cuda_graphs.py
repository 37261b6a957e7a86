"""Training steps replayed from CUDA graphs (`train.cuda_graphs`).

Some steps are bound by the host, not the GPU. Coconut's runs n+1 sequential passes, n of them
one column wide, so the host's Python and kernel launches (about a hundred small kernels per
layer and pass, forward and backward) take longer than the GPU's work (docs/results.md). A CUDA
graph records a step's kernels once and replays them with one launch.

`GraphedSteps` records the forward and backward of the model for a batch layout (the shapes
and dtypes of the batch's tensors and the values of its other entries) the second time it sees
the layout, and replays that recording for every later batch of the layout, after copying the
batch into the recording's input tensors. A layout seen once is run eagerly by the caller:
recording costs about three steps, so layouts that never repeat are not worth it (padding
widths to a multiple, e.g. Coconut's `pad_to_multiple`, makes them repeat). What a step must
do to be recorded (see torch.cuda.graphs):
- no host sync: nothing reads a GPU value on the CPU (`.item()`, boolean indexing, a mask
  inspected by transformers). `lm_loss` with the collate's `label_index` and the methods'
  right-padded passes are sync-free; a step that syncs fails to record with a clear error;
- the same kernels for every batch of a layout: all control flow depends on the layout only.

Gradients: a recording ends by adding the step's gradients, times the micro-batch's weight,
into one buffer per parameter, outside the graphs' memory. A replay's parameters get those
buffers as `.grad`, so micro-batches accumulate and the optimizer, clipping and `zero_grad`
work as after `backward()`; parameters the step does not reach keep their `.grad` (None after
`zero_grad`), as after `backward()`.

All recordings share one memory pool: they never run at the same time, and a replay's outputs
(loss, metrics) are copied out at once. Recording leaves the CUDA random state as it found it
and each replay advances it, so a resumed run (which records again) draws the same dropout
masks as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from latentlab.engine.interface import StepOutput
from latentlab.errors import RunError

# Batch entries that only the engine reads (token counts for the logs): not part of a layout.
HOST_ONLY = frozenset({"num_tokens"})


Path = tuple[str, ...]  # an entry's keys from the batch's top, through nested batches


def leaves(batch: Mapping[str, Any], path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every entry of a batch with its path, walking nested batches (one per role, as CODI's
    teacher and student); host-only entries left out."""
    for key, value in batch.items():
        if isinstance(value, Mapping):
            yield from leaves(value, (*path, key))
        elif key not in HOST_ONLY:
            yield (*path, key), value


def layout(batch: dict[str, Any]) -> tuple[Any, ...]:
    """What a recording depends on: tensor shapes and dtypes, every other entry's value."""
    return tuple(sorted((path, (tuple(value.shape), value.dtype) if isinstance(value, Tensor)
                         else repr(value)) for path, value in leaves(batch)))


def cloned(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch with every tensor, nested ones included, replaced by a copy."""
    return {key: cloned(value) if isinstance(value, Mapping)
            else value.clone() if isinstance(value, Tensor) else value
            for key, value in batch.items()}


@dataclass
class Recording:
    graph: torch.cuda.CUDAGraph
    inputs: dict[Path, Tensor]  # the tensors a replay reads its batch from
    loss: Tensor
    metrics: dict[str, Tensor]
    used: list[int]  # parameters the step reaches: the others keep their `.grad` (or None)


class GraphedSteps:
    """`model(batch)` and the backward of its loss, recorded per layout and replayed."""

    def __init__(self, model: nn.Module, warmup: int = 2) -> None:
        self.model = model
        self.warmup = warmup  # eager runs before recording (cuBLAS/cuDNN setup, autotuning)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.weight = torch.ones((), device=self.device)  # the micro-batch's share of the loss
        self.pool = torch.cuda.graph_pool_handle()
        self.recordings: dict[tuple[Any, ...], Recording] = {}
        self.seen: set[tuple[Any, ...]] = set()  # layouts met once, not recorded

    def step(self, batch: dict[str, Any], weight: float) -> StepOutput | None:
        """Forward and backward of `weight * loss`, gradients added to the parameters'; None
        for a layout met for the first time, which the caller runs eagerly."""
        key = layout(batch)
        recording = self.recordings.get(key)
        if recording is None:
            if key not in self.seen:
                self.seen.add(key)
                return None
            recording = self.recordings[key] = self._record(batch)
        given = dict(leaves(batch))
        for path, static in recording.inputs.items():
            static.copy_(given[path], non_blocking=True)
        self.weight.fill_(weight)
        self._take_grads(recording.used)
        recording.graph.replay()
        for i in recording.used:
            self.params[i].grad = self.grads[i]
        return StepOutput(recording.loss.clone(),
                          {name: value.clone() for name, value in recording.metrics.items()})

    def forget(self) -> None:
        """Drop every recording: the step may now differ for a layout (a new curriculum
        stage changes the method's state, which layouts do not see)."""
        self.recordings.clear()
        self.seen.clear()
        # Later recordings share a new pool: the old one goes with its graphs (recording into
        # it again failed on the H100).
        self.pool = torch.cuda.graph_pool_handle()

    def _take_grads(self, used: list[int]) -> None:
        """Start the buffers of `used` parameters from their current gradients (none:
        zeros)."""
        fresh = [self.grads[i] for i in used if self.params[i].grad is None]
        if fresh:
            torch._foreach_zero_(fresh)
        for i in used:
            current = self.params[i].grad
            if current is not None and current is not self.grads[i]:
                self.grads[i].copy_(current)

    def _record(self, batch: dict[str, Any]) -> Recording:
        static = cloned(batch)
        inputs = {path: v for path, v in leaves(static) if isinstance(v, Tensor)}
        rng = torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        recorded = False
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # gradients computed and dropped
                    torch.autograd.grad(self.model(static).loss, self.params, allow_unused=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(static)
                grads = torch.autograd.grad(out.loss * self.weight, self.params,
                                            allow_unused=True)
                used = [i for i, g in enumerate(grads) if g is not None]
                torch._foreach_add_([self.grads[i] for i in used], [grads[i] for i in used])
            recorded = True
        except RuntimeError as exc:
            if "captur" not in str(exc):
                raise
            raise RunError(f"train.cuda_graphs: this method's training step cannot be recorded "
                           f"in a CUDA graph ({str(exc).splitlines()[0]}); it reads GPU values "
                           f"on the host or changes with the data",
                           fix="set train.cuda_graphs=false") from exc
        finally:
            if not recorded:
                _end_random_state_capture(self.device)
            torch.cuda.set_rng_state(rng, self.device)
        return Recording(graph, inputs, out.loss.detach(),
                         {k: v.detach() for k, v in out.metrics.items()}, used)


def _end_random_state_capture(device: torch.device) -> None:
    """After a recording that failed: PyTorch takes the CUDA generator out of its capture state
    only when a recording ends cleanly, and until then every random draw on the device fails
    ("Offset increment outside graph capture"). Recording nothing ends it."""
    with warnings.catch_warnings(), torch.cuda.device(device):
        warnings.simplefilter("ignore")  # "the CUDA graph is empty"
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
