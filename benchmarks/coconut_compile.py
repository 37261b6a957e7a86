"""What compiling costs Coconut through its curriculum: each stage adds a thought pass over the
key/value cache, and compiled code that guarded on the cache's pieces would compile again.

For stages 1..`--stages` (one thought per step, as the ProsQA recipe), two training steps
(forward and backward) on ProsQA questions with Coconut's names, under `model.compile=true`
with `--scope` (`eager`: not compiled): the first step's seconds (compiling included), the
second's, and dynamo's count of compiled graphs after the stage.

    python benchmarks/coconut_compile.py --preset qwen3-12x384 --out F
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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    clock = Clock(device)
    # Small graphs with enough hops for every stage's thoughts.
    task = ProsQATask(ProsQAConfig(names="coconut", stream=True, min_concepts=8,
                                   max_concepts=12, min_hops=args.stages, max_hops=args.stages,
                                   seed=args.seed))
    examples = [task.streamed(0, i, 0) for i in range(2 * args.batch)]
    tokenizer = train_tokenizer([prompt_text(e) + steps_text(e.steps) + answer_text(e)
                                 for e in examples], 512)
    backbone = build_backbone(ModelConfig(name=args.preset, token_shift=args.token_shift),
                              tokenizer, seed=args.seed)
    config = CoconutConfig(thoughts_per_step=1, max_latent_stage=args.stages,
                           uniform_thoughts=True)
    add_special_tokens(tokenizer, backbone, Coconut.special_tokens(config))
    method = Coconut(config, backbone, tokenizer).to(device).train()
    if args.scope != "eager":
        compile_transformers(method, args.scope)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype],
                              enabled=DTYPES[args.dtype] != torch.float32)
    stages = []
    for stage in range(1, args.stages + 1):
        method.set_stage(stage)
        seconds = []
        for half in (examples[: args.batch], examples[args.batch:]):
            batch = method.collate([method.encode(e) for e in half])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            start = time.perf_counter()
            method.zero_grad(set_to_none=True)
            with autocast:
                loss = method(batch).loss
            loss.backward()
            clock.sync()
            seconds.append(time.perf_counter() - start)
        stages.append({"stage": stage, "first_step_s": seconds[0], "second_step_s": seconds[1],
                       "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]})
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "stages": stages}
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
