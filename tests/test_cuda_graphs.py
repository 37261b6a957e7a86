"""train.cuda_graphs: replayed steps against eager ones (loss, gradients, accumulation,
dropout's random state, a whole training run), and the errors that refuse it.

The tests marked `needs_cuda` skip without a CUDA device, as in CI; they ran on the lent H100
(docs/results.md, "CUDA graphs"). The one whose step cannot be recorded comes last: a failed
capture can leave the CUDA context unusable for the rest of the process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from test_coconut import EXAMPLES, make
from test_training import tiny

from latentlab.engine.cuda_graphs import GraphedSteps, cloned, layout, leaves
from latentlab.engine.interface import batch_to
from latentlab.errors import ConfigError, RunError
from latentlab.methods.coconut import Coconut
from latentlab.recipes import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NO_DROPOUT = "model.preset_overrides={resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0}"


def test_layout_sees_shapes_and_values_but_not_token_counts() -> None:
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "bot": 3, "num_tokens": 7}
    assert layout(batch) == layout({**batch, "input_ids": torch.ones(2, 5, dtype=torch.long),
                                    "num_tokens": 9})
    assert layout(batch) != layout({**batch, "bot": 4})
    assert layout(batch) != layout({**batch, "input_ids": torch.zeros(2, 6, dtype=torch.long)})
    assert layout(batch) != layout({**batch, "input_ids": torch.zeros(2, 5, dtype=torch.int)})



def test_nested_batches_have_a_layout_and_copies_of_every_tensor() -> None:
    """A batch with one batch per role (CODI's teacher and student): the layout walks into
    them, and a recording's inputs are copies of every nested tensor, found by their paths."""
    role = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "parts_present": ("answer",)}
    batch = {"teacher": role, "student": {**role, "input_ids": torch.zeros(2, 7)}, "bot": 3,
             "num_tokens": 24}
    wider = {**batch, "student": {**role, "input_ids": torch.zeros(2, 8)}}
    assert layout(batch) != layout(wider)
    assert layout(batch) != layout({**batch, "teacher": {**role, "parts_present": ("steps",)}})
    assert layout(batch) == layout({**batch, "num_tokens": 30})
    static = cloned(batch)
    tensors = {path: v for path, v in leaves(static) if isinstance(v, torch.Tensor)}
    assert set(tensors) == {("teacher", "input_ids"), ("student", "input_ids")}
    assert static["teacher"]["input_ids"] is not role["input_ids"]
    torch.testing.assert_close(static["student"]["input_ids"], batch["student"]["input_ids"])
    assert static["bot"] == 3 and static["teacher"]["parts_present"] == ("answer",)
    moved = batch_to(batch, "cpu")
    assert moved["student"]["input_ids"].shape == (2, 7) and moved["num_tokens"] == 24

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refused_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(tiny(tmp_path, "train.cuda_graphs=true"))


def test_refused_with_compile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not supported together"):
        tiny(tmp_path, "train.cuda_graphs=true", "model.compile=true")


