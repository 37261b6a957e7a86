"""The training loop. It knows nothing about methods or tasks.

What it drives is any `nn.Module` that
- maps a batch (a dict from `collate`) to a `StepOutput` in `forward`,
- has `set_stage(index)` (curriculum) and `save_pretrained(path)` (export of the best model).
Data arrives per stage from a `prepare(stage_index)` callback; validation is an `evaluate(step)`
callback returning numbers, and the best model is chosen on `select_metric`.

Accelerate handles devices, DDP and mixed precision. The loop itself is explicit: a seeded
permutation per epoch, global batches split across processes and then into micro-batches for
gradient accumulation, AdamW, warmup + cosine, clipping, JSONL metrics, periodic validation,
atomic resumable checkpoints. A resumed run continues with the same data order, RNG states,
optimizer and scheduler, so it reaches the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from latentlab.config import TrainConfig
from latentlab.engine.checkpoint import CheckpointManager, atomic_write_text
from latentlab.engine.interface import Stage
from latentlab.errors import NumericalError, RunError


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    stage: int = 0
    epoch: int = 0  # within the stage
    batch: int = 0  # next global batch within the epoch
    tokens: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    metrics_bytes: int = 0  # size of metrics.jsonl when the checkpoint was taken
    done: bool = False


class Interrupted(RunError):
    """A signal stopped training; a checkpoint was saved first."""


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, run_dir: Path,
                 accelerator: Accelerator, collate: Callable[[list[Any]], dict[str, Any]],
                 evaluate: Callable[[int], dict[str, float]], select_metric: str = "accuracy"):
        self.model = model
        self.config = config
        self.run_dir = run_dir
        self.acc = accelerator
        self.collate = collate
        self.evaluate = evaluate
        self.select_metric = select_metric
        self.checkpoints = CheckpointManager(run_dir, accelerator.process_index,
                                             accelerator.num_processes)
        self.metrics_path = run_dir / "metrics.jsonl"
        self._signal: int | None = None
        self._tty = False

    # ------------------------------------------------------------------------------------
    def fit(self, stages: Sequence[Stage], prepare: Callable[[int], Sequence[Any]],
            num_examples: int, resume: bool = False) -> TrainerState:
        cfg = self.config
        global_batch = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        steps_per_epoch = math.ceil(num_examples / global_batch)
        total = cfg.max_steps or sum(s.epochs for s in stages) * steps_per_epoch
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=cfg.betas)
        make_schedule = (get_cosine_schedule_with_warmup if cfg.schedule == "cosine"
                         else get_constant_schedule_with_warmup)
        kwargs = {"num_training_steps": total} if cfg.schedule == "cosine" else {}
        scheduler = make_schedule(optimizer, num_warmup_steps=cfg.warmup_steps, **kwargs)
        model, optimizer, scheduler = self.acc.prepare(self.model, optimizer, scheduler)
        state = TrainerState()
        if resume:
            state = self._resume(optimizer, scheduler)
        if state.done:
            return state

        # A live bar on a terminal; in a log file, the periodic metric lines instead.
        self._tty = sys.stderr.isatty()
        bar = tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True,
                   disable=not (self.acc.is_main_process and self._tty))
        window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
        stop_at = state.step + cfg.stop_after if cfg.stop_after else None
        with self._signals():
            for stage_index in range(state.stage, len(stages)):
                stage = stages[stage_index]
                self._unwrap().set_stage(stage_index)
                data = prepare(stage_index)
                if stage.reset_optimizer and stage_index > 0 and state.epoch == state.batch == 0:
                    optimizer.optimizer.state.clear()
                for epoch in range(state.epoch, stage.epochs):
                    batches = self._epoch_batches(len(data), stage_index, epoch, global_batch)
                    for b in range(state.batch, len(batches)):
                        t0 = time.perf_counter()
                        loss, tokens, grad_norm = self._step(model, optimizer, scheduler,
                                                             [data[i] for i in batches[b]])
                        window["time"] += time.perf_counter() - t0
                        window["loss"] += loss
                        window["n"] += 1
                        window["tokens"] += tokens
                        state.step += 1
                        state.tokens += tokens
                        state.stage, state.epoch, state.batch = stage_index, epoch, b + 1
                        bar.update(1)
                        finished = state.step >= total
                        end_of_epoch = b + 1 == len(batches)
                        if state.step % cfg.log_every == 0 or finished:
                            self._log_train(state, window, scheduler, grad_norm, bar)
                        evaluated = self._maybe_evaluate(state, end_of_epoch, finished)
                        if (finished or (stop_at is not None and state.step >= stop_at)
                                or self._signal is not None or
                                (cfg.save_every and state.step % cfg.save_every == 0) or
                                (not cfg.save_every and evaluated)):
                            if end_of_epoch:  # store the position as "next epoch, batch 0"
                                state.epoch, state.batch = epoch + 1, 0
                                if epoch + 1 == stage.epochs:
                                    state.stage, state.epoch = stage_index + 1, 0
                            state.done = finished
                            self._save_checkpoint(model, optimizer, scheduler, state)
                        if finished:
                            bar.close()
                            return state
                        if self._signal is not None:
                            raise Interrupted(
                                f"stopped by signal {signal.Signals(self._signal).name} after "
                                f"step {state.step}; a checkpoint was saved",
                                fix=f"continue with `latentlab train ... --resume` "
                                    f"(run directory {self.run_dir})")
                        if stop_at is not None and state.step >= stop_at:
                            bar.close()
                            return state
                    state.batch = 0
                state.epoch = 0
        bar.close()
        return state

    # ------------------------------------------------------------------------------------
    def _step(self, model: nn.Module, optimizer: Any, scheduler: Any,
              examples: list[Any]) -> tuple[float, int, float]:
        """One optimizer step over this process's share of a global batch."""
        rank, world = self.acc.process_index, self.acc.num_processes
        shard = examples[rank::world]
        size = self.config.batch_size
        micro = [shard[i:i + size] for i in range(0, len(shard), size)]
        total_loss = torch.zeros((), device=self.acc.device)
        tokens = 0
        for j, chunk in enumerate(micro):
            batch = self.collate(chunk)
            tokens += batch.get("num_tokens", 0)
            batch = {k: v.to(self.acc.device) if isinstance(v, Tensor) else v
                     for k, v in batch.items()}
            sync = contextlib.nullcontext() if j == len(micro) - 1 else self.acc.no_sync(model)
            with sync:
                out = model(batch)
                self.acc.backward(out.loss / len(micro))
            total_loss += out.loss.detach() / len(micro)
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
        loss = self.acc.reduce(total_loss, reduction="mean")
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise NumericalError(
                f"the loss or the gradient is not finite (loss {float(loss)}, gradient norm "
                f"{float(grad_norm)}); the last good checkpoint is kept",
                fix="lower train.lr, set train.max_grad_norm, or use train.mixed_precision=no")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        token_count = torch.tensor(tokens, device=self.acc.device)
        return float(loss), int(self.acc.reduce(token_count, reduction="sum")), float(grad_norm)

    def _epoch_batches(self, n: int, stage: int, epoch: int, size: int) -> list[list[int]]:
        """A seeded permutation per (seed, stage, epoch): identical after a resume."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + stage * 1009 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        batches = [order[i:i + size] for i in range(0, n, size)]
        world = self.acc.num_processes
        if world > 1 and len(batches[-1]) < world:  # every process needs an example
            batches[-1] += order[: world - len(batches[-1])]
        return batches

    def _param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only (not on biases, norms or soft-token vectors)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [{"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def _unwrap(self) -> Any:
        return self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------
    def _maybe_evaluate(self, state: TrainerState, end_of_epoch: bool, finished: bool) -> bool:
        every = self.config.eval_every
        due = (state.step % every == 0) if every else end_of_epoch
        if not (due or finished):
            return False
        self.model.eval()
        with self.acc.autocast():
            metrics = self.evaluate(state.step)
        self.model.train()
        self.log({"step": state.step, "stage": state.stage, "split": "valid", **metrics})
        self.acc.print(f"step {state.step}: validation "
                       + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        score = metrics[self.select_metric]
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_step = score, state.step
            self._export_best()
        return True

    def _export_best(self) -> None:
        """Write the best model to `best/` atomically (tmp dir, then swap)."""
        if self.acc.is_main_process:
            tmp, best, old = (self.run_dir / n for n in (".best.tmp", "best", ".best.old"))
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            self._unwrap().save_pretrained(tmp)
            if best.exists():
                best.rename(old)
            tmp.rename(best)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _save_checkpoint(self, model: nn.Module, optimizer: Any, scheduler: Any,
                         state: TrainerState) -> None:
        if self.acc.is_main_process:
            state.metrics_bytes = (self.metrics_path.stat().st_size
                                   if self.metrics_path.exists() else 0)
        tmp = self.checkpoints.begin(state.step)
        self.acc.wait_for_everyone()
        self.checkpoints.write_rank_state(tmp)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.checkpoints.write_main_state(tmp, self._unwrap(), optimizer, scheduler,
                                              asdict(state))
            self.checkpoints.commit(tmp)
        self.acc.wait_for_everyone()

    def _resume(self, optimizer: Any, scheduler: Any) -> TrainerState:
        path = self.checkpoints.latest()
        if path is None:
            return TrainerState()
        state = TrainerState(**self.checkpoints.load(path, self._unwrap(), optimizer,
                                                     scheduler))
        if self.acc.is_main_process and self.metrics_path.exists():
            # Rows logged after the checkpoint would be logged again: drop them.
            with self.metrics_path.open("r+b") as handle:
                handle.truncate(state.metrics_bytes)
        return state

    # ------------------------------------------------------------------------------------
    def _log_train(self, state: TrainerState, window: dict[str, float], scheduler: Any,
                   grad_norm: float, bar: Any) -> None:
        if not window["n"]:
            return
        row = {"step": state.step, "stage": state.stage, "epoch": state.epoch,
               "loss": window["loss"] / window["n"], "lr": scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "tokens": state.tokens,
               "tokens_per_s": window["tokens"] / max(window["time"], 1e-9)}
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if not self._tty:
            self.acc.print(f"step {state.step}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
                           f"{row['tokens_per_s']:.0f} tokens/s")
        self.log(row)
        window.update(loss=0.0, n=0, tokens=0, time=0.0)

    def log(self, row: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with self.metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT finish the current step, save a checkpoint, then stop."""
        def handler(signum: int, frame: Any) -> None:
            self._signal = signum

        try:
            previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))
