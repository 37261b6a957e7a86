"""Training and inference cost of every fine-tuning method against CoT on the same Base.

For each method (`--methods`, default all of issue 3's): training tokens/s and peak memory of
one forward/backward over a batch of `--batch` examples with `--question-tokens` question tokens
and `--answer-tokens` target tokens (CoT also trains on `--cot-tokens` step tokens), and the
inference latency per example of batched generation of `--new-tokens` tokens (CoT: the steps,
then the answer). Then the Coprocessor's pretraining step (paper B's recipe: `--seq-len`
windows, M = `--points`, N_A = `--ahead`, N_L = `--latents`) with trace packing against
separate passes. Weights are random: speed does not depend on them.

    python benchmarks/methods.py --device cuda --out methods.json          # GPT-2 small, bf16
    python benchmarks/methods.py --preset gpt2-tiny --device cpu --steps 1 --batch 4 \\
        --question-tokens 32 --vocab 500 --seq-len 64 --points 4 --ahead 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, Clock, gigabytes, word_tokenizer
from torch import Tensor

from latentlab.backbones import ModelConfig, add_special_tokens, build_backbone
from latentlab.engine.interface import batch_to
from latentlab.methods import METHODS, Method
from latentlab.tasks.base import Example

DEFAULT_METHODS = ["cot", "nocot", "pause", "soft", "liu", "h1", "h2"]


def build(name: str, preset: str, vocab: int, latents: int, device: torch.device,
          **options: Any) -> Method:
    cls = METHODS[name]
    fields = {"latent_budget": latents} if "latent_budget" in cls.config_class.model_fields \
        else {}
    config = cls.config_class(**fields, **options)
    tokenizer = word_tokenizer(vocab)
    backbone = build_backbone(ModelConfig(name=preset), tokenizer, seed=0)
    add_special_tokens(tokenizer, backbone, cls.special_tokens(config))
    return cls.implementation(config)(config, backbone, tokenizer).to(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=200)
    parser.add_argument("--cot-tokens", type=int, default=60)
    parser.add_argument("--answer-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--latents", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50257)
    # GPT-2's 1,024 positions hold the window and the latents after a point.
    parser.add_argument("--seq-len", type=int, default=1008)
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--ahead", type=int, default=16)
    parser.add_argument("--pretrain-latents", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    clock = Clock(device)
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(args.vocab - 4)}" for _ in range(n))

    steps = args.cot_tokens // 4
    examples = [Example(words(args.question_tokens), tuple(words(4) for _ in range(steps)),
                        words(args.answer_tokens - 2)) for _ in range(args.batch)]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device)
                              if device.type == "cuda" else "cpu", "args": vars(args) | {
                                  "out": str(args.out)}, "train": {}, "inference": {}}

    for name in args.methods.split(","):
        method = build(name, args.preset, args.vocab, args.latents, device)
        batch = batch_to(method.collate([method.encode(e) for e in examples]), device)
        trainable = [p for p in method.parameters() if p.requires_grad]

        def train_step(method: Method = method, batch: dict[str, Any] = batch,
                       params: list[Tensor] = trainable) -> None:
            with autocast:
                loss = method(batch).loss
            loss.backward()
            for p in params:
                p.grad = None

        seconds = clock.mean_seconds(train_step, args.steps, args.warmup)
        result["train"][name] = {"ms": 1e3 * seconds,
                                 "tokens_per_s": batch["num_tokens"] / seconds,
                                 "peak_memory_gb": gigabytes(clock.peak_bytes(train_step))}
        method.eval()
        new_tokens = args.new_tokens + (args.cot_tokens if name == "cot" else 0)

        def generate(method: Method = method, n: int = new_tokens) -> None:
            with torch.no_grad(), autocast:
                method.generate(examples, n)

        latency = clock.mean_seconds(generate, max(1, args.steps // 3), 1)
        result["inference"][name] = {"ms_per_example": 1e3 * latency / args.batch,
                                     "new_tokens": new_tokens}
        print(name, result["train"][name], result["inference"][name], flush=True)
        del method, batch

    base_tps = result["train"].get("cot", {}).get("tokens_per_s")
    for row in result["train"].values():
        row["tokens_per_s_vs_cot"] = row["tokens_per_s"] / base_tps if base_tps else None

    pretrain: dict[str, Any] = {}
    text = [[rng.randrange(4, args.vocab) for _ in range(args.seq_len)]
            for _ in range(max(1, args.batch // 4))]
    for packing in (True, False):
        method = build("liu", args.preset, args.vocab, args.pretrain_latents, device,
                       augmentation_points=args.points, ahead_tokens=args.ahead,
                       trace_packing=packing)
        batch = batch_to(method.collate([method.encode_text(w) for w in text]), device)

        def pretrain_step(method: Method = method, batch: dict[str, Any] = batch) -> None:
            with autocast:
                loss = method(batch).loss
            loss.backward()
            method.zero_grad(set_to_none=True)

        seconds = clock.mean_seconds(pretrain_step, args.steps, args.warmup)
        pretrain["packed" if packing else "separate"] = {
            "ms": 1e3 * seconds, "peak_memory_gb": gigabytes(clock.peak_bytes(pretrain_step))}
        del method, batch
    pretrain["separate_over_packed_time"] = pretrain["separate"]["ms"] / pretrain["packed"]["ms"]
    result["pretraining_liu"] = pretrain
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
