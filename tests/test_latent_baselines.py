"""Pause tokens, the soft-embedding baseline and the orthogonality penalty."""

from __future__ import annotations

import math

import pytest
import torch
from presets import PRESETS, backbone_for

from latentlab.backbones import add_special_tokens, train_tokenizer
from latentlab.latents import orthogonality_penalty, padded_rows
from latentlab.methods.base import IGNORE
from latentlab.methods.pause import Pause, PauseConfig, SoftEmbedding, SoftEmbeddingConfig
from latentlab.tasks.base import Example

EXAMPLES = [
    Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7"),
    Example("Numbers: 9 2 4 8. Target: 10.", ("9-8=1", "4*2=8", "8+1=9"), "4*2+9-8"),
]
TEXTS = [e.question + "\n" + "\n".join(e.steps) + "\n### " + e.answer for e in EXAMPLES] * 20


def make(cls, config, preset: str = "gpt2-tiny"):
    tok = train_tokenizer(TEXTS, 300)
    backbone = backbone_for(preset, tok, seed=0)
    add_special_tokens(tok, backbone, cls.special_tokens(config))
    torch.manual_seed(0)
    return cls(config, backbone, tok).eval()


def test_orthogonality_penalty_matches_hand_computed_cases() -> None:
    orthogonal = torch.tensor([[[2.0, 0.0, 0.0], [0.0, -3.0, 0.0], [0.0, 0.0, 0.5]]])
    assert orthogonality_penalty(orthogonal).item() == 0.0
    # cos(45°)^2 = 1/2 for the one pair, in both orders
    assert orthogonality_penalty(torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])).item() == \
        pytest.approx(0.5)
    # pairs (0,1): cos 1; (0,2), (1,2): cos 0 -> mean over the 6 ordered pairs = 2/6
    three = torch.tensor([[[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])
    assert orthogonality_penalty(three).item() == pytest.approx(1 / 3)
    # batch mean, and a single latent has no pair
    both = torch.cat([torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]),
                      torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])])
    assert orthogonality_penalty(both).item() == pytest.approx(0.25)
    assert orthogonality_penalty(torch.ones(2, 1, 4)).item() == 0.0
    grad = torch.tensor([[[1.0, 0.0], [math.cos(0.3), math.sin(0.3)]]], requires_grad=True)
    orthogonality_penalty(grad).backward()
    assert grad.grad is not None and grad.grad.abs().sum() > 0


def test_masked_penalty_is_the_mean_over_examples_of_their_own_penalties() -> None:
    # Examples with 3, 1 and 2 latents, padded to 3 with junk the mask must hide.
    torch.manual_seed(0)
    own = [torch.randn(3, 5), torch.randn(1, 5), torch.randn(2, 5)]
    padded = torch.randn(3, 3, 5)
    valid = torch.zeros(3, 3, dtype=torch.bool)
    for row, z in enumerate(own):
        padded[row, :len(z)], valid[row, :len(z)] = z, True
    expected = (orthogonality_penalty(own[0][None]) + orthogonality_penalty(own[2][None])) / 2
    torch.testing.assert_close(orthogonality_penalty(padded, valid), expected)
    # All valid: the unmasked penalty; no example with a pair: 0.
    torch.testing.assert_close(orthogonality_penalty(padded, torch.ones(3, 3, dtype=torch.bool)),
                               orthogonality_penalty(padded))
    assert orthogonality_penalty(padded, valid & (torch.arange(3) < 1)).item() == 0.0


def test_padded_rows_regroups_row_major_vectors_by_row() -> None:
    where = torch.tensor([[False, True, True, False], [False, False, False, False],
                          [True, False, True, True]])
    values = torch.arange(5 * 2, dtype=torch.float).view(5, 2)  # the 5 True entries, in order
    out, valid = padded_rows(values, where)
    assert out.shape == (3, 3, 2) and valid.tolist() == [[True, True, False], [False] * 3,
                                                         [True] * 3]
    torch.testing.assert_close(out[0, :2], values[:2])
    torch.testing.assert_close(out[2], values[2:])
    assert not out[1].any() and not out[0, 2].any()


@pytest.mark.parametrize("cls,config", [(Pause, PauseConfig(latent_budget=3)),
                                        (SoftEmbedding, SoftEmbeddingConfig(latent_budget=3))])
def test_latent_slots_sit_between_question_and_answer_without_labels(cls, config) -> None:
    method = make(cls, config)
    features = method.encode(EXAMPLES[0])
    ids, labels = features["input_ids"], features["labels"]
    slot = method.slot_id
    start = ids.index(slot)
    assert ids[start:start + 3] == [slot] * 3 and ids.count(slot) == 3
    assert method.tokenizer.decode(ids[:start]) == EXAMPLES[0].question + "\n"
    assert all(label == IGNORE for label in labels[: start + 3])
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert method.tokenizer.decode(trained[:-1]) == "### 3*5+7"  # No-CoT target by default


def test_soft_vectors_replace_the_slots_in_order_and_learn() -> None:
    method = make(SoftEmbedding, SoftEmbeddingConfig(latent_budget=3))
    batch = method.collate([method.encode(e) for e in EXAMPLES])
    embeds = method.embed(batch["input_ids"])
    table = method.backbone.get_input_embeddings()
    for row in range(2):
        slots = (batch["input_ids"][row] == method.slot_id).nonzero().flatten().tolist()
        assert len(slots) == 3
        for k, position in enumerate(slots):
            assert torch.equal(embeds[row, position], method.soft_tokens[k])
        others = [p for p in range(embeds.shape[1]) if p not in slots]
        assert torch.equal(embeds[row, others], table(batch["input_ids"][row, others]))
    method.train()
    method(batch).loss.backward()
    assert method.soft_tokens.grad is not None and method.soft_tokens.grad.abs().sum() > 0
    assert method.extra_state_dict().keys() == {"soft_tokens"}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("cls", [Pause, SoftEmbedding])
def test_generation_and_latents_equal_uncached_per_example_computation(cls, preset) -> None:
    config = cls.config_class(latent_budget=2)
    method = make(cls, config, preset)
    completions = method.generate(EXAMPLES, 6)
    latents = method.latents(EXAMPLES)
    for row, (example, completion) in enumerate(zip(EXAMPLES, completions, strict=True)):
        prompt = method.prompt_ids(example)
        generated: list[int] = []
        with torch.no_grad():
            out = method.backbone(inputs_embeds=method.embed(torch.tensor([prompt])),
                                  output_hidden_states=True)
            torch.testing.assert_close(latents[row], out.hidden_states[-1][0, -2:],
                                       rtol=1e-4, atol=1e-5)
            for _ in range(6):
                ids = torch.tensor([prompt + generated])
                token = int(method.backbone(inputs_embeds=method.embed(ids)).logits[0, -1].argmax())
                if token == method.tokenizer.eos_token_id:
                    break
                generated.append(token)
        assert completion == method.tokenizer.decode(generated)


def test_orthogonality_joins_the_loss_of_latent_methods() -> None:
    method = make(SoftEmbedding, SoftEmbeddingConfig(latent_budget=4, orthogonality=3.0))
    out = method(method.collate([method.encode(e) for e in EXAMPLES]))
    assert out.metrics["orthogonality"] > 0
    assert out.loss.item() == pytest.approx(
        (out.metrics["lm_loss"] + 3.0 * out.metrics["orthogonality"]).item(), rel=1e-6)
