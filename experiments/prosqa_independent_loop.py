"""ProsQA CoT trained by a plain loop outside the engine, to tell an engine fault from a hard
task: the same generated graphs and tokenizer as `latentlab train` (the task and the method's
`encode`), but the Hugging Face model's own loss (`labels=`), a hand-written AdamW loop and
`model.generate` for scoring. Prints validation accuracy and the share of generated steps that
are edges of the graph every 250 steps.

    python experiments/prosqa_independent_loop.py --steps 1500 [--lr 2e-3]
        [--preset-overrides '{"num_hidden_layers": 4}'] [--bloom] [--adjacent [--lead-space]]
        [--shift]

--bloom swaps in a BLOOM model of the same size (ALiBi: attention biased towards recent tokens
from the start); --adjacent rewrites every "Every X is a Y." and "P is a Y." as "X Y." (the
value next to its key, as in symbolic graph formats), --lead-space starts each step line with a
space so that its first name is the same token as in the question; --shift adds a causal
convolution over the last four positions before every layer (`add_token_shift`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import tempfile
from pathlib import Path

import torch
import transformers

from latentlab.config import RunConfig
from latentlab.methods.base import extract_answer, extract_steps, prompt_text
from latentlab.recipes.building import build_method
from latentlab.tasks import build_task, prosqa
from latentlab.tasks.base import Example


def squeeze(text: str) -> str:
    text = re.sub(r"Every (\w+) is a (\w+)\.", r"\1 \2.", text)
    return re.sub(r"\b([A-Z]\w+) is a (\w+)\.", r"\1 \2.", text)


def add_token_shift(model: transformers.PreTrainedModel) -> list[torch.nn.Conv1d]:
    """Before each decoder layer, h_t += sum_{k=0..3} w_k * h_{t-k} (a causal depthwise
    convolution over the last four positions, zero at initialisation), so every position holds
    its three predecessors before any attention. Hooks on a Qwen-3 model; generation must then
    recompute the whole sequence (`use_cache=False`)."""
    convs = []
    for layer in model.model.layers:
        conv = torch.nn.Conv1d(model.config.hidden_size, model.config.hidden_size, 4,
                               groups=model.config.hidden_size, padding=3, bias=False)
        torch.nn.init.zeros_(conv.weight)
        convs.append(conv)

        def mix(module: torch.nn.Module, args: tuple, kwargs: dict,
                conv: torch.nn.Conv1d = conv) -> tuple[tuple, dict]:
            given = "hidden_states" in kwargs
            h = kwargs["hidden_states"] if given else args[0]
            mixed = h + conv(h.transpose(1, 2))[..., :h.shape[1]].transpose(1, 2)
            if given:
                return args, {**kwargs, "hidden_states": mixed}
            return (mixed, *args[1:]), kwargs

        layer.register_forward_pre_hook(mix, with_kwargs=True)
    return convs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--preset-overrides", type=json.loads, default={})
    parser.add_argument("--bloom", action="store_true")
    parser.add_argument("--adjacent", action="store_true")
    parser.add_argument("--lead-space", action="store_true")
    parser.add_argument("--shift", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = RunConfig.model_validate({
        "task": {"name": "prosqa", "names": "coconut", "stream": True, "min_concepts": 4,
                 "max_concepts": 6, "min_hops": 1, "max_hops": 2},
        "method": {"name": "cot"},
        "model": {"name": "qwen3-tiny", "tokenizer": "train", "tokenizer_vocab_size": 512,
                  "preset_overrides": args.preset_overrides},
        "train": {"batch_size": 32}, "out_dir": tempfile.mkdtemp()})
    task = build_task(config.task)
    draw = task.generate_one
    if args.adjacent:
        lead = " " if args.lead_space else ""

        def adjacent(rng: random.Random, split: str) -> Example:
            e = task.generate_one(rng, split)  # type: ignore[arg-type]
            facts, query = e.question.rsplit(" Is ", 1)
            return dataclasses.replace(e, question=squeeze(facts) + " Is " + query,
                                       steps=tuple(lead + squeeze(s) for s in e.steps))

        draw = adjacent  # type: ignore[assignment]
        prosqa.edge_sentence = lambda p, c: f"{p} {c}."  # what step_metrics compares with

    rng = random.Random(1)
    texts = [t for e in (draw(rng, "train") for _ in range(2000))
             for t in (e.question, *e.steps, e.answer)]
    method = build_method(config, texts, Path(config.out_dir))
    model, tok = method.backbone, method.tokenizer
    if args.bloom:
        model = transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=len(tok), hidden_size=128, n_layer=2, n_head=4, hidden_dropout=0.0,
            attention_dropout=0.0))
    shifts = add_token_shift(model) if args.shift else []
    valid = [draw(random.Random(10**6 + i), "valid") for i in range(100)]
    trained = [*model.parameters(), *(p for conv in shifts for p in conv.parameters())]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 100)
                                                 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    pad = tok.pad_token_id

    def batch(examples: list[Example]) -> tuple[torch.Tensor, ...]:
        features = [method.encode(e) for e in examples]
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad)
        labels = torch.full((len(features), width), -100)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            mask[i, :n] = 1
        return ids, labels, mask

    @torch.no_grad()
    def evaluate() -> tuple[float, float, str]:
        model.eval()
        correct, edges = 0, []
        for e in valid:
            prompt = tok(prompt_text(e), add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(prompt, max_new_tokens=60, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id, use_cache=not shifts)
            text = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
            edges.append(task.step_metrics(extract_steps(text), e).get("step_edges", 0.0))
            correct += task.score(extract_answer(text), e)
        model.train()
        return correct / len(valid), sum(edges) / len(edges), text

    train_rng = random.Random(2)
    for step in range(1, args.steps + 1):
        ids, labels, mask = batch([draw(train_rng, "train") for _ in range(32)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 250 == 0:
            accuracy, edges, last = evaluate()
            print(f"step {step} loss {loss.item():.3f} accuracy {accuracy:.2f} "
                  f"step_edges {edges:.2f} | last: {last!r}", flush=True)


if __name__ == "__main__":
    main()
