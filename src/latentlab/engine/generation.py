"""Batched, KV-cached greedy decoding with left padding, for any causal LM.

Methods with their own inference loop (latents, thoughts, a coprocessor) build on the same two
steps: `extend` runs new tokens or embeddings through the model on top of a cache, and
`greedy_decode` continues token by token. Position ids always come from the attention mask, so
left padding and inserted latents keep every row's positions right.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import DynamicCache

from latentlab.errors import ConfigError

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class DecodeState:
    """A batch mid-generation: the cache, the mask over everything cached, next-token logits."""

    cache: Cache
    attention_mask: Tensor  # [B, T] 1 for real positions, 0 for left padding
    logits: Tensor  # [B, V] logits of the next token
    hidden: Tensor  # [B, n, d] last-layer states of the positions just added


def with_cache(model: Any, cache: Cache | None) -> dict[str, Any]:
    """The keyword that hands `model` a key/value cache: `cache` where its forward has it
    (transformers 5.2x renamed `past_key_values`, which warns on every call until its removal),
    `past_key_values` in the versions before."""
    return {_cache_keyword(type(model)): cache}


def output_cache(outputs: Any) -> Cache:
    """The key/value cache a forward returned (`cache` in transformers 5.2x, where reading
    `past_key_values` warns; `past_key_values` before)."""
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]


@functools.cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def left_pad(sequences: list[list[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token lists to a left-padded id matrix and its attention mask."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq):] = torch.tensor(seq)
            mask[row, longest - len(seq):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: Tensor, n_new: int) -> Tensor:
    """Positions of the last `n_new` columns: the count of real tokens before each one."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -n_new:]


def attention_bias(model: PreTrainedModel, allowed: Tensor) -> Tensor:
    """A boolean "may attend" mask [B, 1, queries, keys] in the form `model`'s attention
    implementation takes as a custom 4-D mask."""
    implementation = model.config._attn_implementation
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ConfigError(f"this pass needs a custom attention mask, which latentlab builds for "
                      f"sdpa and eager attention, not {implementation}",
                      fix="set model.attn_implementation=sdpa")


def padded_attention(model: PreTrainedModel, mask: Tensor, n_new: int) -> Tensor:
    """The attention mask of the last `n_new` columns of `mask` [B, T] (1: a real token) over
    all T columns, causal.

    Without padding among the new columns this is `mask` itself. Otherwise a 4-D mask in which
    each padding query also sees itself: a query row that may attend to nothing (a left pad)
    gives NaN gradients in fused SDPA backward kernels (bf16 on an H100, H2 and Coconut runs
    stopped with a finite loss and a NaN gradient norm; docs/results.md). The output of a pad
    is never read, so no real position changes.
    """
    if bool(mask[:, -n_new:].all()):
        return mask
    return pad_safe_attention(model, mask, n_new)


def pad_safe_attention(model: PreTrainedModel, mask: Tensor, n_new: int) -> Tensor:
    """`padded_attention`'s 4-D mask, built without looking at the data: for callers that know
    there is padding among the new columns (no device sync, nothing for torch.compile to break
    its graph on)."""
    new = mask[:, -n_new:]
    keys = torch.arange(mask.shape[1], device=mask.device)
    queries = keys[-n_new:, None]
    allowed = (keys <= queries) & mask[:, None, :].bool()  # [B, n_new, T]
    allowed |= (keys == queries) & ~new[:, :, None].bool()
    return attention_bias(model, allowed[:, None])


def extend(model: PreTrainedModel, state: DecodeState | None, new_mask: Tensor,
           input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> DecodeState:
    """Run new positions (ids or embeddings) through `model` on top of `state`'s cache."""
    mask = new_mask if state is None else torch.cat([state.attention_mask, new_mask], dim=1)
    cache = DynamicCache(config=model.config) if state is None else state.cache
    inputs: dict[str, Any] = ({"input_ids": input_ids} if inputs_embeds is None
                              else {"inputs_embeds": inputs_embeds})
    out = model.base_model(**inputs,
                           attention_mask=padded_attention(model, mask, new_mask.shape[1]),
                           position_ids=position_ids(mask, new_mask.shape[1]),
                           **with_cache(model.base_model, cache), use_cache=True)
    hidden = out.last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, -1])
    return DecodeState(cache=output_cache(out), attention_mask=mask, logits=logits,
                       hidden=hidden)


def prefill(model: PreTrainedModel, attention_mask: Tensor, input_ids: Tensor | None = None,
            inputs_embeds: Tensor | None = None) -> DecodeState:
    """Encode left-padded prompts into a fresh cache."""
    return extend(model, None, attention_mask, input_ids=input_ids, inputs_embeds=inputs_embeds)


def greedy_decode(model: PreTrainedModel, state: DecodeState, max_new_tokens: int,
                  eos_id: int, pad_id: int) -> Tensor:
    """Greedy tokens after `state`, one cached step each; rows stop at EOS (then padded).

    Returns a [B, n] tensor, n <= max_new_tokens (decoding ends once every row has ended).
    """
    batch = state.logits.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=state.logits.device)
    out: list[Tensor] = []
    for step in range(max_new_tokens):
        token = state.logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out.append(token)
        done |= token == eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        state = extend(model, state, torch.ones_like(token)[:, None], input_ids=token[:, None])
    return torch.stack(out, dim=1) if out else torch.zeros((batch, 0), dtype=torch.long)


def decode_completions(tokenizer: PreTrainedTokenizerBase, tokens: Tensor) -> list[str]:
    """Text of each row up to (not including) its first EOS."""
    texts = []
    for row in tokens.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=False))
    return texts
