"""Examples per second that one process streams for a config's task, stage by stage.

A streamed run (`task.stream`) generates, encodes and collates every batch in its data worker
processes (`train.data_workers`); this measures each stage on one core: the task's generator
(`Task.streamed`, at the curriculum phase of `--epoch`), the method's `encode` and its
`collate` into batches of `train.batch_size`, and the three in a row. Compare the last with
the examples per second a training step consumes to size `train.data_workers`.

    OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py configs/countdown3_cot.yaml \\
        configs/countdown4_cot.yaml configs/prosqa_cot.yaml --out data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from latentlab.config import load_config
from latentlab.methods.base import answer_text, prompt_text, steps_text
from latentlab.recipes.building import build_method
from latentlab.tasks import build_task


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def measure(config_path: str, n: int, epoch: int, overrides: list[str]) -> dict[str, Any]:
    config = load_config(config_path, overrides)
    task = build_task(config.task)
    start = time.perf_counter()
    examples = [task.streamed(epoch, i) for i in range(n)]
    generate = time.perf_counter() - start
    texts = (prompt_text(e) + steps_text(e.steps) + answer_text(e) for e in examples)
    with tempfile.TemporaryDirectory() as run_dir:
        method = build_method(config, texts, Path(run_dir))
    start = time.perf_counter()
    features = [method.encode(e) for e in examples]
    encode = time.perf_counter() - start
    size = config.train.batch_size
    start = time.perf_counter()
    for i in range(0, n, size):
        method.collate(features[i:i + size])
    collate = time.perf_counter() - start
    return {"config": config_path, "epoch": epoch, "examples": n, "batch_size": size,
            "generate_per_s": rate(n, generate), "encode_per_s": rate(n, encode),
            "collate_per_s": rate(n, collate),
            "pipeline_per_s": rate(n, generate + encode + collate)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--epoch", type=int, default=1000,
                        help="epoch whose curriculum phase generates (default: the last phase)")
    parser.add_argument("--override", action="append", default=[],
                        help="a dotted override for every config (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for path in args.configs:
        rows.append(measure(path, args.examples, args.epoch, args.override))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
