"""CoT / No-CoT: what is trained, and the padded batch against separate passes."""

from __future__ import annotations

import pytest
import torch
from presets import PRESETS, backbone_for

from latentlab.backbones import train_tokenizer
from latentlab.methods.base import IGNORE, LABEL_BUCKET, extract_answer, label_index, lm_loss
from latentlab.methods.cot import CoT, CoTConfig, NoCoT, NoCoTConfig
from latentlab.tasks import CountdownConfig, CountdownTask
from latentlab.tasks.base import Example

EXAMPLES = [
    Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7"),
    Example("Numbers: 9 2 4 8. Target: 10.", ("9-8=1", "4*2=8", "8+1=9"), "4*2+9-8"),
    Example("Numbers: 1 2. Target: 3.", ("1+2=3",), "1+2"),
]


def make(method_cls, config, preset: str = "gpt2-tiny"):
    texts = [e.question + "\n" + "\n".join(e.steps) + "\n### " + e.answer for e in EXAMPLES]
    tok = train_tokenizer(texts * 10, 300)
    return method_cls(config, backbone_for(preset, tok, seed=0), tok)


def test_cot_labels_cover_steps_and_answer_nocot_only_the_answer() -> None:
    cot, nocot = make(CoT, CoTConfig()), make(NoCoT, NoCoTConfig())
    ex = EXAMPLES[0]
    for method, target in ((cot, "3*5=15\n15+7=22\n### 3*5+7"), (nocot, "### 3*5+7")):
        f = method.encode(ex)
        trained = [t for t, lab in zip(f["input_ids"], f["labels"], strict=True) if lab != IGNORE]
        assert trained[-1] == method.tokenizer.eos_token_id
        assert method.tokenizer.decode(trained[:-1]) == target
        prompt = method.prompt_ids(ex)
        assert f["input_ids"][: len(prompt)] == prompt
        assert all(lab == IGNORE for lab in f["labels"][: len(prompt)])


def test_question_loss_labels_every_token() -> None:
    for method in (make(CoT, CoTConfig(question_loss=True)),
                   make(NoCoT, NoCoTConfig(question_loss=True))):
        f = method.encode(EXAMPLES[1])
        assert f["labels"] == f["input_ids"]


@pytest.mark.parametrize("question_weight", [0.0, 0.3])
def test_per_part_losses_add_up_to_the_total_on_a_hand_made_batch(
        question_weight: float) -> None:
    cot = make(CoT, CoTConfig(question_loss=question_weight)).eval()
    features = [cot.encode(e) for e in EXAMPLES]
    with torch.no_grad():
        out = cot(cot.collate(features))
        # Independent reference: each example alone, full logits, the parts cut by hand from
        # the token counts of question, steps and answer.
        nll: dict[str, list[float]] = {"question": [], "steps": [], "answer": []}
        hits: dict[str, list[bool]] = {"question": [], "steps": [], "answer": []}
        for e, f in zip(EXAMPLES, features, strict=True):
            ids = torch.tensor([f["input_ids"]])
            logits = cot.backbone(input_ids=ids).logits[0, :-1]
            n_q = len(cot.prompt_ids(e))
            n_s = len(cot.tokens("".join(step + "\n" for step in e.steps)))
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            right = logits.argmax(-1) == ids[0, 1:]
            # Position t predicts token t+1: the question's tokens 1.., then steps, answer.
            for part, span in (("question", range(0, n_q - 1)),
                               ("steps", range(n_q - 1, n_q - 1 + n_s)),
                               ("answer", range(n_q - 1 + n_s, ids.shape[1] - 1))):
                nll[part] += losses[list(span)].tolist()
                hits[part] += right[list(span)].tolist()
    parts = ("question", "steps", "answer") if question_weight else ("steps", "answer")
    assert set(out.metrics) == {f"{kind}_{p}" for p in parts for kind in ("loss", "acc")}
    for part in parts:
        assert out.metrics[f"loss_{part}"].item() == pytest.approx(
            sum(nll[part]) / len(nll[part]), rel=1e-5)
        assert out.metrics[f"acc_{part}"].item() == pytest.approx(
            sum(hits[part]) / len(hits[part]))
    # The total: the token-weighted mean over steps and answer, plus the weighted question mean.
    n_s, n_a = len(nll["steps"]), len(nll["answer"])
    total = (n_s * out.metrics["loss_steps"] + n_a * out.metrics["loss_answer"]) / (n_s + n_a)
    if question_weight:
        total = total + question_weight * out.metrics["loss_question"]
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-6)


