"""Coconut: the cached multi-pass forward, generation and gradients against independent
full recomputation; the curriculum against the paper's schedules; an engine run end to end.

References feed each thought by re-running the whole unpadded prefix of one example through
the Hugging Face model, with no cache and no batching: nothing of `Coconut.hidden_states`,
`collate` or `engine.generation` is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from presets import PRESETS, backbone_for
from test_training import tiny
from torch import Tensor
from transformers import PreTrainedModel

from latentlab.backbones import (
    add_special_tokens,
    compile_transformers,
    train_tokenizer,
)
from latentlab.config import EvalConfig, load_config
from latentlab.errors import ConfigError
from latentlab.latents import orthogonality_penalty
from latentlab.methods import METHODS
from latentlab.methods.base import IGNORE, answer_text, steps_text
from latentlab.methods.coconut import BOT, EOT, THOUGHT, Coconut, CoconutConfig
from latentlab.recipes import build_method, evaluate, load_run, train
from latentlab.tasks import build_task
from latentlab.tasks.base import Example

# Different question lengths and step counts (3, 2, 1, 0): at stage 2 with c=2 the rows get
# 4, 4, 2 and 0 thoughts.
EXAMPLES = [
    Example("Numbers: 9 2 4 8. Target: 10.", ("9-8=1", "4*2=8", "8+1=9"), "4*2+9-8"),
    Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7"),
    Example("Numbers: 1 2. Target: 3.", ("1+2=3",), "1+2"),
    Example("Tom is a wumpus. Is Tom a wumpus?", (), "yes"),
]
LONG = Example("Is Tom a yumpus?", tuple(f"step {i}" for i in range(8)), "yes")


def make(preset: str = "gpt2-tiny", **options: Any) -> Coconut:
    texts = [e.question + "\n" + steps_text(e.steps) + answer_text(e) for e in [*EXAMPLES, LONG]]
    tokenizer = train_tokenizer(texts * 10, 300)
    backbone = backbone_for(preset, tokenizer, seed=0)
    config = CoconutConfig(**options)
    add_special_tokens(tokenizer, backbone, Coconut.special_tokens(config))
    return Coconut(config, backbone, tokenizer)


def last_hidden(model: PreTrainedModel, embeds: Tensor) -> Tensor:
    return model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]


def reference_embeds(model: PreTrainedModel, ids: list[int], bot: int, n: int,
                     detach: bool = False) -> Tensor:
    """One example's input embeddings, thought j = last state of a from-scratch pass over
    everything before it."""
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    for j in range(1, n + 1):
        thought = last_hidden(model, embeds[:, : bot + j])[:, -1:]
        thought = thought.detach() if detach else thought
        embeds = torch.cat([embeds[:, : bot + j], thought, embeds[:, bot + j + 1:]], dim=1)
    return embeds


def reference_loss(method: Coconut, features: list[dict[str, Any]],
                   detach: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Token-weighted mean cross-entropy and each example's logits at labelled positions."""
    total, count, logits_per_row = torch.zeros(()), 0, []
    for f in features:
        embeds = reference_embeds(method.backbone, f["input_ids"], f["bot"], f["thoughts"],
                                  detach)
        logits = method.backbone(inputs_embeds=embeds).logits[0, :-1]
        targets = torch.tensor(f["labels"][1:])
        keep = targets != IGNORE
        total = total + torch.nn.functional.cross_entropy(logits[keep], targets[keep],
                                                          reduction="sum")
        count += int(keep.sum())
        logits_per_row.append(logits[keep])
    return total / count, logits_per_row


def gradients(method: Coconut, loss: Tensor) -> dict[str, Tensor]:
    method.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}


