"""Coconut's cost: training step time and generation throughput against the alternatives.

Training (forward + backward of one batch at the last curriculum stage, `--thoughts` thoughts):
  coconut_cached   `Coconut.forward`: n+1 passes sharing one KV cache (each pass feeds only
                   the new columns; gradients flow through the cache)
  coconut_per_pass_grads  the same with method.defer_shared_grads=never: autograd computes
                   the gradients of each parameter and of the prefix's keys and values once
                   per pass and adds them up (the default, `replayed`, defers only with
                   --cuda-graphs; eagerly both are the same unless --defer-shared-grads always)
  plain_one_pass   one forward/backward over the same tokens (what CoT or pause tokens cost)
  full_recompute   thought j by re-running the whole prefix from scratch, then a full pass (the
                   naive way; quadratic in the number of thoughts)
Generation (`--new-tokens` after `<eot>`):
  coconut_batched  `Coconut.generate`: batched, thoughts and tokens one cached step each
  reference_batch1 one example at a time, every thought and token re-encodes the whole prefix
                   (facebookresearch/coconut's `generate` supports batch 1 only and re-encodes
                   the prefix for every new token)
  cot_batched      CoT: batched cached decoding of `--cot-tokens` steps' tokens + the answer

Sequences use a word-level tokenizer over `--vocab` words so that lengths are exact and the LM
head has GPT-2's size. Weights are random: speed does not depend on them.

    python benchmarks/coconut_step.py --device cuda --out coconut_step.json
    python benchmarks/coconut_step.py --device cuda --compile --out coconut_step_compiled.json
    python benchmarks/coconut_step.py --device cuda --compile --compile-scope layers --quick --out F
    python benchmarks/coconut_step.py --device cuda --cuda-graphs --quick --out graphs.json
    python benchmarks/coconut_step.py --preset gpt2-tiny --device cpu --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, Clock, gigabytes, profile_table, word_tokenizer
from torch import Tensor, nn

from latentlab.backbones import (
    ModelConfig,
    add_special_tokens,
    build_backbone,
    compile_transformers,
)
from latentlab.engine.cuda_graphs import GraphedSteps
from latentlab.engine.interface import StepOutput
from latentlab.methods.base import lm_loss, right_padded_states
from latentlab.methods.coconut import EOT, Coconut, CoconutConfig
from latentlab.methods.cot import CoT, CoTConfig
from latentlab.tasks.base import Example


class StepModule(nn.Module):
    """One variant's loss as a module (what `GraphedSteps` records), under autocast as the
    trainer's prepared model runs it."""

    def __init__(self, loss_fn: Callable[[dict[str, Any]], Tensor], method: Coconut,
                 autocast: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        super().__init__()
        self.loss_fn, self.method, self.autocast = loss_fn, method, autocast

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        with self.autocast():
            return StepOutput(self.loss_fn(batch))


def make_examples(args: argparse.Namespace, rng: random.Random, n: int) -> list[Example]:
    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(args.vocab - 4)}" for _ in range(n))

    # answer_text is "### <words>", then <eos>: answer_tokens in all.
    per_step = max(1, args.cot_tokens // max(args.thoughts, 1))
    return [Example(words(args.question_tokens), tuple(words(per_step) for _ in
                                                       range(args.thoughts)),
                    words(max(args.answer_tokens - 2, 1))) for _ in range(n)]


def recomputed_hidden(method: Coconut, batch: dict[str, Any]) -> Tensor:
    """Hidden states with thought j computed by a from-scratch pass over columns < bot+j
    (every row has the same layout here, so no padding is involved)."""
    base = method.backbone.base_model
    ids, bot, n = batch["input_ids"], batch["bot"], batch["max_thoughts"]
    embeds = method.backbone.get_input_embeddings()(ids)
    for j in range(1, n + 1):
        thought = base(inputs_embeds=embeds[:, : bot + j]).last_hidden_state[:, -1:]
        embeds = torch.cat([embeds[:, : bot + j], thought.to(embeds.dtype),
                            embeds[:, bot + j + 1:]], dim=1)
    return base(inputs_embeds=embeds).last_hidden_state


@torch.no_grad()
def reference_generate(method: Coconut, example: Example, n_thoughts: int,
                       new_tokens: int) -> list[int]:
    """Batch 1, no cache: each thought and each token re-runs the whole sequence."""
    model, tok = method.backbone, method.tokenizer
    embed = model.get_input_embeddings()
    ids = [*method.prompt_ids(example), method.bot_id]
    embeds = embed(torch.tensor([ids], device=method.device))
    for _ in range(n_thoughts):
        thought = model.base_model(inputs_embeds=embeds).last_hidden_state[:, -1:]
        embeds = torch.cat([embeds, thought.to(embeds.dtype)], dim=1)
    token = tok.convert_tokens_to_ids(EOT)
    out: list[int] = []
    for _ in range(new_tokens):
        embeds = torch.cat([embeds, embed(torch.tensor([[token]], device=method.device))], 1)
        token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
        if token == tok.eos_token_id:
            break
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="autocast dtype (weights stay float32, as in training)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=350)
    parser.add_argument("--thoughts", type=int, default=6)
    parser.add_argument("--answer-tokens", type=int, default=12)
    parser.add_argument("--cot-tokens", type=int, default=60,
                        help="tokens of the explicit CoT that CoT decoding generates")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--gen-batch", type=int, default=128,
                        help="examples per batched generation call")
    parser.add_argument("--gen-steps", type=int, default=3,
                        help="timed generation calls (after one untimed call)")
    parser.add_argument("--ref-examples", type=int, default=8,
                        help="examples timed for the batch-1 reference generation")
    parser.add_argument("--compile", action="store_true",
                        help="model.compile=true: torch.compile the transformer body (every "
                        "variant, so the ratios compare like with like)")
    parser.add_argument("--compile-scope", choices=["body", "layers"], default="body",
                        help="with --compile, model.compile_scope: the body as one graph, or "
                        "each decoder layer (regional compilation)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="train.cuda_graphs=true: every variant's step replayed from a "
                        "CUDA graph (recorded during the warmup steps)")
    parser.add_argument("--quick", action="store_true",
                        help="only the cached and the plain training step (no recomputation, "
                        "no generation): fewer shapes to compile with --compile")
    parser.add_argument("--profile", type=Path,
                        help="directory for a torch.profiler table of each training step")
    parser.add_argument("--defer-shared-grads", choices=["replayed", "always", "never"],
                        default="replayed", help="method.defer_shared_grads of the "
                        "coconut_cached variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    clock = Clock(device)
    tokenizer = word_tokenizer(args.vocab)
    backbone = build_backbone(ModelConfig(name=args.preset), tokenizer, seed=args.seed)
    config = CoconutConfig(thoughts_per_step=1, max_latent_stage=args.thoughts,
                           uniform_thoughts=True, defer_shared_grads=args.defer_shared_grads)
    add_special_tokens(tokenizer, backbone, Coconut.special_tokens(config))
    method = Coconut(config, backbone, tokenizer).to(device)
    method.set_stage(args.thoughts)  # the last stage: all steps are thoughts
    if args.compile:
        compile_transformers(method, args.compile_scope)
    rng = random.Random(args.seed)
    examples = make_examples(args, rng, args.batch)
    gen_examples = make_examples(args, rng, args.gen_batch)
    batch = method.collate([method.encode(e) for e in examples])
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def autocast() -> contextlib.AbstractContextManager[None]:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def hidden_one_pass(b: dict[str, Any]) -> Tensor:  # as CoT.forward
        embeds = method.backbone.get_input_embeddings()(b["input_ids"])
        return right_padded_states(method.backbone, embeds)

    # Each variant's loss as training computes it: Coconut through the method's step, the
    # others from their hidden states.
    def per_pass_grads(b: dict[str, Any]) -> Tensor:
        default, method.config.defer_shared_grads = method.config.defer_shared_grads, "never"
        try:
            return method(b).loss
        finally:
            method.config.defer_shared_grads = default

    loss_fns: dict[str, Callable[[dict[str, Any]], Tensor]] = {
        "coconut_cached": lambda b: method(b).loss,
        "coconut_per_pass_grads": per_pass_grads,
        "plain_one_pass": lambda b: lm_loss(method.backbone, hidden_one_pass(b), b["labels"],
                                            b["label_index"]),
        "full_recompute": lambda b: lm_loss(method.backbone, recomputed_hidden(method, b),
                                            b["labels"], b["label_index"]),
    }
    if args.quick:
        del loss_fns["full_recompute"]
    method.train()
    train: dict[str, Any] = {}
    for name, loss_fn in loss_fns.items():
        module = StepModule(loss_fn, method, autocast)
        graphs = GraphedSteps(module) if args.cuda_graphs else None

        def step(module: StepModule = module, graphs: GraphedSteps | None = graphs) -> None:
            method.zero_grad(set_to_none=True)
            # As the trainer does: a replay when the layout has a recording (the warmup calls
            # record it), else eager.
            if graphs is None or graphs.step(batch, 1.0) is None:
                module(batch).loss.backward()

        seconds = clock.mean_seconds(step, args.steps, args.warmup)
        peak = clock.peak_bytes(step, replayed=graphs is not None)
        train[name] = {"ms": 1e3 * seconds, "peak_memory_gb": gigabytes(peak),
                       "warmup_s": clock.warmup_seconds}  # compiling, recording included
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            (args.profile / f"{name}.txt").write_text(profile_table(step, device))
    method.zero_grad(set_to_none=True)
    for name in train:
        train[name]["vs_plain"] = train[name]["ms"] / train["plain_one_pass"]["ms"]
    # Dropout differs between the timed calls, so compare without it.
    method.eval()
    with torch.no_grad(), autocast():
        check = {n: float(fn(batch)) for n, fn in loss_fns.items()
                 if n not in ("plain_one_pass", "coconut_per_pass_grads")}
    generation: dict[str, Any] = {}
    if not args.quick:  # --quick: training only
        cot = CoT(CoTConfig(), backbone, tokenizer).eval()
        n_ref = min(args.ref_examples, len(gen_examples))

        def coconut_generate() -> None:
            with autocast():
                method.generate(gen_examples, args.new_tokens)

        def cot_generate() -> None:
            with autocast():
                cot.generate(gen_examples, args.cot_tokens + args.new_tokens)

        def reference() -> None:
            with autocast():
                for e in gen_examples[:n_ref]:
                    reference_generate(method, e, args.thoughts, args.new_tokens)

        for name, fn, n in (("coconut_batched", coconut_generate, len(gen_examples)),
                            ("reference_batch1", reference, n_ref),
                            ("cot_batched", cot_generate, len(gen_examples))):
            seconds = clock.mean_seconds(fn, args.gen_steps, warmup=1)
            generation[name] = {"examples": n, "seconds": seconds, "examples_per_s": n / seconds}
        for name in generation:
            generation[name]["speedup_vs_reference"] = (generation[name]["examples_per_s"]
                                                        / generation["reference_batch1"]
                                                        ["examples_per_s"])

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sequence_tokens": int(batch["input_ids"].shape[1]),
        "train_step": train,
        "train_loss_cached_minus_recomputed": (check["coconut_cached"] - check["full_recompute"]
                                               if "full_recompute" in check else None),
        "generation": generation,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