def test_label_index_by_hand_and_lm_loss_without_it() -> None:
    x = IGNORE
    labels = torch.tensor([[x, x, 5, 6],
                           [x, 7, x, x]])
    index = label_index(labels)
    # Flat position i predicts labels.flatten()[i + 1]: (0,1)->5, (0,2)->6, (1,0)->7, then
    # fillers at the first position with no target, (0,0), up to a multiple of LABEL_BUCKET.
    assert index[:3].tolist() == [1, 2, 4]
    assert len(index) == LABEL_BUCKET and set(index[3:].tolist()) == {0}
    assert labels.flatten()[index[3:] + 1].eq(IGNORE).all()
    # lm_loss with the collate's index equals one that finds the labels itself, and both equal
    # the cross-entropy of the three labelled positions only.
    cot = make(CoT, CoTConfig())
    hidden = torch.randn(2, 4, cot.backbone.config.n_embd)
    head = cot.backbone.get_output_embeddings()
    expected = torch.nn.functional.cross_entropy(
        head(torch.stack([hidden[0, 1], hidden[0, 2], hidden[1, 0]])), torch.tensor([5, 6, 7]))
    assert lm_loss(cot.backbone, hidden, labels, index).item() == pytest.approx(expected.item())
    assert lm_loss(cot.backbone, hidden, labels).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("preset", PRESETS)
def test_padded_batch_loss_equals_separate_unpadded_passes(preset: str) -> None:
    cot = make(CoT, CoTConfig(), preset).eval()
    features = [cot.encode(e) for e in EXAMPLES]
    with torch.no_grad():
        batch_loss = cot(cot.collate(features)).loss
        # Independent reference: each example alone through the HF model, token-weighted.
        total, count = 0.0, 0
        for f in features:
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
            logits = cot.backbone(input_ids=ids).logits[0, :-1]
            keep = labels[0, 1:] != IGNORE
            total += torch.nn.functional.cross_entropy(
                logits[keep], labels[0, 1:][keep], reduction="sum").item()
            count += int(keep.sum())
    assert batch_loss.item() == pytest.approx(total / count, rel=1e-5)


def test_generate_returns_text_after_the_prompt_and_answers_are_extracted() -> None:
    cot = make(CoT, CoTConfig()).eval()
    completions = cot.generate(EXAMPLES, max_new_tokens=5)
    assert len(completions) == 3 and all(isinstance(c, str) for c in completions)
    assert extract_answer("1+2=3\n### 1+2\nextra") == "1+2"
    assert extract_answer("no marker") == ""
    assert extract_answer("### a\n### b") == "b"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("question_loss", [0.0, 0.5])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_one(
        preset: str, question_loss: float) -> None:
    # Examples of different lengths: packed into fewer rows, each example with its own
    # positions and attention, they give the padded batch's loss, per-part numbers and
    # gradients (an example that attended to its row neighbour would change them).
    long, short = (CountdownTask(CountdownConfig(operands=n, max_operand=30)) for n in (5, 3))
    examples = [*long.generate("train", 2, 0), *short.generate("train", 4, 0), *EXAMPLES]
    padded_method = make(CoT, CoTConfig(question_loss=question_loss), preset)
    packed_method = make(CoT, CoTConfig(question_loss=question_loss, packing=True), preset)
    packed_method.load_state_dict(padded_method.state_dict())
    padded_method.eval(), packed_method.eval()  # no dropout: the same function in both layouts
    features = [padded_method.encode(e) for e in examples]
    padded, packed = padded_method.collate(features), packed_method.collate(features)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["num_tokens"] == padded["num_tokens"]
    results = []
    for method, batch in ((padded_method, padded), (packed_method, packed)):
        out = method(batch)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    assert a.metrics.keys() == b.metrics.keys()
    for name in a.metrics:
        torch.testing.assert_close(b.metrics[name], a.metrics[name], rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_tokens_equal_the_tokenizers_own_call(shared_data) -> None:
    """`Method.tokens` calls a fast tokenizer's Rust core directly: the same ids as the
    tokenizer's own call, special tokens in the text included, for a trained tokenizer and
    GPT-2's BPE."""
    from latentlab.backbones import build_tokenizer
    from latentlab.model_config import ModelConfig

    cot = make(CoT, CoTConfig())
    gpt2 = build_tokenizer(ModelConfig(name="gpt2-tiny", tokenizer="gpt2-bpe"), [])
    texts = [e.question + "\n" + "\n".join(e.steps) for e in EXAMPLES]
    texts += ["", " leading space", "Every wumpus is a zumpus.\n### 3*5+7",
              f"a{cot.tokenizer.eos_token}b {cot.tokenizer.pad_token}", "émigré 日本 \t tabs"]
    for tokenizer in (cot.tokenizer, gpt2):
        method = make(CoT, CoTConfig())
        method.tokenizer = tokenizer
        for text in [*texts, f"x{tokenizer.eos_token}y"]:
            assert method.tokens(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
