"""`latentlab demo`: every method on a small generated task, on CPU, in a few minutes.

The demo is the sweep file `demo.yaml` beside this module (a method joins it with one
`include` entry), run in this process, plus a comparison table printed and written to
`report.md` and `results.json` beside the runs.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from latentlab.engine.checkpoint import atomic_write_text
from latentlab.errors import RunError
from latentlab.recipes import RunDir
from latentlab.recipes.dependence import ABLATIONS
from latentlab.study.sweep import SweepPlan, load_sweep, run_plan, select
from latentlab.study.sweep.plan import UPSTREAM_PREFIX


def demo_sweep() -> Path:
    return Path(str(resources.files("latentlab.study") / "demo.yaml"))


def run_demo(methods: list[str] | None = None, out: Path | None = None,
             steps: int | None = None) -> list[dict[str, Any]]:
    """Train the demo's jobs (`methods`: a subset, with the runs they start from) into `out`;
    `steps` replaces `train.max_steps` in the jobs that have one (a job whose length is its
    curriculum has none). Returns the table's rows."""
    out = out or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    plan = load_sweep(demo_sweep(), out_dir=out)
    if methods:
        plan = select(plan, [_job_name(plan, m) for m in methods])
    if steps:
        for job in plan.jobs:
            if job.config is not None and job.config.train.max_steps is not None:
                job.config.train.max_steps = steps
                job.config.train.warmup_steps = steps // 2
    result = run_plan(plan, workers=0)
    rows = []
    for status in result.jobs:
        run = RunDir(Path(status.run_dir))
        results = run.results() or {}
        if status.status not in ("trained", "resumed", "already_done") or "test" not in results:
            continue
        rows.append({"method": _label(status.name),
                     "starts_from": ", ".join(_label(n) for n in status.needs) or "random init",
                     "valid": results["valid"]["accuracy"], "test": results["test"]["accuracy"],
                     "n_test": results["test"]["n"],
                     "test_ablated": results["test"].get("latent_dependence"),
                     "parameters": results["trainable_parameters"],
                     "seconds": status.seconds})
    table = format_table(rows)
    print("\n" + table)
    write_report(out, plan, rows, table)
    print(f"\nreport: {out / 'report.md'}")
    if not result.ok:
        failed = [j.name for j in result.jobs if j.status not in ("trained", "resumed",
                                                                   "already_done")]
        raise RunError(f"demo job(s) {', '.join(failed)} did not finish (the table above says "
                       "why)", fix=f"fix the cause and run the demo again with --out {out}: "
                                   "finished jobs are kept")
    return rows


def _job_name(plan: SweepPlan, name: str) -> str:
    """A demo entry's job: its own name, or the upstream job of that name (the Bases)."""
    names = {job.name for job in plan.jobs}
    return name if name in names or UPSTREAM_PREFIX + name not in names else \
        UPSTREAM_PREFIX + name


def _label(job_name: str) -> str:
    return job_name.removeprefix(UPSTREAM_PREFIX)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison: accuracy, and test accuracy with the latents replaced (zeros, their
    mean, another question's; `recipes.dependence`) where the method inserts latents."""
    lines = ["| method | starts from | valid acc | test acc | test acc, latents: zeros / mean / "
             "another question's | trained params | time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ablated = (" / ".join(f"{r['test_ablated'][k]:.1%}" for k in ABLATIONS)
                   if r["test_ablated"] else "-")
        seconds = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-"
        lines.append(f"| {r['method']} | {r['starts_from']} | {r['valid']:.1%} | "
                     f"{r['test']:.1%} | {ablated} | {r['parameters']:,} | {seconds} |")
    return "\n".join(lines)


def write_report(out: Path, plan: SweepPlan, rows: list[dict[str, Any]], table: str) -> None:
    text = f"# latentlab demo\n\n{plan.spec.description or ''}\n\n{table}\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=1))
