"""Batched KV-cached greedy decoding against independent per-example recomputation."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from presets import PRESETS, backbone_for

from latentlab.backbones import ModelConfig, build_backbone, train_tokenizer
from latentlab.engine.generation import greedy_decode, left_pad, padded_attention, prefill

TEXTS = ["Numbers: 3 5 7. Target: 22.\n3*5=15\n15+7=22\n### 3*5+7"] * 20 + [
    "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zorpus?\n"]


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_batched_decoding_equals_uncached_recomputation(preset: str) -> None:
    tokenizer = train_tokenizer(TEXTS, 300)
    model = backbone_for(preset, tokenizer, seed=1).eval()
    prompts = ["Numbers: 3 5 7. Target: 22.\n", "Tom is a wumpus.\n",
               "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zorpus?\n"]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    n_new = 12
    with torch.no_grad():
        state = prefill(model, mask, input_ids=ids)
        # eos_id=-1: never stop early, so every row decodes n_new tokens
        generated = greedy_decode(model, state, n_new, eos_id=-1, pad_id=tokenizer.pad_token_id)
    assert generated.shape == (3, n_new)
    for row, prompt in enumerate(prompt_ids):
        # Reference: this example alone, no padding, no cache, the whole sequence each step.
        seq = list(prompt)
        for step in range(n_new):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            token = int(logits.argmax())
            assert token == int(generated[row, step]), (preset, row, step)
            seq.append(token)


def test_decoding_stops_rows_at_eos_and_pads_after() -> None:
    tokenizer = train_tokenizer(TEXTS, 300)
    model = build_backbone(ModelConfig(name="gpt2-tiny"), tokenizer, seed=0).eval()
    ids, mask = left_pad([[5, 6, 7], [8]], tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        free = greedy_decode(model, prefill(model, mask, input_ids=ids), 6, -1, pad)
        eos = int(free[0, 0])  # pretend row 0's first token is EOS
        stopped = greedy_decode(model, prefill(model, mask, input_ids=ids), 6, eos, pad)
    expected = []
    for row in free.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)
        expected.append(row[:end] + [pad] * (len(row) - end))
    width = stopped.shape[1]  # decoding ends early once every row has ended
    assert stopped.tolist() == [r[:width] for r in expected]
    assert all(pad == t for r in expected for t in r[width:])


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_prefill_has_no_empty_attention_rows_and_matches_unpadded_passes(
        preset: str) -> None:
    tokenizer = train_tokenizer(TEXTS, 300)
    model = backbone_for(preset, tokenizer, seed=1).eval()  # no dropout
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p in ("Tom is a wumpus.\n", TEXTS[-1], "Numbers: 3 5 7.")]
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    allowed = padded_attention(model, mask, ids.shape[1])[:, 0]
    # Every query may attend to something (a pad to itself only); real queries see exactly
    # the real keys up to them.
    assert allowed.any(-1).all()
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    real = mask.bool()
    assert torch.equal(allowed[real], (causal & real[:, None, :])[real])
    assert torch.equal(allowed[~real], torch.eye(ids.shape[1], dtype=torch.bool)
                       .expand_as(allowed)[~real])
    assert padded_attention(model, mask, 1) is mask  # nothing padded among the new column
    # Against independent computations: each prompt alone, no padding, float32.
    state = prefill(model, mask, input_ids=ids)
    state.hidden[real].sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for row, prompt in enumerate(prompt_ids):
        hidden = model.base_model(input_ids=torch.tensor([prompt])).last_hidden_state[0]
        torch.testing.assert_close(state.hidden[row, real[row]], hidden, atol=1e-5, rtol=1e-5)
        hidden.sum().backward()
    for padded, separate in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(padded, separate, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_decoding_uses_the_cache_api_of_the_installed_transformers(
        preset: str, caplog: pytest.LogCaptureFixture) -> None:
    # transformers 5.2x renamed `past_key_values` (keyword and output) to `cache`, with a
    # FutureWarning per call and a logged deprecation until their removal: neither here.
    tok = train_tokenizer(["a b c d e f g h"] * 10, 270)
    model = backbone_for(preset, tok, seed=0).eval()
    ids = torch.tensor([[5, 6, 7]])
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers'
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        state = prefill(model, torch.ones_like(ids), input_ids=ids)
        greedy_decode(model, state, 3, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
