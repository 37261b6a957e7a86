"""The engine's options: the `train` section of a run config (the engine reads no other)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; ends training "
                                  "early if the epochs would take more (never extends them)")
    max_time: float | None = Field(
        None, gt=0, description="minutes of training (steps, validations, checkpoints; carried "
        "over a resume): the speed is measured past the start-up and the schedule (warm-up, "
        "cosine) laid out over the steps that fit, measured and laid out again every 10 s "
        "of steps and after each validation; the epochs and max_steps stay upper bounds. "
        "The planned count is logged (`planned_steps` in metrics.jsonl): train.max_steps=N "
        "repeats it exactly")
    stages_by_time: bool = Field(
        False, description="with train.max_time: a curriculum stage (all but the last) ends "
        "once the run has spent its share of the time, the stages' epochs up to it over all "
        "their epochs, if its epochs have not ended it first; so a curriculum reaches its "
        "last stage however slow its later steps are. Off: stages end after their epochs, "
        "and the time may run out before the last")
    batch_size: int = Field(32, ge=1, description="examples per device per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up; under train.max_time one "
                              "not shorter than the planned steps is cut to a tenth of them")
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0, description="None: no clipping")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on a GPU that supports it, float32 on CPU")
    eval_every: int = Field(0, ge=0, description="steps between validations; 0: each epoch")
    eval_samples: int | None = Field(200, ge=1, description="validation examples scored "
                                     "during training (None: all)")
    save_every: int = Field(0, ge=0, description="steps between resumable checkpoints; "
                            "0: at each validation")
    save_every_minutes: float | None = Field(
        5.0, gt=0, description="also checkpoint when this many minutes of training have passed "
        "since the last checkpoint (a killed run loses at most that much); None: steps and "
        "validations only")
    stop_after: int | None = Field(None, ge=1, description="end this invocation after this many "
                                   "optimizer steps with a checkpoint (for time-limited jobs); "
                                   "`--resume` continues")
    log_every: int = Field(10, ge=1)
    profile: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="[FIRST, COUNT]: record steps FIRST..FIRST+COUNT-1 with "
        "torch.profiler; RUN_DIR/profile/ gets their operators by device time and a trace "
        "(engine/profiling.py). Those steps run slower")
    data_workers: int | None = Field(
        None, ge=0, description="processes that generate and collate batches ahead of the "
        "step (None: on GPUs every core but one per process of the node, shared by them; 0 on "
        "a CPU, where the cores train). Runs that share a machine should split its cores")
    max_length: int = Field(1024, ge=8, description="longest training sequence in tokens")
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/Inf loss or gradient: 'stop' the run (the last checkpoint "
        "is kept), or 'skip' the step (no update; logged as {step, skipped: nonfinite})")
    cuda_graphs: bool = Field(False, description="record each training step's forward and "
                              "backward in a CUDA graph once per batch layout and replay it: "
                              "for steps bound by kernel launches (Coconut's sequential "
                              "passes); one CUDA device, bf16 or float32 (docs/design.md)")
    max_skipped_steps: int = Field(25, ge=1, description="consecutive steps without an update "
                                   "(skipped non-finite steps, fp16 loss-scale overflows) after "
                                   "which the run stops: the run diverged")
    max_skipped_share: float = Field(
        0.5, ge=0, le=1, description="share of all steps that may be skipped (non-finite, fp16 "
        "overflows); a run that skipped more ends with an error instead of results: its model "
        "was mostly not trained")
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="experiment trackers that get every metrics.jsonl "
        "row, through accelerate (tensorboard: logs under RUN_DIR/trackers; each needs its "
        "package installed, e.g. pip install 'latentlab[tensorboard]')")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @model_validator(mode="after")
    def _stages_need_a_time(self) -> TrainConfig:
        if self.stages_by_time and self.max_time is None:
            raise ValueError("stages_by_time shares out train.max_time, which is not set: set "
                             "train.max_time (minutes), or stages_by_time: false")
        return self