def cuda_batches(method: Coconut) -> list[dict[str, Any]]:
    """Two batches of one layout (the same rows in another order: 4, 4, 2, 0 thoughts)."""
    out = []
    for examples in (EXAMPLES, EXAMPLES[::-1]):
        batch = method.collate([method.encode(e) for e in examples])
        out.append({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    assert layout(out[0]) == layout(out[1])
    return out


def eager_step(method: Coconut, batch: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method.zero_grad(set_to_none=True)
    loss = method(batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.parameters()]


@needs_cuda
@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])
def test_replayed_coconut_step_equals_eager(preset: str) -> None:
    method = make(preset, thoughts_per_step=2, max_latent_stage=3).cuda().eval()
    method.set_stage(2)
    first, second = cuda_batches(method)
    graphs = GraphedSteps(method)
    assert graphs.step(first, 1.0) is None  # a layout met once runs eagerly
    for batch in (first, second, first):  # records, then replays with other inputs
        loss, grads = eager_step(method, batch)
        method.zero_grad(set_to_none=True)
        out = graphs.step(batch, 1.0)
        assert out is not None
        torch.testing.assert_close(out.loss, loss)
        for param, grad in zip(method.parameters(), grads, strict=True):
            torch.testing.assert_close(param.grad, grad)
    assert len(graphs.recordings) == 1

    # Micro-batches accumulate, on top of a gradient already there.
    _, grads_first = eager_step(method, first)
    _, grads_second = eager_step(method, second)
    for param, grad in zip(method.parameters(), grads_first, strict=True):
        param.grad = grad.clone()
    graphs.step(first, 0.5)
    graphs.step(second, 0.5)
    for param, a, b in zip(method.parameters(), grads_first, grads_second, strict=True):
        torch.testing.assert_close(param.grad, 1.5 * a + 0.5 * b)


@needs_cuda
def test_a_parameter_the_step_does_not_reach_keeps_no_gradient() -> None:
    method = make(thoughts_per_step=2, max_latent_stage=3).cuda().eval()
    method.set_stage(2)
    method.unused = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    batch, _ = cuda_batches(method)
    graphs = GraphedSteps(method)
    graphs.step(batch, 1.0)
    method.zero_grad(set_to_none=True)
    assert graphs.step(batch, 1.0) is not None
    assert method.unused.grad is None  # as after backward(): AdamW then leaves it alone
    assert all(p.grad is not None for name, p in method.named_parameters() if name != "unused")


@needs_cuda
def test_replays_draw_fresh_dropout_and_recording_leaves_the_random_state() -> None:
    method = make(thoughts_per_step=2, max_latent_stage=3).cuda().train()  # dropout 0.1
    method.set_stage(2)
    batch, _ = cuda_batches(method)
    graphs = GraphedSteps(method)
    graphs.step(batch, 1.0)
    state = torch.cuda.get_rng_state()
    first = graphs.step(batch, 1.0).loss  # records, then replays from `state`
    second = graphs.step(batch, 1.0).loss
    assert first != second  # each replay draws new masks
    torch.cuda.set_rng_state(state)
    assert graphs.step(batch, 1.0).loss == first


@needs_cuda
def test_training_run_with_graphs_logs_the_losses_of_an_eager_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replays = []
    step = GraphedSteps.step

    def counted(self: GraphedSteps, batch: dict[str, Any], weight: float) -> Any:
        out = step(self, batch, weight)
        replays.append(out is not None)
        return out

    monkeypatch.setattr(GraphedSteps, "step", counted)
    AcceleratorState._reset_state()  # float32 here, whatever earlier tests ran under
    options = ["method.name=coconut", "method.max_latent_stage=2", "method.epochs_per_stage=1",
               "method.pad_to_multiple=64", "train.epochs=3", "train.max_steps=null",
               "train.mixed_precision=no", NO_DROPOUT]
    losses = {}
    for graphs in (False, True):
        run = tmp_path / str(graphs)
        train(tiny(run, *options, f"train.cuda_graphs={graphs}"))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[graphs] = [r["loss"] for r in rows if "loss" in r]
    assert any(replays)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@needs_cuda
def test_refused_under_fp16(tmp_path: Path) -> None:
    AcceleratorState._reset_state()  # accelerate keeps one precision per process
    try:
        with pytest.raises(ConfigError, match="loss scaler"):
            train(tiny(tmp_path, "train.cuda_graphs=true", "train.mixed_precision=fp16"))
    finally:
        AcceleratorState._reset_state()


@needs_cuda
def test_a_step_that_syncs_cannot_be_recorded() -> None:
    method = make(thoughts_per_step=2, max_latent_stage=3).cuda().eval()
    method.set_stage(2)
    batch, _ = cuda_batches(method)
    del batch["label_index"]  # lm_loss then finds the labels on the host: a device sync
    graphs = GraphedSteps(method)
    assert graphs.step(batch, 1.0) is None
    with pytest.raises(RunError, match="cannot be recorded in a CUDA graph"):
        graphs.step(batch, 1.0)
    torch.rand(1, device="cuda")  # the failed recording left the random state usable
