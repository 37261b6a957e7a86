"""`latentlab demo`: every method on a small generated task, on CPU, in a few minutes.

The task is Countdown with 3 operands drawn from a small range, so that a tiny random-init
GPT-2 learns it within the budget. Each method trains on the same data with the same model and
steps; the demo prints a comparison table and writes `report.md` beside the runs.
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
    "train": {"max_steps": 1500, "batch_size": 32, "lr": 2e-3, "warmup_steps": 25,
              "eval_every": 500, "eval_samples": 100, "log_every": 25, "seed": 0},
    "eval": {"batch_size": 100, "max_new_tokens": 40},
}


def run_demo(methods: list[str] | None = None, out: Path | None = None,
             steps: int | None = None) -> list[dict[str, Any]]:
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}",
                          fix=f"choose from {', '.join(METHODS)}")
    out = out or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    rows = []
    for name in methods:
        overrides = [f"method.name={name}", f"out_dir={out / name}"]
        if steps:
            overrides.append(f"train.max_steps={steps}")
        config = load_config(base=DEMO_BASE, overrides=overrides)
        start = time.perf_counter()
        results = train(config)
        rows.append({"method": name, "valid": results["valid"]["accuracy"],
                     "test": results["test"]["accuracy"], "n_test": results["test"]["n"],
                     "parameters": results["trainable_parameters"],
                     "seconds": time.perf_counter() - start})
    table = format_table(rows)
    print("\n" + table)
    write_report(out, rows, table)
    print(f"\nreport: {out / 'report.md'}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | valid acc | test acc | trained params | train+eval time |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['valid']:.1%} | {r['test']:.1%} | {r['parameters']:,} | "
              f"{r['seconds']:.0f} s |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]], table: str) -> None:
    task = DEMO_BASE["task"]
    text = (f"# latentlab demo\n\nCountdown, {task['operands']} operands in "
            f"1..{task['max_operand']}, targets {task['min_target']}..{task['max_target']} "
            f"(validation and test use held-out targets); {task['n_train']} training "
            f"examples; model `{DEMO_BASE['model']['name']}` (random init); "
            f"{rows and DEMO_BASE['train']['max_steps']} steps per method unless --steps was "
            f"given. Accuracy is the share of test problems whose answer the verifier accepts "
            f"(any valid expression counts).\n\n{table}\n\nRuns: "
            + ", ".join(f"`{r['method']}/`" for r in rows) + f" in `{out}`.\n")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
