"""Token shift: before every decoder layer, each position adds a learned mix of itself and the
few positions before it (`model.token_shift`).

    h'_t = h_t + sum_{k=0}^{w-1} W_k ⊙ h_{t-k}        (W: `TokenShift.weight`, [w, d])

a causal depthwise convolution of width w with a residual connection, zero at initialisation
(the model starts as the plain backbone). Allen-Zhu's Canon layers ("Physics of Language
Models: Part 4.1", 2025) put this layer inside transformer blocks; here it sits at each block's
input. Why: a from-scratch transformer has to build "the token before this one" out of
attention first, and in-context lookups (ProsQA's "Every X is a Y." read from a question)
need that before they can form; the shift gives every position its neighbours from step one.

The layer rides on an unmodified Hugging Face model (a forward pre-hook per decoder layer, the
weights a submodule of each layer), so `save_pretrained` writes them beside the model's own and
`load_token_shift` puts them back after `from_pretrained`. Position ids decide which neighbours
exist: h_{t-k} enters only where position_t >= k, so left padding, packed rows (positions
restart at each example) and every row's start see no other sequence. A key/value cache also
holds each layer's inputs by column (`ColumnInputs`, in `Cache.token_shift_inputs`), so cached
decoding, Coconut's and CODI's multi-pass steps equal recomputing the whole sequence, and the
Coprocessor's passes equal the Base reading the cache's columns as one sequence (its keys and
values stand in for the Base's, its layer inputs for the Base's too). Passes that place
columns out of sequence order (traces packed after a text, rows that stop early) cannot be
shifted: their methods declare `Method.token_shift_ok = False` or refuse that path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers.cache_utils import Cache  # not the model code: configs load without it

from latentlab.errors import ModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

CONFIG_KEY = "token_shift"  # the width, in the Hugging Face config (saved in config.json)


def shift_width(config: PretrainedConfig) -> int:
    """The token shift a model's Hugging Face config names (0: none)."""
    return getattr(config, CONFIG_KEY, 0) or 0


class TokenShift(nn.Module):
    """The shift of one layer: `weight[k]` scales h_{t-k} (k = 0 is the position itself)."""

    def __init__(self, hidden_size: int, width: int, index: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, hidden_size))
        self.index = index  # the layer's place, keying its inputs in a cache

    def forward(self, hidden: Tensor, positions: Tensor, before: Tensor | None) -> Tensor:
        """`hidden` [B, T, d] mixed with its predecessors; `before` [B, w-1, d]: the inputs
        of the w-1 columns before column 0 in a cache (None: there are none)."""
        width = self.weight.shape[0]
        if before is None:
            before = hidden.new_zeros(hidden.shape[0], width - 1, hidden.shape[2])
        inputs = torch.cat([before.to(hidden.dtype), hidden], dim=1)
        length = hidden.shape[1]
        out = hidden
        for k in range(width):
            exists = (positions >= k).unsqueeze(-1).to(hidden.dtype)  # [B or 1, T, 1]
            back = inputs[:, width - 1 - k: width - 1 - k + length]
            out = out + self.weight[k].to(hidden.dtype) * back * exists
        return out


class ColumnInputs:
    """One layer's inputs by cache column, as pieces in the order passes added them (a pass's
    own tensor, no copy of earlier columns: Coconut's passes backpropagate through them).
    `before` and `record` take the cache's length before the pass, so a cropped cache drops
    what was recorded after its new end, and columns that no shifted layer read (keys and
    values spliced in by another model) count as zero."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, Tensor]] = []  # (first column, inputs [B, n, d])

    def before(self, past: int, count: int, like: Tensor) -> Tensor:
        """Inputs of the `count` columns before column `past`: [B, count, d]."""
        parts, column = [], past - count
        for start, piece in self.pieces:
            end = start + piece.shape[1]
            if end <= column or start >= past:
                continue
            if start > column:
                parts.append(like.new_zeros(like.shape[0], start - column, like.shape[2]))
                column = start
            parts.append(piece[:, column - start: min(end, past) - start])
            column = min(end, past)
        if column < past:
            parts.append(like.new_zeros(like.shape[0], past - column, like.shape[2]))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def record(self, past: int, inputs: Tensor) -> None:
        """`inputs` are columns past, past+1, ...; what was recorded from `past` on is gone."""
        kept = []
        for start, piece in self.pieces:
            if start < past:
                kept.append((start, piece[:, : past - start]))
        self.pieces = [*kept, (past, inputs)]


def decoder_layers(model: PreTrainedModel, option: str = "model.token_shift=0") -> nn.ModuleList:
    """The list of decoder layers in `model`'s body (`layers` in Llama-style models, `h` in
    GPT-2's); `option` is the setting that does without them (named by the error)."""
    count = model.config.num_hidden_layers
    for child in model.base_model.children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return child
    raise ModelError(f"{option.split('=')[0]}: no list of {count} decoder layers in "
                     f"{type(model.base_model).__name__}",
                     fix=f"set {option} for this model")


