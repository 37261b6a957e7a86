"""`latentlab demo`: every method on a small generated task, on CPU, in a few minutes.

The task is Countdown with 3 operands drawn from a small range, so that a tiny random-init
GPT-2 learns it within the budget. CoT and No-CoT train from scratch; the latent methods start
from the No-CoT Base with the same latent budget (as in paper A), Coconut from the CoT model
through its curriculum (as in paper C on GSM8K). The demo prints a comparison table and writes
`report.md` and `results.json` beside the runs.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from latentlab.config import load_config
from latentlab.engine.checkpoint import atomic_write_text
from latentlab.errors import ConfigError
from latentlab.methods import METHODS
from latentlab.run import train

DEMO_BASE: dict[str, Any] = {
    "task": {"name": "countdown", "operands": 3, "max_operand": 10, "min_target": 10,
             "max_target": 40, "n_train": 6000, "n_valid": 100, "n_test": 300, "seed": 0},
    "model": {"name": "gpt2-tiny", "tokenizer_vocab_size": 300},
    "train": {"max_steps": 1000, "batch_size": 32, "lr": 2e-3, "warmup_steps": 25,
              "eval_every": 500, "eval_samples": 100, "log_every": 25, "seed": 0},
    "eval": {"batch_size": 100, "max_new_tokens": 40},
}
LATENT_BUDGET = 4
FINE_TUNE_STEPS = 400  # latent methods continue from a trained Base
# Which run a method starts from, and its own settings.
UPSTREAM = {"pause": "nocot", "soft": "nocot", "liu": "nocot", "h1": "nocot", "h2": "nocot",
            "coconut": "cot", "latent_sft_encoder": "cot", "latent_sft": "latent_sft_encoder"}
# Latent-SFT is one method run twice: the encoder phase (a demo entry of its own), then the
# latent phase on the soft labels the encoder writes.
RUN_METHOD = {"latent_sft_encoder": "latent_sft"}
CURRICULUM = ("coconut", "latent_sft_encoder", "latent_sft")  # their length is their schedule
OVERRIDES: dict[str, list[str]] = {
    **{m: [f"method.latent_budget={LATENT_BUDGET}", f"train.max_steps={FINE_TUNE_STEPS}",
           f"train.eval_every={FINE_TUNE_STEPS // 2}"]
       for m in ("pause", "soft", "liu", "h1", "h2")},
    # 3 operands = 2 steps: stage 1 replaces the first by a thought, stage 2 both; one epoch
    # per stage; only the last stage's model is selected.
    "coconut": ["method.max_latent_stage=2", "method.epochs_per_stage=1", "train.epochs=3",
                "train.max_steps=null", "train.eval_every=0", "train.lr=1e-3"],
    # D's three-step schedule (encoder, decoder, both), one epoch each, then two epochs of the
    # latent LM; a third of the data keeps it within the demo's budget.
    "latent_sft_encoder": ["method.schedule_epochs=[1,1,1]", "task.n_train=2000",
                           "train.max_steps=null", "train.eval_every=0",
                           "method.max_latent_steps=8", "train.lr=1e-3"],
    "latent_sft": ["method.phase=latent", "task.n_train=2000", "train.epochs=2",
                   "train.max_steps=null", "train.eval_every=0", "method.max_latent_steps=8",
                   "train.lr=1e-3"],
}


def run_demo(methods: list[str] | None = None, out: Path | None = None,
             steps: int | None = None) -> list[dict[str, Any]]:
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS and m not in RUN_METHOD]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}",
                          fix=f"choose from {', '.join(METHODS)}")
    # Upstream runs first, each once, even if not asked for (a latent method needs its Base).
    order: list[str] = []
    for name in methods:
        for needed in (UPSTREAM.get(name), name):
            if needed and needed not in order:
                order.append(needed)
    out = out or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    rows = []
    for name in order:
        overrides = [f"method.name={RUN_METHOD.get(name, name)}", f"out_dir={out / name}",
                     *OVERRIDES.get(name, [])]
        if name in UPSTREAM:
            overrides.append(f"model.init_from={out / UPSTREAM[name]}")
        if name == "latent_sft":
            overrides.append(f"method.encoder_from={out / UPSTREAM[name]}")
        if steps and name not in CURRICULUM:
            overrides += [f"train.max_steps={steps}", f"train.warmup_steps={steps // 2}"]
        config = load_config(base=DEMO_BASE, overrides=overrides)
        start = time.perf_counter()
        results = train(config)
        rows.append({"method": name, "starts_from": UPSTREAM.get(name, "random init"),
                     "valid": results["valid"]["accuracy"],
                     "test": results["test"]["accuracy"], "n_test": results["test"]["n"],
                     "parameters": results["trainable_parameters"],
                     "seconds": time.perf_counter() - start})
    table = format_table(rows)
    print("\n" + table)
    write_report(out, rows, table)
    print(f"\nreport: {out / 'report.md'}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | starts from | valid acc | test acc | trained params | time |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['starts_from']} | {r['valid']:.1%} | {r['test']:.1%} | "
              f"{r['parameters']:,} | {r['seconds']:.0f} s |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]], table: str) -> None:
    task, train_cfg = DEMO_BASE["task"], DEMO_BASE["train"]
    text = (f"# latentlab demo\n\nCountdown, {task['operands']} operands in "
            f"1..{task['max_operand']}, targets {task['min_target']}..{task['max_target']} "
            f"(validation and test use held-out targets); {task['n_train']} training "
            f"examples; model `{DEMO_BASE['model']['name']}` (random init). CoT and No-CoT train "
            f"{train_cfg['max_steps']} steps from scratch; pause, soft, Liu, H1 and H2 "
            f"fine-tune the No-CoT Base for {FINE_TUNE_STEPS} steps with N_L = "
            f"{LATENT_BUDGET}; Coconut continues from the CoT model through 3 curriculum stages "
            f"of one epoch; Latent-SFT trains its encoder from the CoT model (three steps of "
            f"one epoch), then its latent LM on the encoder's soft labels (two epochs), both "
            f"on 2,000 examples. Accuracy is the share of test problems whose answer the verifier "
            f"accepts (any valid expression counts). Time is training plus evaluation on "
            f"the machine that ran it.\n\n{table}\n")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
