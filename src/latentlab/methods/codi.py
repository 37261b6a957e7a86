"""CODI: continuous chain-of-thought via self-distillation (Shen et al., "CODI: Compressing
Chain-of-Thought into Continuous Space via Self-Distillation", arXiv 2502.21074; reference code
github.com/zhenyi4/codi).

One backbone plays two roles in every training step, with shared weights:
- the **teacher** reads the plain chain of thought `question \\n s_1..s_K ### y <eos>` and learns
  it (`L_teacher`: cross-entropy on steps and answer, exactly CoT's loss);
- the **student** reads `question \\n <bot> z_1 .. z_N <eot> ### y <eos>`, where the continuous
  thought `z_{t+1} = proj(h_t)` is the projected last-layer hidden state of the position before
  it (`<bot>`'s for `z_1`), and learns the answer (`L_student`: cross-entropy on `### y <eos>`);
- **self-distillation** pulls the student's hidden states, at every layer, at the token that
  predicts the answer's first token, towards the teacher's at the same token of its sequence
  (`L_KD`, the teacher behind a stop-gradient). In the paper that token is the ':' of "The
  answer is:"; here it is the last token of `answer_text`'s `### ` before the answer's text.

    loss = alpha * L_student + beta * L_teacher + gamma * L_KD  (+ orthogonality * penalty(z))

    L_KD = 1/M * sum_{l=1..M}  mean_{b,k} rho(h^S_{l,b,k} - sg(h^T_{l,b,k})) / std(sg(h^T_l))

`h_l` [B, d] is layer l's output at the distilled token (the backbone's `hidden_states[l]`,
l = 1..M, M = layers: the embedding output `hidden_states[0]` is left out, as in the paper's
sum over layers; the reference code also averages it in); `rho` is |x| (`distill_loss: l1`)
or the smooth L1 (0.5 x^2 if |x| < 1, else |x| - 0.5: `smooth_l1`, the reference's default);
the mean is over the batch and the d dimensions, and `std` the (unbiased) standard deviation of
the teacher's B x d values of that layer, both as the reference code computes them (its gamma,
1 for LLaMA and 20 for GPT-2, is for this scale).

Training runs the teacher in one pass and the student in N+1 passes over one key/value cache
(`engine.feedback.feedback_passes`; gradients flow through the cached keys and values): the
prefix up to `<bot>`, one column per thought, then `z_N`, `<eot>` and the answer. Batching rule:
rows are left-padded so that every row's `<bot>` sits in one column b, so thought t of every row
is in column b+t (every row has N thoughts), and each pass covers the same columns in all rows
(Coconut's `collate` does the same; docs/methods/codi.md gives the argument). tests/test_codi.py
checks the cached student against full recomputation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypedDict

import torch
from pydantic import Field
from torch import Tensor, nn

from latentlab.engine.feedback import feedback_passes
from latentlab.engine.generation import (
    DecodeState,
    extend,
    left_pad,
    prefill,
)
from latentlab.latents import with_orthogonality
from latentlab.methods.base import (
    ANSWER_MARKER,
    Features,
    Method,
    MethodConfig,
    StepOutput,
    TokenBatch,
    answer_text,
    part_lm_loss,
    sequence,
    steps_text,
)
from latentlab.tasks.base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BOT, EOT = "<bot>", "<eot>"


class RoleBatch(TokenBatch, total=False):
    """One role's rows (`Method.collate_rows`) and `distill`, the column of each row's distilled
    token (the one that predicts the answer's first token)."""

    distill: Tensor  # [B]


class CODIBatch(TypedDict):
    """The teacher's CoT rows (right-padded) and the student's rows (`<bot>` in one column)."""

    teacher: RoleBatch
    student: RoleBatch  # with an attention_mask: rows are shifted so that `<bot>` aligns
    bot: int  # the column of `<bot>` in the student's rows
    left_padded: bool  # whether some student row starts with padding
    num_tokens: int  # both roles' real tokens, for tokens/s


class CODIConfig(MethodConfig):
    name: Literal["codi"] = "codi"
    # LatentConfig's names and meanings; not LatentConfig itself, whose keep_steps has no
    # meaning here (the student never writes steps, the teacher always does).
    latent_budget: int = Field(6, ge=1, description="N: continuous thoughts z_1..z_N per "
                               "example, in training and inference (the paper: 6)")
    orthogonality: float = Field(0.0, ge=0.0, description="λ of the orthogonality penalty "
                                 "(latentlab.latents) on each example's thoughts z_1..z_N, the "
                                 "projected vectors fed as inputs (0: off, as in the paper)")
    projection: bool = Field(True, description="z_{t+1} = proj(h_t) with the paper's projection "
                             "Linear(d,d) -> GELU -> Linear(d,d) -> LayerNorm(d), trained with "
                             "the model; false: z_{t+1} = h_t, as Coconut")
    alpha: float = Field(1.0, ge=0.0, description="α: weight of L_student, the student's "
                         "cross-entropy on `### answer <eos>` after its thoughts")
    beta: float = Field(1.0, ge=0.0, description="β: weight of L_teacher, the teacher's CoT "
                        "cross-entropy on steps and answer")
    gamma: float = Field(1.0, ge=0.0, description="γ: weight of L_KD, the distillation of the "
                         "teacher's hidden states at the answer-predicting token into the "
                         "student's (the paper: 1 for LLaMA-1B, 20 for GPT-2)")
    distill_loss: Literal["l1", "smooth_l1"] = Field(
        "smooth_l1", description="ρ of L_KD on each hidden-state entry: |x| (the paper's L1 "
        "norm) or the smooth L1 (0.5 x^2 below 1, |x| - 0.5 above: the reference code's "
        "default); either way divided by the teacher's standard deviation per layer")


class CODI(Method):
    name = "codi"
    config_class = CODIConfig
    config: CODIConfig

    def __init__(self, config: CODIConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(config, backbone, tokenizer)
        self.bot_id, self.eot_id = tokenizer.convert_tokens_to_ids([BOT, EOT])
        d = backbone.get_input_embeddings().embedding_dim
        # Outside `backbone`: the base class's extra_state_dict saves it in method.safetensors.
        self.projection: nn.Module = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d))
            if config.projection else nn.Identity())

    @classmethod
    def special_tokens(cls, config: MethodConfig) -> list[str]:
        return [BOT, EOT]

    # -- data ------------------------------------------------------------------------------
    def encode(self, example: Example) -> Features:
        """Both roles' sequences (`teacher`, `student`: input_ids, labels, parts, and
        `distill`, the index of the distilled token) and `bot`, `<bot>`'s index."""
        prompt = self.prompt_ids(example)
        steps = self.tokens(steps_text(example.steps))
        answer = [*self.tokens(answer_text(example)), self.tokenizer.eos_token_id]
        lead = self.answer_lead(example)
        n = self.config.latent_budget
        # The thought columns hold pad ids: placeholders, replaced by z_t before any pass.
        student_head = [*prompt, self.bot_id, *[self.tokenizer.pad_token_id] * n, self.eot_id]
        teacher = sequence([(prompt, None), (steps, "steps"), (answer, "answer")])
        student = sequence([(student_head, None), (answer, "answer")])
        teacher["distill"] = len(prompt) + len(steps) + lead - 1
        student["distill"] = len(student_head) + lead - 1
        return {"teacher": teacher, "student": student, "bot": len(prompt)}

    def feature_length(self, features: Features) -> int:
        return len(features["teacher"]["input_ids"]) + len(features["student"]["input_ids"])

    def answer_lead(self, example: Example) -> int:
        """Tokens of `answer_text` before the first one that holds the answer's text: those of
        `### ` (1 or 2 with the trained tokenizers: '###' then ' yes', or '###', ' ', '3').
        The token before that first one predicts it: the distilled token."""
        ids = self.tokens(answer_text(example))
        marker = ANSWER_MARKER + " "
        lead = 0
        while lead < len(ids) and marker.startswith(self.tokenizer.decode(ids[:lead + 1])):
            lead += 1
        return lead

    def collate(self, features: list[Features]) -> CODIBatch:
        """The teacher's rows right-padded (CoT's batch); the student's shifted right so that
        all `<bot>` tokens share one column (left padding), then right-padded, with an
        `attention_mask` of the real tokens."""
        teacher = [f["teacher"] for f in features]
        width = max(len(f["input_ids"]) for f in teacher)
        teacher_batch = self.collate_rows(teacher, [[i] for i in range(len(teacher))], width)
        num_tokens = teacher_batch.pop("num_tokens")

        student = [f["student"] for f in features]
        bot = max(f["bot"] for f in features)
        shifts = [bot - f["bot"] for f in features]
        width = max(s + len(f["input_ids"]) for s, f in zip(shifts, student, strict=True))
        student_batch = self.collate_rows(student, [[i] for i in range(len(student))], width,
                                          offsets=shifts)
        num_tokens += student_batch.pop("num_tokens")  # a step reads both roles' tokens
        teacher_batch["distill"] = torch.tensor([f["distill"] for f in teacher])
        student_batch["distill"] = torch.tensor([s + f["distill"]
                                                 for s, f in zip(shifts, student, strict=True)])
        return CODIBatch(teacher=teacher_batch, student=student_batch, bot=bot,
                         left_padded=any(shifts), num_tokens=num_tokens)

    # -- training --------------------------------------------------------------------------
    def forward(self, batch: CODIBatch) -> StepOutput:
        cfg = self.config
        teacher, student = batch["teacher"], batch["student"]
        # Right-padded, so no mask: the causal mask alone is exact (see right_padded_states);
        # every layer's states, for L_KD.
        out = self.backbone.base_model(inputs_embeds=self.embed(teacher["input_ids"]),
                                       use_cache=False, output_hidden_states=True)
        loss_teacher, teacher_metrics = part_lm_loss(self.backbone, out.last_hidden_state,
                                                     teacher)
        hidden, tail_layers, thoughts = self.student_states(batch)
        loss_student, metrics = part_lm_loss(self.backbone, hidden, student)
        # The distilled token is in the student's last pass, which starts at column bot + N.
        tail_start = batch["bot"] + cfg.latent_budget
        loss_kd = self.distillation_loss(out.hidden_states[1:], teacher["distill"],
                                         tail_layers[1:], student["distill"] - tail_start)
        loss = cfg.alpha * loss_student + cfg.beta * loss_teacher + cfg.gamma * loss_kd
        metrics |= {f"teacher_{k}": v for k, v in teacher_metrics.items()}
        metrics |= {"loss_student": loss_student.detach(), "loss_teacher": loss_teacher.detach(),
                    "loss_kd": loss_kd.detach()}
        loss = with_orthogonality(loss, metrics, thoughts, cfg.orthogonality)
        return StepOutput(loss, metrics)

    def student_states(self, batch: CODIBatch) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """The student's last-layer states at every column [B, T, d], every layer's states
        (`hidden_states`, embedding output first) at the columns of the last pass, from bot + N
        on, and the thoughts z_1..z_N [B, N, d]: N+1 passes over one cache
        (`engine.feedback.feedback_passes`), column bot+t fed z_t = proj(state of column
        bot+t-1)."""
        thoughts: list[Tensor] = []

        def feed(t: int, previous: Tensor, given: Tensor) -> Tensor:
            thoughts.append(self.projection(previous).to(given.dtype))
            return thoughts[-1]

        hidden, layers = feedback_passes(
            self.backbone, self.embed(batch["student"]["input_ids"]),
            batch["student"]["attention_mask"], batch["left_padded"], batch["bot"],
            self.config.latent_budget, feed, last_pass_layers=True)
        assert layers is not None  # asked for
        return hidden, layers, torch.cat(thoughts, dim=1)

    def distillation_loss(self, teacher_layers: tuple[Tensor, ...], teacher_index: Tensor,
                          student_layers: tuple[Tensor, ...], student_index: Tensor) -> Tensor:
        """L_KD (module docstring) between layers [B, T, d] at one column per row each."""
        rho = (nn.functional.l1_loss if self.config.distill_loss == "l1"
               else nn.functional.smooth_l1_loss)  # smooth L1's threshold: 1, the reference's
        terms = []
        for teacher, student in zip(teacher_layers, student_layers, strict=True):
            target = at_columns(teacher, teacher_index).detach().float()  # sg(h^T_l)
            mean_rho = rho(at_columns(student, student_index).float(), target)  # over B x d
            terms.append(mean_rho / target.std())
        return torch.stack(terms).mean()

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def before_answer(self, examples: list[Example],
                      latent_inputs: Tensor | None = None) -> DecodeState:
        """After `<eot>`: completions are `### answer`, which `extract_answer` reads."""
        return self._think(examples, latent_inputs)[0]

    @torch.no_grad()
    def latents(self, examples: list[Example]) -> Tensor:
        """The continuous thoughts z_1..z_N of each example as inference runs them (the
        projected vectors fed as inputs): [n, N, d], for the analyses."""
        return torch.cat(self._think(examples)[1], dim=1)

    latent_inputs = latents  # the thoughts are what `_think` feeds, and takes when given

    def _think(self, examples: list[Example], given: Tensor | None = None
               ) -> tuple[DecodeState, list[Tensor]]:
        """Prefill `question \\n <bot>` (left-padded), run the N thoughts (one cached step
        each; `given` [B, N, d] in place of the model's own), add `<eot>`. Returns the state
        after `<eot>` and the thoughts ([B, 1, d] each).
        Every row gets N thoughts, so columns stay aligned with no extra padding."""
        prompts = [[*self.prompt_ids(e), self.bot_id] for e in examples]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        state = prefill(self.backbone, mask, input_ids=ids)
        ones = torch.ones_like(mask[:, :1])
        dtype = self.backbone.get_input_embeddings().weight.dtype
        thoughts: list[Tensor] = []
        for t in range(self.config.latent_budget):
            thoughts.append(self.projection(state.hidden[:, -1:]).to(dtype) if given is None
                            else given[:, t:t + 1].to(dtype))
            state = extend(self.backbone, state, ones, inputs_embeds=thoughts[-1])
        state = extend(self.backbone, state, ones, input_ids=ones * self.eot_id)
        return state, thoughts


def at_columns(states: Tensor, index: Tensor) -> Tensor:
    """`states[b, index[b]]` for every row b: [B, T, d] -> [B, d], with no host sync."""
    return states.gather(1, index[:, None, None].expand(-1, 1, states.shape[-1]))[:, 0]
