"""What Coconut's curriculum costs per stage: each stage adds a thought pass over the key/value
cache (and compiled code that guarded on the cache's pieces would compile again).

For stages `--first-stage`..`--stages` (stage 0: the plain one-pass CoT step with an empty
`<bot><eot>`, the anchor; then one thought per step, as the ProsQA recipe), training steps
(forward and backward) on ProsQA questions with Coconut's names, under `model.compile=true`
with `--scope` (`eager`: not compiled): the first step's seconds (compiling included), the mean
of `--steps` more on fresh questions, real tokens per second, each stage's step against stage
0's, dynamo's count of compiled graphs after the stage, and on CUDA the peak memory allocated
and reserved.

    python benchmarks/coconut_compile.py --preset qwen3-12x384 --out F
    python benchmarks/coconut_compile.py --batch 128 --stages 6 --min-concepts 15 \
        --max-concepts 25 --steps 5 --out F                  # the ProsQA recipe's micro-batch
    python benchmarks/coconut_compile.py --preset qwen3-tiny --stages 2 --batch 2   # smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, Clock, write_report

from latentlab.backbones import (
    ModelConfig,
    add_special_tokens,
    build_backbone,
    compile_transformers,
    train_tokenizer,
)
from latentlab.methods.base import answer_text, prompt_text, steps_text
from latentlab.methods.coconut import Coconut, CoconutConfig
from latentlab.tasks import ProsQAConfig, ProsQATask


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="qwen3-12x384")
    parser.add_argument("--token-shift", type=int, default=4, help="model.token_shift")
    parser.add_argument("--scope", choices=["body", "layers", "eager"], default="layers",
                        help="model.compile_scope, or eager: not compiled (the reference)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--first-stage", type=int, default=0,
                        help="1: leave out stage 0, the plain step")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1,
                        help="timed steps per stage after the first, each on new questions")
    parser.add_argument("--min-concepts", type=int, default=8)
    parser.add_argument("--max-concepts", type=int, default=12)
    parser.add_argument("--symbolic-layer-ints", action="store_true",
                        help="with --scope layers, dynamo's allow_unspec_int_on_nn_module: a "
                        "layer's integer attributes, among them the index it hands the key/"
                        "value cache, symbolic, so the layers share their graphs instead of "
                        "compiling their own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    clock = Clock(device)
    # Graphs with enough hops for every stage's thoughts.
    task = ProsQATask(ProsQAConfig(names="coconut", stream=True, min_concepts=args.min_concepts,
                                   max_concepts=args.max_concepts, min_hops=args.stages,
                                   max_hops=args.stages, seed=args.seed))
    per_stage = (1 + args.steps) * args.batch
    examples = [task.streamed(0, i, 0) for i in range((args.stages + 1) * per_stage)]
    tokenizer = train_tokenizer([prompt_text(e) + steps_text(e.steps) + answer_text(e)
                                 for e in examples[:64]], 512)
    backbone = build_backbone(ModelConfig(name=args.preset, token_shift=args.token_shift),
                              tokenizer, seed=args.seed)
    config = CoconutConfig(thoughts_per_step=1, max_latent_stage=args.stages,
                           uniform_thoughts=True)
    add_special_tokens(tokenizer, backbone, Coconut.special_tokens(config))
    method = Coconut(config, backbone, tokenizer).to(device).train()
    if args.scope != "eager":
        compile_transformers(method, args.scope)
        if args.symbolic_layer_ints:  # read when dynamo traces
            torch._dynamo.config.allow_unspec_int_on_nn_module = True
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype],
                              enabled=DTYPES[args.dtype] != torch.float32)
    cuda = device.type == "cuda"
    stages = []
    for stage in range(args.first_stage, args.stages + 1):
        method.set_stage(stage)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, tokens = [], []
        mine = examples[stage * per_stage:(stage + 1) * per_stage]
        for first in range(0, per_stage, args.batch):
            batch = method.collate([method.encode(e) for e in mine[first:first + args.batch]])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            tokens.append(int(batch["attention_mask"].sum()))
            start = time.perf_counter()
            method.zero_grad(set_to_none=True)
            with autocast:
                loss = method(batch).loss
            loss.backward()
            clock.sync()
            seconds.append(time.perf_counter() - start)
        timed = seconds[1:]
        row: dict[str, Any] = {
            "stage": stage, "first_step_s": seconds[0],
            "step_s": sum(timed) / len(timed) if timed else None,
            "tokens_per_s": sum(tokens[1:]) / sum(timed) if timed else None,
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
        if cuda:
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
        if timed and stages and stages[0]["stage"] == 0 and stages[0]["step_s"]:
            row["step_vs_stage_0"] = row["step_s"] / stages[0]["step_s"]
        stages.append(row)
        print(row, flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "stages": stages}
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