@torch.compiler.disable
def _columns_before(cache: Cache, shift: TokenShift, hidden: Tensor) -> Tensor | None:
    """The inputs of the columns before this pass's in `cache` (None at its start), and
    this pass's recorded. Outside compiled code: traced, the bookkeeping would be guarded on,
    and a compiled layer would compile again for every pass (or decoded token)."""
    if not hasattr(cache, "token_shift_inputs"):
        cache.token_shift_inputs = {}
    columns = cache.token_shift_inputs.setdefault(shift.index, ColumnInputs())
    past = cache.get_seq_length(shift.index)  # the layer has not added this pass's yet
    before = columns.before(past, shift.weight.shape[0] - 1, hidden) if past else None
    columns.record(past, hidden)
    return before


def _shift_inputs(layer: nn.Module, args: tuple, kwargs: dict[str, Any]
                  ) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: the layer's hidden states, shifted (see the module docstring)."""
    given = "hidden_states" in kwargs
    hidden = kwargs["hidden_states"] if given else args[0]
    positions = kwargs.get("position_ids")
    if positions is None:
        raise ModelError(f"model.token_shift: {type(layer).__name__} is not given position "
                         "ids, which the shift needs to find where each sequence starts",
                         fix="set model.token_shift=0 for this model")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None and len(args) > 1 and isinstance(args[1], Cache):  # GPT-2: positional
        cache = args[1]
    shift: TokenShift = layer.token_shift
    before = None if cache is None else _columns_before(cache, shift, hidden)
    mixed = shift(hidden, positions, before)
    if given:
        return args, {**kwargs, "hidden_states": mixed}
    return (mixed, *args[1:]), kwargs


def add_token_shift(model: PreTrainedModel, width: int) -> None:
    """Give every decoder layer of `model` a zero-initialised `TokenShift` of `width`
    positions, in place, and record the width in `model.config`."""
    if width < 2:
        raise ModelError(f"model.token_shift={width}: a shift mixes at least 2 positions",
                         fix="set model.token_shift to 0 (off) or a width >= 2 (e.g. 4)")
    have = shift_width(model.config)
    layers = decoder_layers(model)
    if hasattr(layers[0], "token_shift"):
        if have != width:
            raise ModelError(f"model.token_shift={width}, but the model already has a "
                             f"token shift of width {have}",
                             fix=f"set model.token_shift={have} (or 0: keep the model's own)")
        return
    hidden = model.config.hidden_size
    parameter = next(model.parameters())
    for index, layer in enumerate(layers):
        layer.token_shift = TokenShift(hidden, width, index).to(parameter.device)
        layer.register_forward_pre_hook(_shift_inputs, with_kwargs=True)
    setattr(model.config, CONFIG_KEY, width)


def load_token_shift(model: PreTrainedModel, directory: Path) -> None:
    """After `from_pretrained(directory)`: rebuild the token shift that the saved config names
    (transformers drops weights its own class does not have) and read its weights back."""
    width = shift_width(model.config)
    if not width:
        return
    add_token_shift(model, width)
    wanted = {name: p for name, p in model.named_parameters() if ".token_shift." in name}
    found: set[str] = set()
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in set(weights.keys()) & wanted.keys():
                with torch.no_grad():
                    wanted[name].copy_(weights.get_tensor(name))
                found.add(name)
    if found != wanted.keys():
        raise ModelError(f"{directory} names a token shift of width {width} in config.json, "
                         f"but its weights lack {sorted(wanted.keys() - found)[0]}",
                         fix="its files are damaged or incomplete: restore or re-create them")


class _ShiftOnlyReport(logging.Filter):
    """Drops transformers' load report when the only keys it lists are the token shift's
    (UNEXPECTED to the model class, read back by `load_token_shift`): any other key keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines()
                if "|" in line and not line.startswith("Key") and set(line) - set("-+| ")]
        return not rows or not all("token_shift" in r and "UNEXPECTED" in r for r in rows)


@contextmanager
def quiet_shift_report() -> Iterator[None]:
    """Around `from_pretrained`: no warning for the token shift's weights alone."""
    report = logging.getLogger("transformers.modeling_utils")
    only_shift = _ShiftOnlyReport()
    report.addFilter(only_shift)
    try:
        yield
    finally:
        report.removeFilter(only_shift)