# One question, so every row's <bot> is in the same column: no left padding, only right
# padding after rows with fewer steps (a different mask path in `hidden_states`).
SAME_QUESTION = [Example(EXAMPLES[0].question, EXAMPLES[0].steps[:k], "4*2+9-8")
                 for k in (3, 1, 2, 0)]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("examples", "counts", "left_padded", "defer"),
                         [(EXAMPLES, [4, 4, 2, 0], True, "always"),
                          (SAME_QUESTION, [4, 2, 4, 0], False, "never")])
def test_cached_multipass_forward_equals_full_recomputation(
        preset: str, examples: list[Example], counts: list[int], left_padded: bool,
        defer: str) -> None:
    """`defer`: shared gradients (parameters, the prefix's keys and values) computed once for
    all passes, or once per pass."""
    method = make(preset, thoughts_per_step=2, max_latent_stage=3,
                  defer_shared_grads=defer).eval()  # eval: no dropout
    method.set_stage(2)
    features = [method.encode(e) for e in examples]
    assert [f["thoughts"] for f in features] == counts
    batch = method.collate(features)
    assert batch["left_padded"] is left_padded
    assert not batch["attention_mask"].all()  # padded either way

    hidden = method.hidden_states(batch)
    loss = method(batch).loss
    head = method.backbone.get_output_embeddings()
    ref_loss, ref_logits = reference_loss(method, features)
    for row, f in enumerate(features):
        shift = batch["bot"] - f["bot"]  # columns of left padding before this row
        labels = batch["labels"][row, 1:]
        assert torch.equal(labels[shift: shift + len(f["labels"]) - 1],
                           torch.tensor(f["labels"][1:]))
        logits = head(hidden[row, :-1][labels != IGNORE])
        torch.testing.assert_close(logits, ref_logits[row], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)

    # Gradients too: they reach pass 0 through the cache and through the chain of thoughts.
    grads, ref_grads = gradients(method, loss), gradients(method, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_orthogonality_penalises_each_examples_own_thoughts() -> None:
    # Stage 2, c = 2: the rows hold 4, 4, 2 and 0 thoughts; each row's penalty comes from its
    # own thoughts as a from-scratch pass makes them, averaged over the rows with a pair.
    method = make(thoughts_per_step=2, max_latent_stage=3, orthogonality=2.5).eval()
    method.set_stage(2)
    features = [method.encode(e) for e in EXAMPLES]
    expected = []
    with torch.no_grad():
        for f in features:
            if f["thoughts"] >= 2:
                embeds = reference_embeds(method.backbone, f["input_ids"], f["bot"],
                                          f["thoughts"])
                thoughts = embeds[:, f["bot"] + 1:f["bot"] + 1 + f["thoughts"]]
                expected.append(orthogonality_penalty(thoughts))
        batch = method.collate(features)
        out = method(batch)
        method.config.orthogonality = 0.0
        base = method(batch)
    assert len(expected) == 3
    penalty = torch.stack(expected).mean()
    torch.testing.assert_close(out.metrics["orthogonality"], penalty, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, base.loss + 2.5 * penalty, rtol=1e-4, atol=1e-6)


def test_padding_to_a_multiple_changes_shapes_not_the_loss() -> None:
    method = make(thoughts_per_step=2, max_latent_stage=3).eval()
    method.set_stage(2)
    features = [method.encode(e) for e in EXAMPLES]
    batch = method.collate(features)
    method.config.pad_to_multiple = 16
    padded = method.collate(features)
    assert padded["bot"] % 16 == 0 and padded["input_ids"].shape[1] % 16 == 0
    assert padded["bot"] > batch["bot"] and padded["left_padded"]
    with torch.no_grad():
        torch.testing.assert_close(method(padded).loss, method(batch).loss)
    method.set_stage(0)  # no thoughts: the right-padded batch of every method, rounded too
    assert method.collate([method.encode(e) for e in EXAMPLES])["input_ids"].shape[1] % 16 == 0


def test_gradient_flows_back_through_the_thought_chain() -> None:
    method = make(thoughts_per_step=2, max_latent_stage=3).eval()
    method.set_stage(2)
    features = [method.encode(e) for e in EXAMPLES]
    grads = gradients(method, method(method.collate(features)).loss)
    detached = gradients(method, reference_loss(method, features, detach=True)[0])
    key = "backbone.transformer.wte.weight"
    question = torch.tensor(sorted({t for f in features for t in f["input_ids"][:f["bot"]]}))
    # Question tokens reach the loss directly (attention) and through the thoughts: cutting
    # the chain must change their gradient, so the method's gradient includes the chain.
    difference = (grads[key][question] - detached[key][question]).norm()
    assert difference > 1e-3 * grads[key][question].norm()


def expected_ids(method: Coconut, example: Example, n_thoughts: int,
                 steps: tuple[str, ...]) -> tuple[list[int], int]:
    tok = method.tokenizer
    ids = tok(example.question + "\n", add_special_tokens=False)["input_ids"]
    ids += tok.convert_tokens_to_ids([BOT, *[THOUGHT] * n_thoughts, EOT])
    unlabelled = len(ids)
    ids += tok(steps_text(steps) + answer_text(example), add_special_tokens=False)["input_ids"]
    return [*ids, tok.eos_token_id], unlabelled


@pytest.mark.parametrize(("options", "stages", "epochs", "c"), [
    ({}, 7, 5, 1),  # ProsQA: the defaults
    ({"thoughts_per_step": 2, "max_latent_stage": 3, "epochs_per_stage": 3}, 4, 3, 2),  # GSM8K
])
def test_curriculum_follows_the_paper(options: dict[str, Any], stages: int, epochs: int,
                                      c: int) -> None:
    method = make(**options)
    schedule = method.stages(epochs=1)
    assert [(s.epochs, s.reset_optimizer) for s in schedule] == [(epochs, True)] * stages
    last = stages - 1
    # train.epochs beyond the curriculum goes to the last stage (Coconut's ProsQA run: 50).
    assert [s.epochs for s in method.stages(50)] == [epochs] * last + [50 - last * epochs]
    for k in range(stages):
        method.set_stage(k)
        f = method.encode(LONG)  # 8 steps: more than any stage replaces
        kept = LONG.steps[k:] if k < last else ()  # the last stage drops every step
        ids, unlabelled = expected_ids(method, LONG, k * c, kept)
        assert f["input_ids"] == ids and f["thoughts"] == k * c
        assert f["labels"] == [IGNORE] * unlabelled + ids[unlabelled:]
    assert not any(s.reset_optimizer for s in make(**options, reset_optimizer=False).stages(1))


def test_curriculum_can_start_after_the_cot_stage() -> None:
    method = make(first_stage=1)  # model.init_from is a CoT run: stage 0 is already trained
    schedule = method.stages(50)
    assert [s.name for s in schedule] == [f"latent-{k}" for k in range(1, 7)]
    assert [s.epochs for s in schedule] == [5] * 5 + [50 - 5 * 5]
    for index, k in enumerate(range(1, 7)):
        method.set_stage(index)
        assert method.encode(LONG)["thoughts"] == k
    with pytest.raises(ValueError, match="outside"):
        method.set_stage(6)
    with pytest.raises(ValueError, match="first_stage 7 is after max_latent_stage 6"):
        CoconutConfig(first_stage=7)


def test_ablation_modes() -> None:
    single = make(mode="no_curriculum", max_latent_stage=3)
    assert [(s.epochs, s.reset_optimizer) for s in single.stages(7)] == [(7, False)]
    single.set_stage(0)
    assert single.encode(LONG)["input_ids"] == expected_ids(single, LONG, 3, ())[0]

    no_thought = make(mode="no_thought", max_latent_stage=3)
    no_thought.set_stage(2)
    f = no_thought.encode(LONG)
    assert f["input_ids"] == expected_ids(no_thought, LONG, 0, LONG.steps[2:])[0]
    assert f["thoughts"] == 0 and no_thought.eval_thoughts() == 0

    pause = make(mode="pause_as_thought", max_latent_stage=3)
    pause.set_stage(2)
    f = pause.encode(LONG)
    # <thought> tokens are ordinary inputs here: one plain pass, nothing fed back.
    assert f["input_ids"] == expected_ids(pause, LONG, 2, LONG.steps[2:])[0]
    assert f["thoughts"] == 0 and pause.collate([f])["max_thoughts"] == 0
    with pytest.raises(ValueError, match="no continuous thoughts"):
        pause.latents(EXAMPLES)


@pytest.mark.parametrize("uniform", [False, True])
def test_thought_counts_and_alignment_in_a_padded_batch(uniform: bool) -> None:
    method = make(thoughts_per_step=2, max_latent_stage=4, uniform_thoughts=uniform)
    method.set_stage(3)
    features = [method.encode(e) for e in EXAMPLES]
    # 3, 2, 1, 0 steps at stage 3: min(3, K) * c thoughts, or 3 * c for everyone if uniform.
    counts = [6, 6, 6, 6] if uniform else [6, 4, 2, 0]
    assert [f["thoughts"] for f in features] == counts
    batch = method.collate(features)
    bot, eot = method.tokenizer.convert_tokens_to_ids([BOT, EOT])
    assert (batch["input_ids"][:, batch["bot"]] == bot).all()
    assert batch["thoughts"].tolist() == counts and batch["max_thoughts"] == 6
    for row, n in enumerate(counts):
        assert batch["input_ids"][row, batch["bot"] + n + 1] == eot
        assert (batch["labels"][row, : batch["bot"] + n + 2] == IGNORE).all()
        # Left padding is masked out; every real token is attended.
        real = batch["attention_mask"][row].bool()
        assert real.sum() == len(features[row]["input_ids"])
        assert (batch["input_ids"][row, real] == torch.tensor(features[row]["input_ids"])).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_generation_equals_uncached_recomputation(preset: str) -> None:
    method = make(preset, max_latent_stage=3, thoughts_at_eval=4).eval()
    model, tok = method.backbone, method.tokenizer
    for stage, n in ((2, 2), (3, 4)):  # validation at stage 2: 2*c; the last stage: fixed 4
        method.set_stage(stage)
        completions = method.generate(EXAMPLES, max_new_tokens=8)
        recorded = method.latents(EXAMPLES)
        for example, completion, thoughts in zip(EXAMPLES, completions, recorded, strict=True):
            prompt = tok(example.question + "\n", add_special_tokens=False)["input_ids"]
            expected_thoughts = []
            with torch.no_grad():
                embeds = model.get_input_embeddings()(
                    torch.tensor([[*prompt, tok.convert_tokens_to_ids(BOT)]]))
                for _ in range(n):
                    z = last_hidden(model, embeds)[:, -1:]
                    expected_thoughts.append(z[0, 0])
                    embeds = torch.cat([embeds, z], dim=1)
                tokens: list[int] = []
                next_id = tok.convert_tokens_to_ids(EOT)
                for _ in range(8):
                    embeds = torch.cat(
                        [embeds, model.get_input_embeddings()(torch.tensor([[next_id]]))], dim=1)
                    next_id = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
                    if next_id == tok.eos_token_id:
                        break
                    tokens.append(next_id)
            assert completion == tok.decode(tokens), (preset, stage)
            torch.testing.assert_close(thoughts, torch.stack(expected_thoughts),
                                       rtol=1e-4, atol=1e-5)


def test_configs_reproduce_the_reference_runs() -> None:
    prosqa = load_config("configs/prosqa_coconut_reference.yaml")
    gsm8k = load_config("configs/gsm8k_coconut.yaml")
    countdown = load_config("configs/countdown_coconut.yaml")
    assert (prosqa.method.thoughts_per_step, prosqa.method.max_latent_stage,
            prosqa.method.epochs_per_stage, prosqa.train.epochs) == (1, 6, 5, 50)
    # The from-scratch recipe keeps the curriculum's shape: c = 1, stages 1..6 from a CoT Base.
    recipe = load_config("configs/prosqa_coconut.yaml")
    assert (recipe.method.thoughts_per_step, recipe.method.first_stage,
            recipe.method.max_latent_stage, recipe.method.uniform_thoughts) == (1, 1, 6, True)
    assert (gsm8k.method.thoughts_per_step, gsm8k.method.max_latent_stage,
            gsm8k.method.epochs_per_stage) == (2, 3, 3)
    assert gsm8k.model.init_from is not None
    assert gsm8k.method.new_token_init == "<<"  # one token of GPT-2's BPE, as the reference
    for config in (prosqa, recipe, gsm8k, countdown):
        assert config.method.name == "coconut" and METHODS["coconut"] is Coconut
        assert config.train.batch_size * config.train.grad_accum >= 32


@pytest.mark.parametrize("preset", ["gpt2-tiny", "qwen3-tiny"])  # tied and untied head
def test_new_tokens_start_from_the_configured_token(tmp_path: Path, preset: str) -> None:
    """method.new_token_init (the reference's `<<`): when a run builds its model, <bot>, <eot>
    and <thought> get that token's input and output rows; a run's saved tokenizer already has
    them, so nothing is copied again; a source that is not one token is a config error."""
    config = tiny(tmp_path, "method.name=coconut", f"model.name={preset}",
                  "method.new_token_init=+")
    task = build_task(config.task)
    texts = [e.question for e in task.load("train")]
    method = build_method(config, texts, tmp_path)
    tok, model = method.tokenizer, method.backbone
    source = tok.encode("+", add_special_tokens=False)
    new = tok.convert_tokens_to_ids([BOT, EOT, THOUGHT])
    assert len(source) == 1
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert torch.equal(weight[new], weight[source * 3])
    assert add_special_tokens(tok, model, Coconut.special_tokens(method.config)) == []

    random_rows = build_method(tiny(tmp_path / "random", "method.name=coconut",
                                    f"model.name={preset}"), texts, tmp_path / "random")
    weight = random_rows.backbone.get_input_embeddings().weight
    assert not torch.equal(weight[new[0]], weight[source[0]])

    with pytest.raises(ConfigError, match=r"new_token_init='Target: 10' is \d+ tokens"):
        method.config.new_token_init = "Target: 10"
        method.init_new_tokens([BOT])


def test_engine_runs_the_curriculum_and_the_best_model_keeps_its_stage(tmp_path: Path) -> None:
    # 3 operands: 2 steps; stages 0 (CoT), 1 (1 thought + 1 step), 2 (2 thoughts), 1 epoch
    # each, validated at each epoch end.
    config = tiny(tmp_path, "method.name=coconut", "method.max_latent_stage=2",
                  "method.epochs_per_stage=1", "train.epochs=3", "train.max_steps=null",
                  "train.eval_every=0")
    results = train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r.get("split") == "valid"]
    assert [r["stage"] for r in valid] == [0, 1, 2]
    assert {r["stage"] for r in rows if "loss" in r} == {0, 1, 2}
    # Only the last stage's validations compete for best/ (stage 0 is CoT, not Coconut).
    method, loaded = load_run(tmp_path)
    assert method.latent_stage == 2
    task = build_task(loaded.task)
    metrics, predictions = evaluate(method, task, task.load("test"), loaded.eval)
    scores = dict(results["test"])
    assert set(scores.pop("latent_dependence")) == {"zeros", "mean", "shuffled"}  # 2 thoughts
    assert metrics == scores and len(predictions) == 8


