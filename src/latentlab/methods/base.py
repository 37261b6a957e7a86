"""The method interface: one small contract every latent-reasoning method implements.

A method wraps a backbone (and any modules or parameters it owns), and
- `encode`s an `Example` into training features (token ids, label masks, ...),
- `collate`s features into a batch,
- turns a batch into a loss in `forward` (so DDP sees every training computation),
- `generate`s answers with its own inference loop,
- may define curriculum `stages` (Coconut) and saves itself with `save_pretrained`.

The engine drives these calls and knows nothing else about the method. Text layout is shared:
`question \\n` [steps, one per line] `### answer <eos>`, so that every method reads and writes
the same strings and scoring never depends on the method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from latentlab.engine.generation import (
    DecodeState,
    decode_completions,
    greedy_decode,
    left_pad,
    prefill,
)
from latentlab.engine.interface import Stage, StepOutput
from latentlab.errors import ConfigError, RunError
from latentlab.lm_head import head_cross_entropy
from latentlab.tasks.base import Example, Task

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ANSWER_MARKER = "###"
IGNORE = -100  # label of positions that carry no loss (the convention of torch's cross-entropy)
# The parts of a sequence that can carry loss; a position's part id is its index here plus one
# (0: no part, e.g. padding, latent slots, markers). Losses and token accuracies are logged per
# part, so a run shows whether the answer is being learned, not just the average.
PARTS = ("question", "steps", "answer")
Part = Literal["question", "steps", "answer"]
LABEL_BUCKET = 64  # `label_index` lengths are multiples of this (few shapes for CUDA graphs)


class MethodConfig(BaseModel):
    """Options of a method; subclasses add theirs and narrow `name` to a Literal."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


class LatentConfig(MethodConfig):
    """Options shared by methods that put `N_L` latents between question and answer."""

    latent_budget: int = Field(4, ge=1, description="N_L: latent vectors per example "
                               "(paper A sweeps 1, 4, 8, 16)")
    keep_steps: bool = Field(False, description="train and generate the CoT after the latents "
                             "(default: the answer only)")
    orthogonality: float = Field(0.0, ge=0.0, description="λ of the orthogonality penalty on "
                                 "each example's latents (paper A: 3 restores specialisation)")


Features = dict[str, Any]
# What `collate` returns and `forward` reads: a method's own TypedDict (below, and beside each
# method); the engine sees only a mapping of tensors and host values.
Batch = Mapping[str, Any]


class TokenBatch(TypedDict, total=False):
    """Token rows, right-padded or packed (`Method.collate_rows`): every method that trains on
    one token sequence per example (CoT, No-CoT, pause, soft) and the token part of others."""

    input_ids: Tensor  # [B, T]
    labels: Tensor  # [B, T], IGNORE where no loss; labels[t] is predicted from column t-1
    label_index: Tensor  # flat positions whose next column is labelled (see `lm_loss`)
    num_tokens: int  # real tokens read, for tokens/s
    attention_mask: Tensor  # [B, T], 1 on real tokens (rows of one example each)
    position_ids: Tensor  # [B, T], restarting at each example (packed rows)
    parts: Tensor  # [B, T], the part id of each token (reasoning examples; `PARTS`)
    part_counts: Tensor  # labelled targets per part id
    parts_present: tuple[str, ...]  # names of the parts with labels, read on the host


@dataclass(frozen=True)
class UpstreamRun:
    """A finished run that a method reads besides its own model (Latent-SFT's phase-encoder
    run), opened by the recipe: the method names it by the option that holds its directory
    (`Method.upstream_options`) and gets it through `Method.open_run`."""

    option: str  # e.g. "encoder_from": how the method's config names this run
    run_dir: Path
    method_config: MethodConfig
    task: Task  # the run's task, as its config built it
    batch_size: int  # the run's evaluation batch size
    load: Callable[[], Method]  # its best model, on the device of the model that opened it


