"""Training throughput of latentlab's own path against a plain Hugging Face loop, in one run.

For each shape (`--shapes`): `latentlab.recipes.train` itself (the engine, its data pipeline and
the method's loss; plain, with `method.packing` on the task shapes, with `model.compile`), then
the Hugging Face anchor on the same examples and the same model architecture:
`AutoModelForCausalLM` with eager attention, SDPA, and SDPA + `torch.compile`, fed right-padded
batches (every token of the padded batch computed, the loss on its real tokens), AdamW (fused
on CUDA), gradient clipping, autocast. Reported per path: real (non-padding) tokens per second,
seconds per step, model FLOPs utilisation (6N + the attention's 12 L d T per token, against
`--peak-tflops`), peak memory, and the seconds the first steps took (compilation);
`vs_anchor` divides by the SDPA + compile anchor's tokens/s.

Shapes: `text` (fixed `--seq-len` windows of the Gutenberg corpus, GPT-2's tokenizer: the
shape of issue 18), `prosqa` and `countdown` (the CoT recipes' streamed examples, variable
lengths). The engine's tokens/s is what its metrics rows log over the timed steps (data waits
excluded, as the anchor has none). With `--profile DIR`, every path runs `PROFILED_STEPS` more
steps after the timed ones under torch.profiler (the engine through `train.profile`) and
DIR/SHAPE-PATH.txt gets their operators by device time.

    python benchmarks/throughput.py --device cuda --out throughput.json        # GPT-2 124M
    python benchmarks/throughput.py --device cpu --preset gpt2-tiny --batch 2 --seq-len 64 \\
        --steps 2 --warmup 1 --shapes text,countdown --paths engine,hf-sdpa    # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, Clock, gigabytes, profile_table, write_report
from torch import Tensor

from latentlab.backbones import build_backbone, count_parameters, load_saved_tokenizer
from latentlab.config import RunConfig, load_config
from latentlab.methods.base import answer_text, prompt_text, steps_text
from latentlab.recipes import train
from latentlab.recipes.reasoning import StreamedEpoch
from latentlab.tasks import build_task
from latentlab.tasks.text import TextTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPES = {"text": "text_nocot.yaml", "prosqa": "prosqa_cot.yaml",
          "countdown": "countdown3_cot.yaml"}
PATHS = ["engine", "engine-packed", "engine-compile", "hf-eager", "hf-sdpa", "hf-sdpa-compile"]
ANCHOR = "hf-sdpa-compile"
PROFILED_STEPS = 3  # after the timed steps, with --profile


def shape_config(shape: str, args: argparse.Namespace, out_dir: Path,
                 compile_model: bool = False, packing: bool = False,
                 recipe: str | None = None, extra: Sequence[str] = ()) -> RunConfig:
    """The shape's recipe (or `recipe`, a config file of that shape, with the overrides
    `extra`) at the benchmark's size: `warmup + steps` steps (and the profiled ones), a
    metrics row at the end of the warm-up and one at the end of the timed window, no final
    scoring."""
    profiled = [f"train.profile=[{profiled_first(args)},{PROFILED_STEPS}]"] if args.profile else []
    overrides = [
        f"model.name={args.preset}", f"train.batch_size={args.batch}",
        f"train.max_steps={total_steps(args)}", "train.max_time=null", *profiled,
        f"train.log_every={math.gcd(args.warmup, args.steps)}", "train.warmup_steps=0",
        f"train.eval_every={total_steps(args)}", "train.eval_samples=1",
        "train.save_every_minutes=null", "eval.splits=[]", "eval.max_new_tokens=1",
        f"model.compile={str(compile_model).lower()}", f"out_dir={out_dir}",
        *(["method.packing=true"] if packing else []),  # an option of CoT and No-CoT only
        f"train.mixed_precision={'bf16' if args.dtype == 'bf16' else 'no'}"]
    if shape == "text":
        overrides += [f"task.seq_len={args.seq_len}", "task.n_valid=1", "task.n_test=1",
                      f"task.n_train={args.batch * total_steps(args)}"]
    else:
        overrides += ["task.n_valid=1", "train.data_workers=2" if args.device == "cuda"
                      else "train.data_workers=0", "task.curriculum=[]",
                      f"task.n_train={args.batch * total_steps(args)}"]
    if not args.preset.startswith("gpt2") and shape != "text":
        overrides.append("model.preset_overrides={}")  # Countdown's recipes set GPT-2's dropouts
    return load_config(CONFIGS / (recipe or SHAPES[shape]), [*overrides, *extra])


def profiled_first(args: argparse.Namespace) -> int:
    """The first step profiled (`--profile`): the one after the timed window."""
    return args.warmup + args.steps + 1


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup + args.steps + (PROFILED_STEPS if args.profile else 0)


def engine_run(config: RunConfig, args: argparse.Namespace,
               profile_to: Path | None = None) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train(config)
    wall = time.perf_counter() - start
    if profile_to is not None:
        first = profiled_first(args)
        table = config.run_dir() / "profile" / f"steps-{first}-{first + PROFILED_STEPS - 1}.txt"
        profile_to.write_text(table.read_text())
    return {**timed_window(config.run_dir(), args), "run_seconds": wall,
            "peak_gb": gigabytes(torch.cuda.max_memory_allocated(device))
            if device.type == "cuda" else None}


def timed_window(run_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Real tokens/s (of every process) over the timed steps, from the run's metrics rows at
    the end of the warm-up and of the timed window."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "tokens_per_s" in r]
    warm = next(r for r in logged if r["step"] == args.warmup)
    last = next(r for r in logged if r["step"] == args.warmup + args.steps)
    seconds = last["train_seconds"] - warm["train_seconds"]
    return {"tokens_per_s": (last["tokens"] - warm["tokens"]) / seconds,
            "real_tokens_per_step": (last["tokens"] - warm["tokens"]) / args.steps,
            "seconds_per_step": seconds / args.steps,
            "first_steps_seconds": warm["train_seconds"]}


def anchor_batches(config: RunConfig, args: argparse.Namespace) -> list[dict[str, Tensor]]:
    """The engine run's examples as a Hugging Face loop would batch them: right-padded to the
    longest in the batch, labels -100 on padding."""
    tokenizer = load_saved_tokenizer(config.run_dir() / "tokenizer")
    task = build_task(config.task)
    n = args.batch * total_steps(args)
    if isinstance(task, TextTask):
        sequences = task.windows("train", tokenizer, n)
    else:
        texts = (prompt_text(e) + steps_text(e.steps) + answer_text(e) + tokenizer.eos_token
                 for e in StreamedEpoch(task, 0, n))
        sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batches = []
    for start in range(0, n, args.batch):
        chunk = sequences[start:start + args.batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def anchor_run(config: RunConfig, path: str, batches: list[dict[str, Tensor]],
               args: argparse.Namespace, profile_to: Path | None) -> dict[str, Any]:
    device = torch.device(args.device)
    tokenizer = load_saved_tokenizer(config.run_dir() / "tokenizer")
    attn = "eager" if path == "hf-eager" else "sdpa"
    model = build_backbone(config.model.model_copy(update={"attn_implementation": attn,
                                                           "compile": False}),
                           tokenizer, seed=0).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if path.endswith("compile") else model
    batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype],
                              enabled=args.dtype != "fp32")
    it = iter(batches)

    def step() -> None:
        batch = next(it)
        with autocast:
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = clock.mean_seconds(step, args.warmup, 0) * args.warmup
    per_step = clock.mean_seconds(step, args.steps, 0)
    timed = batches[args.warmup:args.warmup + args.steps]
    real = sum(int(b["attention_mask"].sum()) for b in timed) / args.steps
    row = {"tokens_per_s": real / per_step, "real_tokens_per_step": real,
           "padded_tokens_per_step": sum(b["input_ids"].numel() for b in timed) / args.steps,
           "seconds_per_step": per_step,
           "first_steps_seconds": first,
           "peak_gb": gigabytes(torch.cuda.max_memory_allocated(device))
           if device.type == "cuda" else None}
    if profile_to is not None:
        profile_to.write_text(profile_table(step, device, PROFILED_STEPS) + "\n")
    return row


def flops_per_token(model: torch.nn.Module, context: float) -> float:
    """Training FLOPs per token: 6N for the weights (N without the position embeddings) plus
    12 L d T for attention over a context of T tokens (PaLM's appendix B)."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    positions = getattr(getattr(model, "transformer", None), "wpe", None)
    n = count_parameters(model) - (positions.weight.numel() if positions is not None else 0)
    return 6 * n + 12 * layers * width * context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024, help="the text shape's windows")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10,
                        help="steps before the timing (compilation, autotuning)")
    parser.add_argument("--shapes", default="text,prosqa,countdown")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, help="directory for an operator table of "
                        f"{PROFILED_STEPS} steps of each path, run after the timed ones")
    args = parser.parse_args()
    paths = args.paths.split(",")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "batch": args.batch,
        "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            rows: dict[str, dict[str, Any]] = {}
            base = shape_config(shape, args, Path(tmp) / shape / "engine")
            for path in paths:
                profile_to = args.profile / f"{shape}-{path}.txt" if args.profile else None
                if path == "engine-packed" and shape == "text":
                    continue  # windows are full: nothing to pack
                if path.startswith("engine"):
                    config = (base if path == "engine" else shape_config(
                        shape, args, Path(tmp) / shape / path, path == "engine-compile",
                        path == "engine-packed"))
                    rows[path] = engine_run(config, args, profile_to)
                else:
                    if not (base.run_dir() / "tokenizer").is_dir():  # the examples' tokenizer
                        engine_run(base, args)
                    rows[path] = anchor_run(base, path, anchor_batches(base, args), args,
                                            profile_to)
                print(shape, path, json.dumps(rows[path]), flush=True)
            tokenizer = load_saved_tokenizer(base.run_dir() / "tokenizer")
            model = build_backbone(base.model, tokenizer, seed=0)
            anchor = rows.get(ANCHOR, {}).get("tokens_per_s")
            for row in rows.values():
                context = row["real_tokens_per_step"] / args.batch
                flops = flops_per_token(model, context) * row["tokens_per_s"]
                row["mfu"] = (flops / (args.peak_tflops * 1e12)
                              if args.device == "cuda" else None)
                row["vs_anchor"] = row["tokens_per_s"] / anchor if anchor else None
            report["shapes"][shape] = rows
    write_report(report, args.out)


if __name__ == "__main__":
    main()