def test_stages_by_time_reach_the_last_stage_within_the_budget(tmp_path: Path) -> None:
    """train.stages_by_time: stages of 1,000 epochs each, which the 12-second budget could not
    hold, end at their share of it instead (a third each: stages 0, 1, 2)."""
    config = tiny(tmp_path, "method.name=coconut", "method.max_latent_stage=2",
                  "method.epochs_per_stage=1000", "train.epochs=3000", "train.max_steps=null",
                  "train.max_time=0.2", "train.stages_by_time=true", "train.eval_every=0",
                  "eval.splits=[]")
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {r["stage"] for r in steps} == {0, 1, 2}
    for stage in (0, 1):  # each ends at the first step past its share of the 12 s
        ends = [r for r in steps if r["stage"] == stage][-2:]
        # (<= on the left: metrics.jsonl rounds to hundredths of a second)
        assert ends[0]["train_seconds"] <= 4 * (stage + 1) <= ends[1]["train_seconds"]
        # ... and validates there, as at the end of its epochs
        assert any(r.get("split") == "valid" and r["step"] == ends[1]["step"] for r in rows)
    assert steps[-1]["stage"] == 2 and steps[-1]["train_seconds"] >= 12
    with pytest.raises(ConfigError, match="stages_by_time"):
        tiny(tmp_path, "train.stages_by_time=true")


