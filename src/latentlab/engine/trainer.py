"""The training loop. It knows nothing about methods or tasks.

What it drives is any `nn.Module` that
- maps a batch (a dict from `collate`) to a `StepOutput` in `forward`,
- has `set_stage(index)` (curriculum) and `save_pretrained(path)` (export of the best model).
Data arrives per epoch from a `prepare(stage_index, epoch)` callback (the same list every
epoch, or fresh streamed examples); validation is an `evaluate(step)` callback returning
numbers, and the best model is chosen on `select_metric`.

Accelerate handles devices, DDP and mixed precision. The loop itself is explicit: a seeded
permutation per epoch, global batches split across processes and then into micro-batches for
gradient accumulation, collated in DataLoader workers and pinned ahead of the step, AdamW
(fused on GPUs), warmup + cosine, clipping, JSONL metrics, periodic validation, atomic
resumable checkpoints. A resumed run continues with the same data order, RNG states, optimizer
and scheduler, so it reaches the weights of an uninterrupted run. With a time budget
(`train.max_time`) the schedule is laid out over the steps the measured speed allows. A NaN/Inf
step stops the run or is skipped (`train.on_nonfinite`); SIGTERM/SIGINT save a checkpoint, then
stop (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from latentlab.engine.checkpoint import CheckpointManager
from latentlab.engine.config import TrainConfig
from latentlab.engine.cuda_graphs import GraphedSteps
from latentlab.engine.interface import Stage, batch_to
from latentlab.engine.profiling import StepProfiler
from latentlab.errors import ConfigError, NumericalError, RunError
from latentlab.signals import handling


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
    skipped_in_row: int = 0  # consecutive steps without an update (train.max_skipped_steps)
    skipped_steps: int = 0  # all steps without an update (train.max_skipped_share)
    best_loss: float | None = None  # validation loss of the best model: breaks metric ties
    saved_at: float = 0.0  # train_seconds at the last checkpoint (train.save_every_minutes)
    # Training loss summed over the steps since the last logged row: checkpointed so that a
    # resumed run logs the same averages as an uninterrupted one.
    loss_sum: float = 0.0
    loss_steps: int = 0
    # Sums of the method's own step metrics (StepOutput.metrics) since the last log row, and
    # how many steps reported each (a part of the sequence may be absent from some batches).
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_counts: dict[str, int] = field(default_factory=dict)
    # Time budget (train.max_time): seconds spent in the training loop so far (steps,
    # validations, checkpoints; carried over a resume), and the step count the schedule is
    # laid out over once the speed is measured (None before that, or without a budget).
    train_seconds: float = 0.0
    planned_steps: int | None = None


class StepResult(NamedTuple):
    loss: float
    tokens: int
    grad_norm: float
    finite: bool  # False: the loss or the gradient was NaN/Inf and no update was made
    overflow: bool  # fp16: the loss scaler found Inf/NaN gradients, skipped, lowered its scale
    metrics: dict[str, float]  # the method's own numbers (e.g. lm_loss, orthogonality)


class Interrupted(RunError):
    """A signal stopped training; a checkpoint was saved first."""


# Entries of metrics.jsonl rows that measure wall-clock time: they differ between any two runs,
# all the others are reproducible.
# A validation number that breaks ties of the selection metric (lower is better).
TIE_BREAK_METRIC = "teacher_forced_loss"
WALL_CLOCK_KEYS = frozenset({"tokens_per_s", "data_wait", "train_seconds", "seconds_per_step"})
# Time budget: the first steps of an invocation (compilation, autotuning, the first batches)
# are left out of the speed that lays out the schedule, which is measured over windows of at
# least PLAN_AFTER_STEPS steps and PLAN_AFTER_SECONDS, the schedule laid out anew after each.
WARM_STEPS = 10
PLAN_AFTER_STEPS = 20
PLAN_AFTER_SECONDS = 10.0
WARMUP_SHARE = 10  # a warm-up longer than a time budget's plan is cut to 1/WARMUP_SHARE of it


class Schedule:
    """The learning-rate factor at a step: linear warm-up, then cosine decay to zero at
    `total` steps (or constant). `total` may be laid out later (a time budget's plan); a
    `LambdaLR` over it then follows the new layout from the next step."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.configured_warmup = kind, warmup
        self.lay_out(total)

    def lay_out(self, total: int) -> None:
        """End the schedule at `total` steps. A configured warm-up not shorter than that (only
        a time budget's plan gets here: a fixed length is checked at the start) is cut to a
        tenth of the steps: the plan comes after minutes of start-up and training, which a
        configuration error would throw away."""
        self.total = total
        self.warmup = (self.configured_warmup if self.configured_warmup < total
                       else max(1, total // WARMUP_SHARE))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class Pace:
    """The seconds a step will take from here on, for a time budget's plan: the steps' own
    time (waits for data included) over the latest window, plus the validations and
    checkpoints so far spread over the steps since the start-up. The latest window, not the
    mean since the start-up: the first steps' batches were prefetched while the model
    compiled, and a curriculum's longer examples come later, so a run slows down and a plan
    from its first speed would end it at the time limit with the learning rate still high."""

    def __init__(self, step: int, seconds: float) -> None:  # the end of the start-up
        self.start_step, self.start = step, seconds
        self.overhead = 0.0  # seconds of validations and checkpoints since then
        self.window = (step, 0.0)  # where the current window began: step, step-seconds
        self.step_time: float | None = None

    def measure(self, step: int, seconds: float) -> bool:
        """Close the window once it holds PLAN_AFTER_STEPS steps and PLAN_AFTER_SECONDS of
        their own time; True when it did (the step time is new)."""
        own = seconds - self.start - self.overhead
        begin_step, begin = self.window
        if step - begin_step < PLAN_AFTER_STEPS or own - begin < PLAN_AFTER_SECONDS:
            return False
        self.step_time = (own - begin) / (step - begin_step)
        self.window = (step, own)
        return True

    def per_step(self, step: int) -> float:
        assert self.step_time is not None
        return self.step_time + self.overhead / (step - self.start_step)


PREFETCH_FACTOR = 4  # batches each data worker collates ahead


class EpochLoader(NamedTuple):
    batches: list[list[int]]  # the epoch's global batches (example indices)
    loader: Iterator[list[dict[str, Any]]]  # this process's micro-batches, from the start


class StepBatches(Dataset):
    """Item b: this process's micro-batches of global batch b, collated (run in DataLoader
    workers, so that collation overlaps the previous step)."""

    def __init__(self, data: Sequence[Any], batches: list[list[int]], rank: int, world: int,
                 size: int, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.data, self.batches, self.collate = data, batches, collate
        self.rank, self.world, self.size = rank, world, size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> list[dict[str, Any]]:
        shard = self.batches[b][self.rank::self.world]
        return [self.collate([self.data[i] for i in shard[j:j + self.size]])
                for j in range(0, len(shard), self.size)]


def default_data_workers(device_type: str) -> int:
    """`train.data_workers` when unset: on a CPU none (the cores train); on GPUs every core
    this process may use, shared by the node's processes, less one each for the process
    itself. Generating tasks need them: one process streams about 1,000-3,000 ProsQA or
    Countdown examples a second, and a compiled step of a small model eats 10,000 or more."""
    if device_type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    return max(1, (cores or 1) // local - 1)


def _as_is(item: Any) -> Any:
    return item


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, run_dir: Path,
                 accelerator: Accelerator, collate: Callable[[list[Any]], dict[str, Any]],
                 evaluate: Callable[[int], dict[str, float]], select_metric: str = "accuracy",
                 select_mode: str = "max"):
        self.model = model
        self.config = config
        self.run_dir = run_dir
        self.acc = accelerator
        self.collate = collate
        self.evaluate = evaluate
        self.select_metric = select_metric
        self.sign = 1.0 if select_mode == "max" else -1.0  # compare sign * metric, larger wins
        self.checkpoints = CheckpointManager(run_dir, accelerator.process_index,
                                             accelerator.num_processes)
        self.metrics_path = run_dir / "metrics.jsonl"
        self._signal: int | None = None
        self._tty = False
        self.stages: Sequence[Stage] = ()
        self.graphs: GraphedSteps | None = None

    # ------------------------------------------------------------------------------------
    def fit(self, stages: Sequence[Stage], prepare: Callable[[int, int], Sequence[Any]],
            num_examples: int, resume: bool = False,
            on_start: Callable[[], None] | None = None) -> TrainerState:
        """Train through `stages`, from the latest checkpoint if `resume`. `prepare(stage,
        epoch)` gives an epoch's examples (`num_examples` of them). `on_start` is called once,
        right before the first step, when everything that can fail at the start (data, a
        damaged checkpoint) has passed."""
        cfg = self.config
        self.stages = stages
        global_batch = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        steps_per_epoch = math.ceil(num_examples / global_batch)
        total = cfg.max_steps or sum(s.epochs for s in stages) * steps_per_epoch
        if cfg.max_time is None and cfg.warmup_steps >= total:
            raise self._warmup_error(total)
        fused = self.acc.device.type == "cuda"  # one kernel for all parameters, no host sync
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=cfg.betas,
                                      fused=fused or None)
        self._step_limit = total  # what the epochs or max_steps allow; a time plan stays below
        self.schedule = Schedule(cfg.schedule, cfg.warmup_steps, total)
        scheduler = LambdaLR(optimizer, self.schedule)
        # The scheduler stays unprepared: Accelerate would step it once per process at each
        # step (it assumes per-process batches), running the schedule `num_processes` times too
        # fast, while `total` counts optimizer steps over global batches.
        model, optimizer = self.acc.prepare(self.model, optimizer)
        self.graphs = self._graphed_steps(model) if cfg.cuda_graphs else None
        # from_pretrained (init_from, a reloaded Base) returns modules in eval mode: train mode
        # from the first step, so dropout and its RNG draws match a resumed run's.
        self.model.train()
        state, resumed_from = (self._resume(optimizer, scheduler) if resume
                               else (TrainerState(), None))
        if state.done:
            return state
        if state.planned_steps is not None:
            self.schedule.lay_out(state.planned_steps)
        self.acc.print(f"[latentlab] training from step {state.step}"
                       + (f", resumed from {resumed_from}" if resumed_from else ""))

        # A live bar on a terminal; in a log file, the periodic metric lines instead.
        self._tty = sys.stderr.isatty()
        bar = tqdm(total=self.schedule.total, initial=state.step, desc="train",
                   dynamic_ncols=True, disable=not (self.acc.is_main_process and self._tty))
        # Throughput and the time spent waiting for batches (wall clock: not checkpointed).
        window = {"tokens": 0, "time": 0.0, "wait": 0.0}
        stop_at = state.step + cfg.stop_after if cfg.stop_after else None
        first_step = state.step
        replan = False  # a validation's time is in: plan again at the next step
        self._progress_from = (state.step, state.train_seconds)  # for the time left
        # Made once WARM_STEPS steps are done: the speed is measured from there (the time
        # budget's plan, the start-up cost, the time left), past compilation and first batches.
        self._pace: Pace | None = None
        profiler = StepProfiler(cfg.profile, self.run_dir / "profile", self.acc.device,
                                self.acc.is_main_process)
        with self._signals(), profiler:
            for stage_index in range(state.stage, len(stages)):
                stage = stages[stage_index]
                self._unwrap().set_stage(stage_index)
                if self.graphs is not None:
                    self.graphs.forget()
                if stage.reset_optimizer and stage_index > 0 and state.epoch == state.batch == 0:
                    optimizer.optimizer.state.clear()
                upcoming: EpochLoader | None = None  # the next epoch's, started early
                for epoch in range(state.epoch, stage.epochs):
                    batches, loader = upcoming or self._loader(
                        prepare, stage_index, epoch, global_batch, state.batch)
                    upcoming = None
                    stage_over = False
                    clock = time.perf_counter()
                    for b, micro in zip(range(state.batch, len(batches)), loader, strict=True):
                        window["wait"] += time.perf_counter() - clock  # for the next batch
                        if (upcoming is None and epoch + 1 < stage.epochs
                                and len(batches) - b <= self._lookahead):
                            # The next epoch's workers start while this epoch's last batches,
                            # already collated, are trained on: no wait at the boundary.
                            # Within a stage only: a new stage may collate differently.
                            upcoming = self._loader(prepare, stage_index, epoch + 1,
                                                    global_batch, 0)
                        if on_start is not None:
                            on_start()
                            on_start = None
                        t0 = time.perf_counter()
                        with profiler.step(state.step + 1):
                            result = self._step(model, optimizer, scheduler, micro)
                        window["time"] += time.perf_counter() - t0
                        if (not result.finite and not result.overflow
                                and cfg.on_nonfinite == "stop"):
                            raise self._nonfinite_error(state.step + 1, result)
                        state.step += 1
                        state.stage, state.epoch, state.batch = stage_index, epoch, b + 1
                        state.skipped_in_row = 0 if result.finite else state.skipped_in_row + 1
                        if result.finite:
                            window["tokens"] += result.tokens
                            state.tokens += result.tokens
                            state.loss_sum += result.loss
                            state.loss_steps += 1
                            for name, value in result.metrics.items():
                                state.metric_sums[name] = state.metric_sums.get(name, 0.0) + value
                                state.metric_counts[name] = state.metric_counts.get(name, 0) + 1
                        else:
                            state.skipped_steps += 1
                            self._log_skip(state, result)
                            if state.skipped_in_row >= cfg.max_skipped_steps:
                                raise self._stalled_error(state.step)
                        bar.update(1)
                        now = time.perf_counter()
                        state.train_seconds += now - clock
                        clock = now
                        signalled = self._agree_on_time(state)
                        if state.step - first_step == WARM_STEPS:
                            self._pace = Pace(state.step, state.train_seconds)
                        if cfg.max_time is not None:
                            self._plan(state, bar, validated=replan)
                            replan = False
                        if state.step - first_step == 2 * WARM_STEPS:
                            self._print_startup_cost(state)
                        # A stage past its share of the time ends as its epochs would.
                        stage_over = self._stage_time_spent(state, stage_index)
                        end_of_epoch = b + 1 == len(batches) or stage_over
                        # The data can end before `total` steps: examples longer than
                        # max_length are dropped, and max_steps may exceed the epochs.
                        out_of_time = (cfg.max_time is not None
                                       and state.train_seconds >= cfg.max_time * 60)
                        finished = state.step >= self.schedule.total or out_of_time or (
                            end_of_epoch and epoch + 1 == stage.epochs
                            and stage_index + 1 == len(stages))
                        if state.step % cfg.log_every == 0 or finished:
                            self._log_train(state, window, scheduler,
                                            result.grad_norm if result.finite else None, bar)
                        evaluated = self._maybe_evaluate(state, end_of_epoch, finished)
                        time_due = (cfg.save_every_minutes is not None and state.train_seconds
                                    - state.saved_at >= cfg.save_every_minutes * 60)
                        if (finished or (stop_at is not None and state.step >= stop_at)
                                or signalled is not None or time_due or
                                (cfg.save_every and state.step % cfg.save_every == 0) or
                                (not cfg.save_every and evaluated)):
                            if end_of_epoch:  # store the position as "next epoch, batch 0"
                                state.epoch, state.batch = epoch + 1, 0
                                if epoch + 1 == stage.epochs or stage_over:
                                    state.stage, state.epoch = stage_index + 1, 0
                            state.done = finished
                            self._save_checkpoint(model, optimizer, scheduler, state)
                        now = time.perf_counter()
                        state.train_seconds += now - clock
                        if self._pace is not None:
                            self._pace.overhead += now - clock
                        clock = now
                        # Re-planned at the next step, once the processes agree on the time.
                        replan = replan or evaluated
                        if signalled is not None:  # even on the last step: it was asked for
                            raise Interrupted(
                                f"stopped by signal {signal.Signals(signalled).name} after "
                                f"step {state.step}; a checkpoint was saved",
                                fix=f"continue with `latentlab train ... --resume` "
                                    f"(run directory {self.run_dir})")
                        if finished or (stop_at is not None and state.step >= stop_at):
                            bar.close()
                            return state
                        if stage_over:
                            break
                    state.batch = 0
                    if stage_over:
                        break
                state.epoch = 0
        bar.close()
        return state

    @property
    def _workers(self) -> int:
        workers = self.config.data_workers
        return default_data_workers(self.acc.device.type) if workers is None else workers

    @property
    def _lookahead(self) -> int:
        """Batches before an epoch's end at which the next epoch's loader starts: the
        batches the current one has in flight, so its workers are idle by then."""
        return self._workers * PREFETCH_FACTOR  # 0 without workers: nothing to start early

    def _loader(self, prepare: Callable[[int, int], Sequence[Any]], stage: int, epoch: int,
                global_batch: int, start: int) -> EpochLoader:
        """An epoch's batches, and an iterator over batches `start`.., collated in
        `train.data_workers` worker processes (forked: they share the data and the method's
        tokenizer) and pinned for the GPU. The workers start, and begin collating, at once."""
        data = prepare(stage, epoch)
        batches = self._epoch_batches(len(data), stage, epoch, global_batch)
        workers = self._workers
        if workers:
            # Forked workers would otherwise inherit a tokenizer's busy thread pool.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        steps = StepBatches(data, batches, self.acc.process_index, self.acc.num_processes,
                            self.config.batch_size, self.collate)
        # Its own generator: a DataLoader draws a seed for its workers from the generator it
        # is given, which must not be the global one (dropout's draws would then depend on
        # where an epoch was entered, and a resumed run would differ).
        loader = DataLoader(steps, batch_size=None, sampler=range(start, len(batches)),
                            collate_fn=_as_is, num_workers=workers, generator=torch.Generator(),
                            pin_memory=self.acc.device.type == "cuda",
                            prefetch_factor=PREFETCH_FACTOR if workers else None,
                            multiprocessing_context="fork" if workers else None)
        return EpochLoader(batches, iter(loader))

    def _plan(self, state: TrainerState, bar: Any, validated: bool = False) -> None:
        """Lay the schedule out over the steps the time budget allows at the measured pace:
        first once the speed is known, then after each window of measurement and each
        validation."""
        cfg = self.config
        pace = self._pace
        if pace is None or not (pace.measure(state.step, state.train_seconds)
                                or (validated and pace.step_time is not None)):
            return
        left = cfg.max_time * 60 - state.train_seconds
        if left <= 0:  # this step is the last
            return
        per_step = pace.per_step(state.step)
        planned = min(self._step_limit, state.step + max(1, int(left / per_step)))
        if planned == state.planned_steps:
            return
        first, warmup = state.planned_steps is None, self.schedule.warmup
        state.planned_steps = bar.total = planned
        self.schedule.lay_out(planned)
        self.log({"step": state.step, "planned_steps": planned, "seconds_per_step": per_step})
        if first:
            self.acc.print(f"[latentlab] train.max_time={cfg.max_time:g} min: {per_step:.3f} s "
                           f"per step, schedule laid out over {planned} steps")
        if self.schedule.warmup not in (warmup, cfg.warmup_steps):  # newly cut
            self.acc.print(f"[latentlab] warning: train.warmup_steps={cfg.warmup_steps} is not "
                           f"shorter than the {planned} steps train.max_time allows: warm-up "
                           f"cut to {self.schedule.warmup} steps (1/{WARMUP_SHARE} of them). "
                           "Fix: lower train.warmup_steps or raise train.max_time")

    def _print_startup_cost(self, state: TrainerState) -> None:
        """Once per invocation: how much longer the first WARM_STEPS steps took than the next
        WARM_STEPS (compilation, CUDA-graph capture, autotuning, the first batches), printed
        so that a compiled run's cost is visible next to its speed (not a metrics row: a
        resumed run has start-ups an uninterrupted one does not)."""
        assert self._pace is not None
        warm = self._pace.start - self._progress_from[1]
        steady = state.train_seconds - self._pace.start
        startup = max(0.0, warm - steady)
        self.acc.print(f"[latentlab] start-up: the first {WARM_STEPS} steps took "
                       f"{warm:.1f} s, the next {WARM_STEPS} {steady:.1f} s "
                       f"(about {startup:.1f} s of compilation, autotuning, first batches)")

    def _warmup_error(self, total: int) -> ConfigError:
        return ConfigError(f"train.warmup_steps={self.config.warmup_steps} is not shorter than "
                           f"the run ({total} steps)",
                           fix="lower train.warmup_steps, or train longer (train.max_steps, "
                               "train.epochs or train.max_time)")

    # ------------------------------------------------------------------------------------
    def _step(self, model: nn.Module, optimizer: Any, scheduler: Any,
              micro: list[dict[str, Any]]) -> StepResult:
        """One optimizer step over this process's share of a global batch, given as collated
        micro-batches.

        A NaN/Inf loss or gradient makes no update and leaves the scheduler where it was; the
        caller stops or skips (`train.on_nonfinite`). Either way the model, optimizer and
        scheduler are as the last finite step left them, so the last checkpoint stays the
        state to resume from, and a skipped step replays identically after a resume."""
        total_loss = torch.zeros((), device=self.acc.device)
        metrics: dict[str, Tensor] = {}
        tokens = 0
        for j, batch in enumerate(micro):
            tokens += batch.get("num_tokens", 0)
            batch = batch_to(batch, self.acc.device, non_blocking=True)
            sync = contextlib.nullcontext() if j == len(micro) - 1 else self.acc.no_sync(model)
            with sync:
                # With train.cuda_graphs, forward and backward in one replay when the batch's
                # layout has a recording.
                out = self.graphs.step(batch, 1 / len(micro)) if self.graphs else None
                if out is None:
                    out = model(batch)
                    self.acc.backward(out.loss / len(micro))
            total_loss += out.loss.detach() / len(micro)
            for name, value in out.metrics.items():
                metrics[name] = metrics.get(name, 0.0) + value.detach().float() / len(micro)
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
        # The step's numbers in one reduction over processes and one copy to the host: each
        # read of a device number waits for the GPU, and each reduction is a collective.
        # Float64 keeps token counts exact; the norm, the same on every process, is not reduced.
        names = list(metrics)
        local = torch.stack([total_loss.double(),
                             torch.tensor(tokens, dtype=torch.float64, device=self.acc.device),
                             *(metrics[n].double() for n in names)])
        summed = self.acc.reduce(local, reduction="sum")
        loss_sum, token_total, *metric_sums, norm = torch.cat(
            [summed, grad_norm.detach().double().reshape(1)]).tolist()
        loss = loss_sum / self.acc.num_processes
        # Loss and norm are the same on every process, so every process takes the same branch.
        finite = math.isfinite(loss) and math.isfinite(norm)
        overflow = False
        # Under fp16 the loss scaler decides on the gradients: its step skips the update and
        # lowers the scale when they hold Inf/NaN (an overflow, routine while the scale adapts).
        if finite or (self.acc.scaler is not None and math.isfinite(loss)):
            optimizer.step()
            overflow = self.acc.optimizer_step_was_skipped
            finite = finite and not overflow
            if not overflow:
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        means = {n: v / self.acc.num_processes for n, v in zip(names, metric_sums, strict=True)}
        return StepResult(loss, int(token_total), norm, finite, overflow, means)

    def _graphed_steps(self, model: nn.Module) -> GraphedSteps:
        problem = ("it needs a CUDA device" if self.acc.device.type != "cuda"
                   else "it records one process's step, without DDP's gradient exchange"
                   if self.acc.num_processes > 1
                   else "fp16's loss scaler is not recorded" if self.acc.scaler is not None
                   else None)
        if problem:
            raise ConfigError(f"train.cuda_graphs cannot be used here: {problem}",
                              fix="set train.cuda_graphs=false (or run on one GPU with "
                                  "train.mixed_precision=bf16 or no)")
        return GraphedSteps(model)

    def _last_checkpoint(self) -> str:
        latest = self.checkpoints.latest()
        return (f"{latest.relative_to(self.run_dir)} is the last checkpoint" if latest
                else "there is no checkpoint yet")

    def _nonfinite_error(self, step: int, result: StepResult) -> NumericalError:
        return NumericalError(
            f"step {step}: the loss or the gradient is not finite (loss {result.loss}, gradient "
            f"norm {result.grad_norm}); training stopped and wrote nothing more: "
            f"{self._last_checkpoint()}",
            fix="resume with train.on_nonfinite=skip added to skip such steps, or start a new "
                "run with a lower train.lr or train.max_grad_norm")

    def _stalled_error(self, step: int) -> NumericalError:
        return NumericalError(
            f"step {step}: {self.config.max_skipped_steps} steps in a row made no update "
            f"(non-finite loss or gradients, or fp16 overflows); training stopped: "
            f"{self._last_checkpoint()}",
            fix="start again with a lower train.lr or train.max_grad_norm, or with "
                "train.mixed_precision=bf16 where the GPU has it (no loss scaling)")

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
        # A compiled model validates eagerly: compiled code serves the training step, and
        # generation's own call forms (a prefill per length, a decode over each layer's cache)
        # would compile anew (docs/results.md, "ProsQA CoT alone on the GPU").
        with self.acc.autocast(), torch.compiler.set_stance("force_eager"):
            metrics = self.evaluate(state.step)
        self.model.train()
        self.log({"step": state.step, "stage": state.stage, "split": "valid", **metrics})
        self.acc.print(f"step {state.step}: validation "
                       + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                   if isinstance(v, int | float)))
        score = self.sign * metrics[self.select_metric]
        selectable = self.stages[min(state.stage, len(self.stages) - 1)].select
        if finished and not selectable and state.best_step is None:
            # Training ended (max_steps) before any stage whose model may be selected: export
            # the final model rather than leave the run without one, and say so.
            self.acc.print("[latentlab] warning: training ended before a selectable "
                           "curriculum stage; best/ holds the final model")
            selectable = True
        # Ties (a run at 0% accuracy throughout) go to the lower teacher-forced validation
        # loss, and to the later model where the evaluation reports none.
        loss = metrics.get(TIE_BREAK_METRIC)
        better = state.best_metric is None or score > state.best_metric or (
            score == state.best_metric and (loss is None or state.best_loss is None
                                            or loss < state.best_loss))
        if selectable and better:
            state.best_metric, state.best_step, state.best_loss = score, state.step, loss
            if self.acc.is_main_process:
                self.checkpoints.export_best(self._unwrap(), state.step, metrics)
            self.acc.wait_for_everyone()
        return True

    def _save_checkpoint(self, model: nn.Module, optimizer: Any, scheduler: Any,
                         state: TrainerState) -> None:
        if self.acc.is_main_process:
            state.metrics_bytes = (self.metrics_path.stat().st_size
                                   if self.metrics_path.exists() else 0)
        state.saved_at = state.train_seconds
        tmp = self.checkpoints.begin(state.step)
        self.acc.wait_for_everyone()
        try:
            self.checkpoints.write_rank_state(tmp)
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                self.checkpoints.write_main_state(tmp, self._unwrap(), optimizer, scheduler,
                                                  asdict(state), self.acc.scaler)
                self.checkpoints.commit(tmp)
        except BaseException:
            self.checkpoints.discard(tmp)  # a partial checkpoint is never loaded: no junk
            raise
        self.acc.wait_for_everyone()

    def _resume(self, optimizer: Any, scheduler: Any) -> tuple[TrainerState, Path | None]:
        """The state of the latest complete checkpoint (a fresh one if there is none yet)."""
        path = self.checkpoints.latest()
        state = TrainerState()
        if path is not None:
            saved = self.checkpoints.load(path, self._unwrap(), optimizer, scheduler,
                                          self.acc.scaler)
            try:
                state = TrainerState(**saved)
            except TypeError:
                raise RunError(f"checkpoint {path} has an unknown state.json layout",
                               fix="resume with the latentlab version that wrote it") from None
        if self.acc.is_main_process and self.metrics_path.exists():
            # Rows logged after the checkpoint (all of them, without one) would be logged
            # again: drop them.
            with self.metrics_path.open("r+b") as handle:
                handle.truncate(state.metrics_bytes)
        return state, path

    # ------------------------------------------------------------------------------------
    def _log_train(self, state: TrainerState, window: dict[str, float], scheduler: Any,
                   grad_norm: float | None, bar: Any) -> None:
        if not state.loss_steps:
            return
        means = {k: v / state.metric_counts.get(k, state.loss_steps)
                 for k, v in state.metric_sums.items()}
        row = {"step": state.step, "stage": state.stage, "epoch": state.epoch,
               "loss": state.loss_sum / state.loss_steps, "lr": scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "tokens": state.tokens,
               "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
               # Share of the steps' wall time spent waiting for the data: above a few percent,
               # batch generation starves the device (raise train.data_workers).
               "data_wait": window["wait"] / max(window["wait"] + window["time"], 1e-9),
               "train_seconds": round(state.train_seconds, 2), **means}
        # Loss and token accuracy per part of the sequence (question, steps, answer); other
        # named losses (a method's terms) without an accuracy.
        parts = ", ".join(
            f"{k.removeprefix('loss_')} {v:.3f}" + (f"/{means['acc_' + k[5:]]:.1%}"
                                                    if "acc_" + k[5:] in means else "")
            for k, v in means.items() if k.startswith("loss_"))
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if not self._tty:  # a log file: what a bar would show, in words
            self.acc.print(f"step {state.step}: loss {row['loss']:.4f}"
                           + (f" ({parts})" if parts else "")
                           + f", lr {row['lr']:.2e}, {row['tokens_per_s']:.0f} tokens/s, "
                           f"{row['data_wait']:.0%} waiting for data" + self._progress(state))
        self.log(row)
        state.loss_sum, state.loss_steps = 0.0, 0
        state.metric_sums, state.metric_counts = {}, {}
        window.update(tokens=0, time=0.0, wait=0.0)

    def _progress(self, state: TrainerState) -> str:
        """", step N of TOTAL, about T left", once the total is known (a time budget's plan)."""
        if self.config.max_time is not None and state.planned_steps is None:
            return ""
        total = self.schedule.total
        step0, seconds0 = self._progress_from
        if self._pace is not None:  # the speed past the start-up (compilation)
            step0, seconds0 = self._pace.start_step, self._pace.start
        done = state.step - step0
        if done <= 0 or total <= state.step:
            return f", step {state.step} of {total}"
        left = (state.train_seconds - seconds0) / done * (total - state.step)
        if self.config.max_time is not None:  # the run ends there whatever the speed
            left = min(left, max(0.0, self.config.max_time * 60 - state.train_seconds))
        minutes, seconds = divmod(round(left), 60)
        return (f", step {state.step} of {total}, about "
                + (f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s") + " left")

    def _log_skip(self, state: TrainerState, result: StepResult) -> None:
        if result.overflow:
            scale = float(self.acc.scaler.get_scale())
            self.log({"step": state.step, "stage": state.stage, "skipped": "overflow",
                      "loss_scale": scale})
            self.acc.print(f"step {state.step}: skipped, fp16 gradient overflow (loss "
                           f"{result.loss}); loss scale lowered to {scale:g}")
            return
        self.log({"step": state.step, "stage": state.stage, "skipped": "nonfinite"})
        self.acc.print(f"step {state.step}: skipped, not finite (loss {result.loss}, gradient "
                       f"norm {result.grad_norm}); train.on_nonfinite=skip")

    def log(self, row: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with self.metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        if self.acc.trackers:  # train.trackers: the same numbers, as "train/loss", "valid/..."
            prefix = f"{row['split']}/" if "split" in row else "train/"
            self.acc.log({prefix + k: v for k, v in row.items() if k != "step"
                          and isinstance(v, int | float) and not isinstance(v, bool)},
                         step=row["step"])

    def _stage_time_spent(self, state: TrainerState, stage_index: int) -> bool:
        """Whether a stage other than the last has had its share of `train.max_time` (with
        `train.stages_by_time`): the epochs of the stages up to it over all stages' epochs."""
        cfg, stages = self.config, self.stages
        if not cfg.stages_by_time or cfg.max_time is None or stage_index + 1 == len(stages):
            return False
        share = (sum(s.epochs for s in stages[:stage_index + 1])
                 / sum(s.epochs for s in stages))
        return state.train_seconds >= share * cfg.max_time * 60

    def _agree_on_time(self, state: TrainerState) -> int | None:
        """What every process must decide alike, once per step: the signal that ends training
        after this step (the largest over the processes: they get signals at different
        moments; read once per step, so one arriving later is handled a step later, never
        between deciding to save and saying a checkpoint was saved), and the time. Each process
        has its own clock, and the main one (which logs, validates and writes) spends more; a
        decision taken on each clock (the time budget's end and plan, a checkpoint due by the
        clock) would differ between them, one process would stop or re-plan while the others
        train on: the main process's time, and its measured overhead, are every process's."""
        pace = self._pace
        if self.acc.num_processes > 1:
            mine = torch.tensor([[self._signal or 0, state.train_seconds,
                                  pace.overhead if pace else 0.0]],
                                dtype=torch.float64, device=self.acc.device)
            received = self.acc.gather(mine)
            state.train_seconds = float(received[0, 1])
            if pace is not None:
                pace.overhead = float(received[0, 2])
            signal_number = int(received[:, 0].max())
        else:
            signal_number = self._signal or 0
        return signal_number or None

    def _signals(self) -> contextlib.AbstractContextManager[None]:
        """SIGTERM/SIGINT finish the current step, save a checkpoint, then stop; a second one
        stops at once (a step, a validation or a compilation can take minutes)."""
        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                raise Interrupted(f"stopped at once by a second signal "
                                  f"{signal.Signals(signum).name}: nothing was saved since the "
                                  "last checkpoint",
                                  fix="continue from the last checkpoint with `latentlab train "
                                      f"... --resume` (run directory {self.run_dir})")
            self._signal = signum

        return handling((signal.SIGTERM, signal.SIGINT), handler)
