"""Coconut: reasoning in a continuous latent space (Hao et al., arXiv 2412.06769; METHODS.md 4).

A continuous thought is the backbone's last-layer hidden state at the previous position, fed
back as the next input embedding instead of a sampled token. Sequences look like

    question \\n <bot> [n thoughts] <eot> remaining steps (one per line) ### answer <eos>

and a curriculum moves the chain of thought into thoughts: stage 0 is plain CoT (with an empty
`<bot><eot>` pair), stage k in 1..max_latent_stage replaces the first k steps by k*c thoughts,
and the last stage also drops the steps after max_latent_stage. Loss is on the steps that are
left, the answer and <eos>.

Training needs n+1 sequential passes (thought j depends on thought j-1), run by
`engine.feedback.feedback_passes` over one cache (`engine.piecewise_cache`: each pass writes its
keys and values into buffers of the full width, with no copy of earlier columns): each pass
feeds only the new columns on top of the cached prefix, and gradients flow back through the
cached keys and values. Batching rule (see `collate`): rows are left-padded so that every row's
`<bot>` sits in the same column; thought j of every row then sits in column bot+j, so pass j
feeds exactly one column, in which rows with fewer thoughts already hold ordinary tokens whose
embeddings are known. docs/methods/coconut.md gives the argument for exactness;
tests/test_coconut.py checks it against full recomputation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch import Tensor

from latentlab.engine.deferred_grads import defer_shared_grads
from latentlab.engine.feedback import feedback_passes
from latentlab.engine.generation import (
    DecodeState,
    extend,
    left_pad,
    prefill,
)
from latentlab.errors import ConfigError, RunError
from latentlab.latents import with_orthogonality
from latentlab.methods.base import (
    Features,
    Method,
    MethodConfig,
    Stage,
    StepOutput,
    TokenBatch,
    answer_text,
    part_lm_loss,
    right_padded_states,
    round_up,
    sequence,
    steps_text,
)
from latentlab.tasks.base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BOT, EOT, THOUGHT = "<bot>", "<eot>", "<thought>"
STAGE_KEY = "latent_stage"  # entry of method.safetensors holding the exported model's stage

Mode = Literal["coconut", "no_curriculum", "no_thought", "pause_as_thought"]
# Modes whose thoughts are fed-back hidden states (the others are ordinary token sequences).
FEEDBACK_MODES: frozenset[str] = frozenset({"coconut", "no_curriculum"})


class CoconutBatch(TokenBatch, total=False):
    """`TokenBatch` plus what the feedback passes need (`Coconut.collate`)."""

    thoughts: Tensor  # [B]: the thoughts of each row
    bot: int  # the column every row's <bot> shares (rows shifted right to align them)
    max_thoughts: int  # the most thoughts of any row: the feedback passes to run
    left_padded: bool  # whether any row was shifted (then attention_mask matters)


class CoconutConfig(MethodConfig):
    name: Literal["coconut"] = "coconut"
    orthogonality: float = Field(0.0, ge=0.0, description="λ of the orthogonality penalty on "
                                 "each example's continuous thoughts (METHODS.md section 6)")
    thoughts_per_step: int = Field(1, ge=1, description="c: thoughts replacing one step "
                                   "(1 for ProsQA, 2 for GSM8K)")
    max_latent_stage: int = Field(6, ge=1, description="last curriculum stage; it also removes "
                                  "the steps after it (6 for ProsQA, 3 for GSM8K)")
    epochs_per_stage: int = Field(5, ge=1, description="epochs of each stage before the last "
                                  "(5 for ProsQA, 3 for GSM8K); the last stage gets the rest "
                                  "of train.epochs, at least this many")
    reset_optimizer: bool = Field(True, description="clear AdamW's moments at each new stage")
    mode: Mode = Field("coconut", description="coconut; or the paper's ablations: "
                       "no_curriculum (train on the last stage only), no_thought (the "
                       "curriculum removes steps, inserts no thoughts), pause_as_thought (a "
                       "learned <thought> token instead of fed-back hidden states)")
    uniform_thoughts: bool = Field(False, description="every example gets k*c thoughts at "
                                   "stage k, even with fewer than k steps (Coconut's "
                                   "pad_latent_to_max, set in both of its reference configs)")
    thoughts_at_eval: int | None = Field(None, ge=0, description="thoughts at inference for "
                                         "the last stage; None: max_latent_stage * c")
    new_token_init: str | None = Field(None, description="a token whose embedding (and LM-"
                                       "head row) <bot>, <eot> and <thought> start from when "
                                       "they are added: '<<' in Coconut's reference code; "
                                       "None: random rows")
    pad_to_multiple: int = Field(1, ge=1, description="round the <bot> column and the batch "
                                 "width up to a multiple of this (more padding, fewer batch "
                                 "shapes: train.cuda_graphs then replays more; 64 suits it)")
    defer_shared_grads: Literal["replayed", "always", "never"] = Field(
        "replayed", description="compute the gradients of what the n+1 passes of a training "
        "step share (every parameter; the prefix's cached keys and values, which the thought "
        "passes attend to) once per step instead of once per pass (engine.deferred_grads: "
        "the same gradients, fewer and smaller kernels). replayed: in steps recorded into CUDA "
        "graphs (train.cuda_graphs), where it saves GPU time; launched eagerly, its "
        "per-operator Python costs more host time than it saves (docs/methods/coconut.md)")
    first_stage: int = Field(0, ge=0, description="stage the curriculum starts at: 1 skips "
                             "stage 0 (plain CoT) when model.init_from is already a CoT run, "
                             "as Coconut's GSM8K recipe does")

    @model_validator(mode="after")
    def _first_stage_in_range(self) -> CoconutConfig:
        if self.first_stage > self.max_latent_stage:
            raise ValueError(f"first_stage {self.first_stage} is after max_latent_stage "
                             f"{self.max_latent_stage}")
        return self


class Coconut(Method):
    name = "coconut"
    config_class = CoconutConfig
    config: CoconutConfig
    latent_stage: int  # k of the curriculum: the first k steps are thoughts

    def __init__(self, config: CoconutConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        self.bot_id, self.eot_id, self.thought_id = (
            tokenizer.convert_tokens_to_ids(t) for t in (BOT, EOT, THOUGHT))
        self.set_stage(0)  # the curriculum's first stage (config.first_stage)

    @property
    def pad_to_multiple(self) -> int:  # type: ignore[override]
        return self.config.pad_to_multiple

    @classmethod
    def special_tokens(cls, config: MethodConfig) -> list[str]:
        return [BOT, EOT, THOUGHT]

    def init_new_tokens(self, tokens: list[str]) -> None:
        """Copy `new_token_init`'s rows into the new tokens' rows, input and output embeddings
        alike (one matrix when they are tied), as the reference does with `<<`."""
        source = self.config.new_token_init
        if source is None or not tokens:
            return
        ids = self.tokenizer.encode(source, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"method.new_token_init={source!r} is {len(ids)} tokens of this "
                              "run's tokenizer, not one",
                              fix="name a single token of the tokenizer, or null for random "
                              "rows")
        rows = self.tokenizer.convert_tokens_to_ids(tokens)
        matrices = {id(m.weight): m.weight for m in (self.backbone.get_input_embeddings(),
                                                     self.backbone.get_output_embeddings())}
        with torch.no_grad():
            for weight in matrices.values():
                weight[rows] = weight[ids[0]].clone()

    # -- curriculum ------------------------------------------------------------------------
    def stages(self, epochs: int) -> list[Stage]:
        """Stages 0..max_latent_stage; the last one takes the rest of `epochs` (total epochs).

        Coconut's reference runs train past the last stage (ProsQA: 50 epochs, of which 35 go
        through stages 0..6); giving the remainder to the last stage reproduces that with
        `train.epochs`, while a smaller `train.epochs` never shortens the curriculum.
        """
        cfg = self.config
        last = cfg.max_latent_stage
        if cfg.mode == "no_curriculum":
            return [Stage(f"latent-{last}", epochs)]
        rest = max(cfg.epochs_per_stage,
                   epochs - (last - cfg.first_stage) * cfg.epochs_per_stage)
        # Only the last stage's model is Coconut: earlier stages may validate higher (stage 0
        # is CoT) but must not become `best/`.
        return [Stage(f"latent-{k}", cfg.epochs_per_stage if k < last else rest,
                      reset_optimizer=cfg.reset_optimizer, select=k == last)
                for k in range(cfg.first_stage, last + 1)]

    def set_stage(self, index: int) -> None:
        """Enter the `index`-th entry of `stages()`: curriculum stage first_stage + index."""
        first, last = self.config.first_stage, self.config.max_latent_stage
        if not 0 <= index <= last - first:
            raise ValueError(f"stage index {index} is outside 0..{last - first}")
        self.latent_stage = last if self.config.mode == "no_curriculum" else first + index

    def thought_count(self, n_steps: int) -> int:
        """Thoughts of a training example with `n_steps` steps at the current stage."""
        if self.config.mode == "no_thought":
            return 0
        k = self.latent_stage
        return self.config.thoughts_per_step * (k if self.config.uniform_thoughts
                                                else min(k, n_steps))

    def latent_budget(self) -> int:
        """N_L: the thoughts of the last stage, at inference (the curriculum's aim)."""
        if self.config.mode == "no_thought":
            return 0
        if self.config.thoughts_at_eval is not None:
            return self.config.thoughts_at_eval
        return self.config.max_latent_stage * self.config.thoughts_per_step

    def eval_thoughts(self) -> int:
        """Thoughts at inference: the step count is unknown there, so one number for all."""
        if self.config.mode == "no_thought":
            return 0
        k = self.latent_stage
        if k == self.config.max_latent_stage and self.config.thoughts_at_eval is not None:
            return self.config.thoughts_at_eval
        return k * self.config.thoughts_per_step

    def steps_in_latents(self) -> int:
        """Stage k's thoughts (or, in no_thought mode, nothing) take the place of the first k
        steps; the last stage writes no steps."""
        return self.latent_stage

    # -- data ------------------------------------------------------------------------------
    def encode(self, example: Example) -> Features:
        k = self.latent_stage
        n = self.thought_count(len(example.steps))
        kept = () if k == self.config.max_latent_stage else example.steps[k:]
        prompt = self.prompt_ids(example)
        features = sequence([
            ([*prompt, self.bot_id, *[self.thought_id] * n, self.eot_id], None),
            (self.tokens(steps_text(kept)), "steps"),
            ([*self.tokens(answer_text(example)), self.tokenizer.eos_token_id], "answer"),
        ])
        # In pause_as_thought the <thought> tokens are ordinary inputs: nothing to feed back.
        features["thoughts"] = n if self.config.mode in FEEDBACK_MODES else 0
        features["bot"] = len(prompt)
        return features

    def collate(self, features: list[Features]) -> CoconutBatch:
        """Without fed-back thoughts: the right-padded batch of every method. With them: rows
        shifted right so that all `<bot>` tokens share one column (left padding), then
        right-padded; `attention_mask` marks the real tokens."""
        most = max(f["thoughts"] for f in features)
        if most == 0:
            return CoconutBatch(**super().collate(features), max_thoughts=0)
        bot = round_up(max(f["bot"] for f in features), self.pad_to_multiple)
        shifts = [bot - f["bot"] for f in features]
        width = round_up(max(s + len(f["input_ids"]) for s, f in zip(shifts, features,
                                                                     strict=True)),
                         self.pad_to_multiple)
        batch = self.collate_rows(features, [[i] for i in range(len(features))], width,
                                  offsets=shifts)
        return CoconutBatch(**batch, thoughts=torch.tensor([f["thoughts"] for f in features]),
                            bot=bot, max_thoughts=most, left_padded=any(shifts))

    # -- training --------------------------------------------------------------------------
    def forward(self, batch: CoconutBatch) -> StepOutput:
        hidden = self.hidden_states(batch)
        loss, metrics = part_lm_loss(self.backbone, hidden, batch)
        n = batch["max_thoughts"]
        if self.config.orthogonality and n > 1:
            # Thought j of a row is the state of column bot+j-1 (fed back to column bot+j);
            # rows with fewer thoughts hold tokens beyond theirs.
            thoughts = hidden[:, batch["bot"]:batch["bot"] + n]
            valid = torch.arange(n, device=hidden.device) < batch["thoughts"][:, None]
            loss = with_orthogonality(loss, metrics, thoughts, self.config.orthogonality, valid)
        return StepOutput(loss, metrics)

    def hidden_states(self, batch: CoconutBatch) -> Tensor:
        """Last-layer states of every column of a collated batch, thoughts fed back.

        Pass 0 covers columns [0, bot]; pass j (1..n-1) the single column bot+j; the last pass
        column bot+n to the end. Column bot+j holds thought j of the rows with at least j
        thoughts, whose input is the state of column bot+j-1, i.e. the previous pass's last
        output; rows with fewer thoughts hold a token there (`<eot>`, a step, padding) and keep
        its embedding. Every column is thus fed its final input exactly once, after all the
        columns it attends to, which is all a causal model with a cache needs.
        """
        ids = batch["input_ids"]
        n = batch["max_thoughts"]
        embeds = self.backbone.get_input_embeddings()(ids)
        if n == 0:
            return right_padded_states(self.backbone, embeds)
        has_thought = batch["thoughts"][:, None, None]

        def feed(j: int, previous: Tensor, given: Tensor) -> Tensor:
            # Rows with fewer thoughts hold a token in column bot+j: its embedding stays.
            return torch.where(has_thought >= j, previous.to(given.dtype), given)

        # One deferral for the whole step: the gradients of each parameter and of the prefix's
        # keys and values are computed once, after the backward of the last pass that used
        # them, instead of once per pass (engine.deferred_grads).
        recording = ids.is_cuda and torch.cuda.is_current_stream_capturing()
        policy = self.config.defer_shared_grads
        defer = torch.is_grad_enabled() and (policy == "always"
                                             or (policy == "replayed" and recording))
        with defer_shared_grads(self.backbone) if defer else contextlib.nullcontext():
            return feedback_passes(self.backbone, embeds, batch["attention_mask"],
                                   batch["left_padded"], batch["bot"], n, feed)[0]

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def before_answer(self, examples: list[Example],
                      latent_inputs: Tensor | None = None) -> DecodeState:
        """After `<eot>`: completions start with any steps left, then `###`."""
        if latent_inputs is not None and not self.has_latent_inputs():
            raise self._no_latent_inputs()  # no thoughts fed back that they could replace
        return self._think(examples, latent_inputs)[0]

    def has_latent_inputs(self) -> bool:
        # Models from before the first latent stage, and the ablation modes, feed none.
        return self.config.mode in FEEDBACK_MODES and self.eval_thoughts() > 0

    @torch.no_grad()
    def latents(self, examples: list[Example]) -> Tensor:
        """The continuous thoughts of each example as inference runs them: [n, thoughts, d]
        (last-layer states fed back as inputs), for the analyses."""
        if self.config.mode not in FEEDBACK_MODES:
            raise ValueError(f"mode {self.config.mode!r} has no continuous thoughts to record")
        _, thoughts = self._think(examples)
        if not thoughts:
            raise RunError(f"this Coconut model runs no thoughts (curriculum stage "
                           f"{self.latent_stage}: its best model came from before the first "
                           "latent stage)", fix="analyse a run trained into a latent stage, or "
                           "set method.thoughts_at_eval")
        return torch.stack(thoughts, dim=1)

    latent_inputs = latents  # the thoughts are what `_think` feeds, and takes when given

    def _think(self, examples: list[Example], given: Tensor | None = None
               ) -> tuple[DecodeState, list[Tensor]]:
        """Prefill `question \\n <bot>`, run the thoughts (one cached step each; `given`
        [B, n, d] in place of the model's own), add `<eot>`.

        Returns the state after `<eot>` and the fed-back thoughts ([B, d] each). Every row gets
        the same number of thoughts, so columns stay aligned with no extra padding.
        """
        n = self.eval_thoughts()
        feedback = self.config.mode in FEEDBACK_MODES
        head = [self.bot_id] + ([] if feedback else [self.thought_id] * n)
        prompts = [self.prompt_ids(e) + head for e in examples]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        state = prefill(self.backbone, mask, input_ids=ids)
        ones = torch.ones_like(mask[:, :1])
        thoughts: list[Tensor] = []
        for j in range(n if feedback else 0):
            thoughts.append(state.hidden[:, -1] if given is None else given[:, j])
            state = extend(self.backbone, state, ones, inputs_embeds=thoughts[-1][:, None])
        state = extend(self.backbone, state, ones, input_ids=ones * self.eot_id)
        return state, thoughts

    # -- persistence -----------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Tensor]:
        # The stage decides how many thoughts `generate` runs, and the best model may come from
        # any stage: the exported model carries it, so `load_run` evaluates it as validated.
        return {**super().extra_state_dict(), STAGE_KEY: torch.tensor([self.latent_stage])}

    def load_extra_state(self, path: Path) -> None:
        super().load_extra_state(path)  # loads what it knows; the stage entry is not a tensor
        file = path / "method.safetensors"  # of the module, so it is read here
        if file.is_file():
            saved = load_file(file)
            if STAGE_KEY in saved:
                self.latent_stage = int(saved[STAGE_KEY][0])
