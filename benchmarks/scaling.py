"""Data-parallel scaling of the real engine: tokens/s on 1, 2, 4 and 8 processes, one per GPU.

For each method (`--methods`: CoT, H2, Coconut) and process count (`--processes`, default every
power of two up to the GPUs visible): `torchrun --standalone --nproc_per_node N -m latentlab
train` on the method's recipe at the throughput benchmark's shapes (benchmarks/throughput.py:
GPT-2 124M on 16 x 1,024 Gutenberg windows for CoT and H2, streamed ProsQA for Coconut from its
third stage), with the same batch per process, so the global batch grows with N (weak
scaling). Reported per run: real tokens/s of all processes over the timed steps (from its
metrics rows), and the efficiency tokens/s(N) / (N x tokens/s(1)). Weights are random
(`model.init_from` unset): speed does not depend on them. NVLink multicast stays off
(`NCCL_NVLS_ENABLE=0`).

On a CPU (`--device cpu`) the processes are gloo ranks of one thread each: a check of the code
path, not a measurement of GPUs.

    python benchmarks/scaling.py --out scaling.json                  # every GPU visible
    python benchmarks/scaling.py --device cpu --preset gpt2-tiny --batch 2 --seq-len 64 \\
        --steps 2 --warmup 1 --processes 1,2 --methods cot           # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import write_report
from throughput import shape_config, timed_window

from latentlab.config import dump_config

# method -> (the throughput benchmark's shape, its recipe, the overrides that make it a speed
# run from random weights)
RECIPES = {
    "cot": ("text", "text_nocot.yaml", ["method.name=cot"]),
    "h2": ("text", "text_h2.yaml", ["model.init_from=null"]),
    "coconut": ("prosqa", "prosqa_coconut.yaml",
                ["model.init_from=null", "method.first_stage=3", "train.grad_accum=1"]),
}


def scaling_run(method: str, processes: int, args: argparse.Namespace,
                out_dir: Path) -> dict[str, Any]:
    """One `latentlab train` under torchrun on `processes` processes; its timed window."""
    shape, recipe, overrides = RECIPES[method]
    # Every process reads `batch` examples a step: the epoch holds them all.
    n_train = args.batch * processes * (args.warmup + args.steps)
    # model.compile: the engine's default (on CUDA it compiles CoT, not H2 or Coconut).
    config = shape_config(shape, args, out_dir / "run", recipe=recipe,
                          extra=[*overrides, f"task.n_train={n_train}", "model.compile=auto"])
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "config.yaml"
    dump_config(config, config_file)
    env = os.environ | {"NCCL_NVLS_ENABLE": "0"}
    if args.device == "cpu":
        env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "latentlab", "train", str(config_file)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    (out_dir / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{method} on {processes} processes failed ({done.returncode}); "
                         f"the end of its output:\n{(done.stdout + done.stderr)[-3000:]}")
    return timed_window(config.run_dir(), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=16, help="examples per process and step")
    parser.add_argument("--seq-len", type=int, default=1024, help="the text shape's windows")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10,
                        help="steps before the timing (compilation, autotuning)")
    parser.add_argument("--methods", default=",".join(RECIPES))
    parser.add_argument("--processes", help="comma-separated process counts (default: 1, 2, "
                        "4, 8 up to the GPUs visible; 1, 2 on a CPU)")
    parser.add_argument("--keep", type=Path, help="keep each run's config, log and metrics "
                        "here (default: a temporary directory)")
    parser.add_argument("--out", type=Path)
    parser.set_defaults(profile=None)  # shape_config's option, not one of this benchmark
    args = parser.parse_args()
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    counts = ([int(n) for n in args.processes.split(",")] if args.processes
              else [n for n in (1, 2, 4, 8) if n <= available])
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "batch_per_process": args.batch,
        "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for method in args.methods.split(","):
            rows: dict[str, dict[str, Any]] = {}
            for n in counts:
                rows[str(n)] = scaling_run(method, n, args, root / method / str(n))
                print(method, n, json.dumps(rows[str(n)]), flush=True)
            single = rows.get("1", {}).get("tokens_per_s")
            for n, row in rows.items():
                row["efficiency"] = row["tokens_per_s"] / (int(n) * single) if single else None
            report["methods"][method] = rows
    write_report(report, args.out)


if __name__ == "__main__":
    main()