class Method(nn.Module, ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # Batch widths are rounded up to a multiple of this (a method may make it an option): fewer
    # distinct shapes, so that train.cuda_graphs replays more and records less.
    pad_to_multiple: int = 1
    # Whether `model.compile: auto` compiles the bodies on CUDA: true where a training step is
    # one pass of the body over the batch (a few graphs, a minute of compiling, then a step
    # about 4x faster on the task shapes); methods with several passes of growing caches
    # compile a graph per pass form (Coconut: 8 graphs, about 8 minutes) and stay eager.
    compile_pays: ClassVar[bool] = False
    # Whether every pass keeps each sequence's columns in order, one after the other, so that a
    # backbone with `model.token_shift` sees each position's true predecessors (prefix, cached
    # decoding, feedback passes, the Coprocessor's cache); rows that stop early leave gaps.
    token_shift_ok: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, backbone: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        # Set by the recipe that builds or loads the model (recipes sit above methods).
        self.run_opener: Callable[[str], UpstreamRun] | None = None

    @classmethod
    def implementation(cls, config: MethodConfig) -> type[Method]:
        """The class that runs `config`: this one, or one of its variants (Latent-SFT's two
        phases are two classes behind one method name)."""
        return cls

    # -- other runs ------------------------------------------------------------------------
    def upstream_options(self) -> list[str]:
        """The options of this method's config that name another run it reads (e.g.
        `encoder_from`); the recipe checks them before training."""
        return []

    def open_run(self, option: str) -> UpstreamRun:
        """The run the option `option` of this method's config names."""
        if self.run_opener is None:
            raise RunError(f"this {self.name} model was built outside a recipe, so it cannot "
                           f"open the run method.{option} names",
                           fix="build it with latentlab.recipes (train, load_run)")
        return self.run_opener(option)

    # -- vocabulary -------------------------------------------------------------------------
    @classmethod
    def special_tokens(cls, config: MethodConfig) -> list[str]:
        """Tokens this method adds to the vocabulary (e.g. `<pause>`); added before __init__."""
        return []

    def init_new_tokens(self, tokens: list[str]) -> None:
        """Initialise the embeddings of `tokens`, just added to the vocabulary (random rows
        until then). Called once, when a run builds its model; never on a trained one."""

    # -- data ------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, example: Example) -> Features:
        """Training features of one example (plain Python data, no tensors)."""

    def feature_length(self, features: Features) -> int:
        """Tokens of an encoded example, as `train.max_length` counts them: every sequence the
        model reads for it (methods whose features hold several override this)."""
        return len(features["input_ids"])

    def collate(self, features: list[Features]) -> TokenBatch:
        """Right-pad `input_ids`/`labels`/`parts` into a batch; `num_tokens` counts real
        tokens, `label_index` locates the labels for the loss, `part_counts` counts them by
        part (see `part_lm_loss`)."""
        longest = round_up(max(len(f["input_ids"]) for f in features), self.pad_to_multiple)
        return self.collate_rows(features, [[i] for i in range(len(features))], longest)

    def collate_rows(self, features: list[Features], rows: list[list[int]], width: int,
                     packed: bool = False, offsets: list[int] | None = None) -> TokenBatch:
        """A batch of `width` columns whose row r holds the examples `rows[r]` one after the
        other, after `offsets[r]` columns of padding (left padding that aligns a column across
        rows, e.g. Coconut's `<bot>`; default none), then padding. Packed (several examples a
        row): `position_ids` restart at each example and each example after the first has no
        label on its first token (it is not predicted from the example before it); otherwise an
        `attention_mask` marks the real tokens."""
        shape = (len(rows), width)
        ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        parts = torch.zeros(shape, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        for row, members in enumerate(rows):
            start = offsets[row] if offsets else 0
            for k, i in enumerate(members):
                f, n = features[i], len(features[i]["input_ids"])
                ids[row, start:start + n] = torch.tensor(f["input_ids"])
                labels[row, start:start + n] = torch.tensor(f["labels"])
                if k:
                    labels[row, start] = IGNORE
                if "parts" in f:  # a reasoning example (a text window has no parts)
                    parts[row, start:start + n] = torch.tensor(f["parts"])
                mask[row, start:start + n] = 1
                positions[row, start:start + n] = torch.arange(n)
                start += n
            positions[row, start:] = torch.arange(width - start)  # padding: a sequence apart
        batch = TokenBatch(input_ids=ids, labels=labels, label_index=label_index(labels),
                           num_tokens=int(mask.sum()))
        if packed:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        if "parts" in features[0]:
            batch.update(part_fields(labels, parts))
        return batch

    # -- training --------------------------------------------------------------------------
    @abstractmethod
    def forward(self, batch: Batch) -> StepOutput:
        """The training loss of a batch."""

    def stages(self, epochs: int) -> list[Stage]:
        """The curriculum; by default one stage of `epochs` epochs."""
        return [Stage("train", epochs)]

    def set_stage(self, index: int) -> None:
        """Switch to curriculum stage `index` (changes what `encode` produces)."""

    # -- text pretraining (optional) -------------------------------------------------------
    def encode_text(self, ids: list[int]) -> Features:
        """Training features of a pretraining window (task `text`)."""
        raise ConfigError(f"method {self.name!r} has no text-pretraining recipe",
                          fix="pretrain with cot/nocot (a plain LM) or liu/h1/h2")

    def text_nll(self, batch: Batch) -> dict[str, Tensor]:
        """Per-token NLLs that define validation perplexity (task `text`): `nll` [..., K],
        the last axis being a position (e.g. the k-th token after the latents); extra
        entries (e.g. `base_nll`) are reported beside it."""
        raise NotImplementedError

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int,
                 latent_inputs: Tensor | None = None) -> list[str]:
        """Greedy completions after `before_answer` (KV-cached, batched, left-padded);
        `latent_inputs` replace the method's own (`latent_inputs`)."""
        tokens = greedy_decode(self.backbone, self.before_answer(examples, latent_inputs),
                               max_new_tokens, self.tokenizer.eos_token_id,
                               self.tokenizer.pad_token_id)
        return decode_completions(self.tokenizer, tokens)

    def before_answer(self, examples: list[Example],
                      latent_inputs: Tensor | None = None) -> DecodeState:
        """The decoding state from which the model writes its completion: the prompt read
        (methods with latents, thoughts or a coprocessor add theirs here, or the
        `latent_inputs` given in their place)."""
        if latent_inputs is not None:  # a method that feeds latents has its own before_answer
            raise self._no_latent_inputs()
        prompts = [self.prompt_ids(e) for e in examples]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        return prefill(self.backbone, mask, inputs_embeds=self.embed(ids))

    def latent_inputs(self, examples: list[Example]) -> Tensor:
        """What the method puts between question and answer at inference, example first
        ([n, ...]: the vectors it feeds or injects): what the latent-dependence ablations
        replace through `generate(..., latent_inputs=...)`. Methods that insert a fixed number
        of latents implement it."""
        raise self._no_latent_inputs()

    def has_latent_inputs(self) -> bool:
        """Whether this model inserts latents `latent_inputs` can return."""
        return type(self).latent_inputs is not Method.latent_inputs

    def _no_latent_inputs(self) -> RunError:
        return RunError(f"method {self.name!r} has no latent inputs to replace",
                        fix="ablate the latents of a method that inserts a fixed number")

    def generate_with_steps(self, examples: list[Example],
                            max_new_tokens: int) -> tuple[list[str], list[int | None]]:
        """Completions and, for methods whose number of latent steps varies per example
        (Latent-SFT's `#L`), that number; None where it does not apply."""
        return self.generate(examples, max_new_tokens), [None] * len(examples)

    def steps_in_latents(self) -> int:
        """Leading reasoning steps the model's latents stand for at inference, so that the
        steps it writes go on from there (the task's step metrics judge them so); none by
        default."""
        return 0

    # -- latents and analyses (methods with latents) ----------------------------------------
    def latents(self, examples: list[Example]) -> Tensor:
        """The latent vectors the model puts between question and answer at inference, [n,
        N_L, d] (zero after an example's last where their number varies): what `latentlab
        analyze` measures. Methods without latents keep this default."""
        raise RunError(f"method {self.name!r} has no latents to analyse",
                       fix="analyse a run of a method with latents (`latentlab analyze` lists "
                           "them)")

    @classmethod
    def has_latents(cls) -> bool:
        return cls.latents is not Method.latents

    def latent_budget(self) -> int | None:
        """N_L: the latent vectors the model may use per example (None: no latents), the axis
        on which studies compare methods; recorded in results.json."""
        budget = getattr(self.config, "latent_budget", None)
        return budget if isinstance(budget, int) else None

    # The options of `analyses`, validated by `latentlab analyze` before the model loads
    # (`--option NAME=VALUE`); None: the method has no analyses of its own.
    analysis_options: ClassVar[type[BaseModel] | None] = None

    def analyses(self, task: Task, examples: list[Example], run_dir: Path,
                 options: BaseModel | None, batch_size: int,
                 max_new_tokens: int) -> dict[str, dict[str, Any]]:
        """The method's own measures of its trained model on `examples` (e.g. Latent-SFT's
        ECR@K and N_eff), by name: `latentlab analyze` writes each to `analysis/NAME.json`
        and prints its `summary` line; a `per_example` entry stays in the file only."""
        return {}

    def scores_held_out_loss(self) -> bool:
        """Whether `encode` takes examples outside the training split, so that a teacher-forced
        validation loss exists (it breaks ties of validation accuracy)."""
        return True

    @classmethod
    def ddp_find_unused_parameters(cls, config: MethodConfig) -> bool:
        """Whether some trainable parameters get no gradient in some steps (a schedule that
        freezes parts of the model), which DDP must be told about."""
        return False

    def prompt_ids(self, example: Example) -> list[int]:
        """The tokens the model reads before it starts to answer."""
        return self.tokens(prompt_text(example))

    def target_pieces(self, example: Example, keep_steps: bool
                      ) -> list[tuple[list[int], Part]]:
        """What the model learns to produce after its prompt (and latents), by part: the steps
        if kept, then `### answer` and EOS."""
        steps = [(self.tokens(steps_text(example.steps)), "steps")] if keep_steps else []
        answer = [*self.tokens(answer_text(example)), self.tokenizer.eos_token_id]
        return [*steps, (answer, "answer")]  # type: ignore[list-item]

    def target_ids(self, example: Example, keep_steps: bool) -> list[int]:
        """`target_pieces` as one list of ids."""
        return [i for ids, _ in self.target_pieces(example, keep_steps) for i in ids]

    def embed(self, ids: Tensor) -> Tensor:
        """Input embeddings of token ids; methods with soft tokens substitute theirs here."""
        return self.backbone.get_input_embeddings()(ids)

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, path: Path) -> None:
        """Backbone and tokenizer in Hugging Face format under `model/`, the method's own
        parameters (soft tokens, a coprocessor, ...) in `method.safetensors`."""
        self.backbone.save_pretrained(path / "model")
        self.tokenizer.save_pretrained(path / "model")
        extra = self.extra_state_dict()
        if extra:
            # clone: tied weights (a Coprocessor's embeddings and LM head) share storage,
            # which safetensors refuses; loading copies the same values into both again.
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in extra.items()},
                      path / "method.safetensors")

    def load_extra_state(self, path: Path) -> None:
        file = path / "method.safetensors"
        if file.is_file():
            self.load_state_dict(load_file(file), strict=False)

    def extra_state_dict(self) -> dict[str, Tensor]:
        """Parameters and buffers the method owns beyond the backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # -- helpers ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def tokens(self, text: str) -> list[int]:
        # A fast tokenizer's Rust core directly: the same ids without the Python wrapper,
        # which is most of the encoding time of a streamed task's data workers.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(example: Example) -> str:
    return example.question + "\n"


def steps_text(steps: tuple[str, ...] | list[str]) -> str:
    return "".join(step + "\n" for step in steps)


def answer_text(example: Example) -> str:
    return f"{ANSWER_MARKER} {example.answer}"


def extract_answer(completion: str) -> str:
    """The answer in a completion: the line after the last answer marker ('' if none)."""
    if ANSWER_MARKER not in completion:
        return ""
    tail = completion.rsplit(ANSWER_MARKER, 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


def extract_steps(completion: str) -> list[str]:
    """The reasoning lines of a completion: the non-empty lines before the answer marker."""
    head = completion.split(ANSWER_MARKER, 1)[0]
    return [line.strip() for line in head.splitlines() if line.strip()]


def sequence(pieces: list[tuple[list[int], Part | None]]) -> Features:
    """Concatenate token pieces; those with a part (`PARTS`) are predicted (carry labels)."""
    input_ids: list[int] = []
    labels: list[int] = []
    parts: list[int] = []
    for ids, part in pieces:
        input_ids += ids
        labels += ids if part else [IGNORE] * len(ids)
        parts += [part_id(part)] * len(ids)
    return {"input_ids": input_ids, "labels": labels, "parts": parts}


def part_id(part: Part | None) -> int:
    return PARTS.index(part) + 1 if part else 0


def part_fields(labels: Tensor, parts: Tensor) -> TokenBatch:
    """A batch's `parts` [B, T], `part_counts` (labelled targets per part id, float, so that
    the loss divides on the device) and `parts_present` (names, read on the host)."""
    targets = parts[:, 1:][labels[:, 1:] != IGNORE]
    counts = torch.bincount(targets, minlength=len(PARTS) + 1).float()
    present = tuple(name for i, name in enumerate(PARTS, 1) if counts[i] > 0)
    return TokenBatch(parts=parts, part_counts=counts, parts_present=present)


def right_padded_states(backbone: PreTrainedModel, embeds: Tensor,
                        position_ids: Tensor | None = None) -> Tensor:
    """Last-layer states of a right-padded batch, or of a packed one (`position_ids` restart at
    each example: transformers then keeps attention within each).

    Right padding puts every pad after every real token, so the causal mask alone is exact. No
    mask lets transformers drop it and SDPA use its flash kernel instead of materialising
    B x H x T x T attention weights (about 20 GB per process for ProsQA batches of GPT-2
    small); an all-ones mask would do the same after reading it on the host (a device sync per
    call, which a CUDA graph cannot contain). Embeddings, not ids: given ids and no mask,
    transformers looks for pad tokens in them on the host (a sync, and a warning).
    """
    # use_cache=False: a training pass needs no key/value cache (and with one, transformers
    # does not look for packed sequences).
    return backbone.base_model(inputs_embeds=embeds, position_ids=position_ids,
                               use_cache=False).last_hidden_state


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of sequences of `lengths` packed into rows of `width` tokens: first fit, longest
    first (the rows keep their sequences in that order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def label_index(labels: Tensor) -> Tensor:
    """Positions whose next token carries a label, as indices into `labels.flatten()` (and into
    `hidden.flatten(0, 1)` for states of the same layout): position i predicts label i+1.

    Collates compute it on the CPU, so that `lm_loss` gathers the labelled states without
    reading the labels on the device (a host sync, which a CUDA graph cannot contain). The
    count is rounded up to a multiple of `LABEL_BUCKET` with positions whose target is IGNORE
    (the loss skips them), so that batches of one shape share a few index shapes.
    """
    width = labels.shape[1]
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    index = rows * width + cols
    extra = -len(index) % LABEL_BUCKET
    fillers = (targets == IGNORE).nonzero() if extra else ()
    if len(fillers):
        filler = fillers[0, 0] * width + fillers[0, 1]
        index = torch.cat([index, filler.expand(extra)])
    return index


def part_lm_loss(backbone: PreTrainedModel, hidden: Tensor, batch: Batch,
                 question_weight: float = 0.0, offset: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of a batch collated with `part_fields`, and its loss and token accuracy
    per part present (`loss_steps`, `acc_answer`, ...).

    loss = mean cross-entropy over the labelled steps and answer tokens
           + question_weight * mean cross-entropy over the labelled question tokens,
    so the answer's signal is not diluted by however many question tokens are labelled.
    `offset`: columns of `hidden` before `batch["labels"]`'s first (a Coprocessor's injection).
    A batch without parts (text windows) gets the plain mean over its labels.
    """
    if "parts" not in batch:
        return lm_loss(backbone, hidden, batch["labels"], batch.get("label_index")), {}
    labels = batch["labels"]
    parts = batch["parts"]
    if offset:
        labels = torch.cat([labels.new_full((labels.shape[0], offset), IGNORE), labels], 1)
        parts = torch.cat([parts.new_zeros((parts.shape[0], offset)), parts], 1)
    index = batch.get("label_index") if not offset else None
    if index is None:
        index = label_index(labels)
    states = hidden.flatten(0, 1).index_select(0, index)
    targets = labels.flatten().index_select(0, index + 1)
    part = parts.flatten().index_select(0, index + 1)  # 0 for the index's fillers
    nll, hit = head_cross_entropy(backbone, states, targets, IGNORE, hits=True)
    assert hit is not None
    sums = nll.new_zeros(len(PARTS) + 1).index_add_(0, part, nll)
    hits = nll.new_zeros(len(PARTS) + 1).index_add_(0, part, hit.float())
    counts = batch["part_counts"].to(nll.device)
    main = (sums[2:].sum() / counts[2:].sum().clamp(min=1))
    loss = main + question_weight * sums[1] / counts[1].clamp(min=1) if question_weight else main
    metrics: dict[str, Tensor] = {}
    for name in batch["parts_present"]:
        i = part_id(name)
        metrics[f"loss_{name}"] = (sums[i] / counts[i]).detach()
        metrics[f"acc_{name}"] = (hits[i] / counts[i]).detach()
    return loss, metrics


def lm_loss(backbone: PreTrainedModel, hidden: Tensor, labels: Tensor,
            index: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of `labels[t]` predicted from the last-layer state at `t-1`.

    Only the positions that carry a label go through the LM head: with a 50k vocabulary the
    full logits tensor would dominate memory, and most positions (the question) have no label.
    `index` is the batch's `label_index`; without it, it is computed here, which reads the
    labels on the host (a device sync per step).
    """
    if index is None:
        index = label_index(labels)
    states = hidden.flatten(0, 1).index_select(0, index)
    targets = labels.flatten().index_select(0, index + 1)
    nll, _ = head_cross_entropy(backbone, states, targets, IGNORE)
    return nll.sum() / (targets != IGNORE).sum()