def test_step_metrics_start_after_the_steps_the_thoughts_replace() -> None:
    """At stage k the first k steps are thoughts: the task judges the written steps as going on
    from there (ProsQA's path_valid would otherwise fail every partial chain)."""
    seen: list[int] = []

    class RecordingTask:
        def score(self, prediction: str, example: Example) -> bool:
            return False

        def step_metrics(self, steps: list[str], example: Example,
                         skipped: int = 0) -> dict[str, float]:
            seen.append(skipped)
            return {}

    method = make(max_latent_stage=3).eval()
    for stage in (0, 2):
        method.set_stage(stage)
        evaluate(method, RecordingTask(), EXAMPLES[:2], EvalConfig(max_new_tokens=2))  # type: ignore[arg-type]
    assert seen == [0, 0, 2, 2]


def test_compiled_layers_compile_once_for_every_later_stage() -> None:
    """Compiled layer by layer (model.compile_scope=layers) over a token-shifted backbone, each
    later stage, with one more thought pass over the cache, compiles (almost) nothing new: the
    cache's bookkeeping (pieces per pass, recorded inputs) runs outside compiled code. Traced,
    it would be guarded on, and every stage would compile again for each layer. The loss and
    gradients stay the eager ones."""
    method = make("qwen3-tiny+token_shift", thoughts_per_step=1, max_latent_stage=3,
                  uniform_thoughts=True)
    method.train()
    batch = {stage: None for stage in (1, 2, 3)}
    for stage in batch:
        method.set_stage(stage)
        batch[stage] = method.collate([method.encode(e) for e in EXAMPLES])
    eager_grads = gradients(method, method(batch[3]).loss)  # stage 3 is set
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_transformers(method, "layers")
    graphs = []
    for stage in batch:
        method.set_stage(stage)
        grads = gradients(method, method(batch[stage]).loss)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[2] - graphs[1] <= 1 < graphs[0], graphs
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_body_matches_eager() -> None:
    """model.compile: the same loss, gradients and completions as eager execution, with the
    compiled body actually running (dynamo captured graphs) and state-dict keys unchanged."""
    method = make(thoughts_per_step=2, max_latent_stage=3).eval()
    method.set_stage(2)
    batch = method.collate([method.encode(e) for e in EXAMPLES])  # padded, 4/4/2/0 thoughts
    eager_loss = method(batch).loss
    eager_grads = gradients(method, eager_loss)
    eager_text = method.generate(EXAMPLES, max_new_tokens=6)
    keys = set(method.state_dict())

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_transformers(method)
    loss = method(batch).loss
    grads = gradients(method, loss)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert method.generate(EXAMPLES, max_new_tokens=6) == eager_text
    assert set(method.state_dict()) == keys
