"""`latentlab` command line: train, eval, data, demo.

User errors (bad config, missing file, a path that cannot be read or written, ...) print one
line naming the problem and the fix and exit with status 2; no traceback. SIGINT or SIGTERM
exits with status 130 (during training, after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError, PathError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not sys.stderr.isatty():  # in a log file, transformers' load/save bars are noise
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        with _sigterm_interrupts():
            status = int(args.func(args) or 0)
        _leave_process_group()
        return status
    except KeyboardInterrupt as exc:  # outside the training loop, which saves and stops itself
        return _report(f"interrupted by {exc or 'SIGINT'}. Fix: run the command again (a "
                       "training run continues from its last checkpoint with --resume).", 130)
    except OSError as exc:
        return _report(str(PathError.from_os_error(exc)), 2)
    except LatentlabError as err:
        from latentlab.engine.trainer import Interrupted
        return _report(str(err), 130 if isinstance(err, Interrupted) else 2)


def _leave_process_group() -> None:
    """Under torchrun, end the process group before the interpreter exits: gloo's threads left
    running at exit abort the process (std::terminate, SIGABRT) after a run that succeeded."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()  # no process tears down while another still talks to it
        distributed.destroy_process_group()


def _report(message: str, status: int) -> int:
    print("latentlab: error: " + " ".join(message.split()), file=sys.stderr)  # one line
    return status


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM stop the command as Ctrl-C does (a KeyboardInterrupt), not kill it."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt)}
    except ValueError:  # not the main thread (main() called from a library): leave it alone
        previous = {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method on a task from a YAML config")
    p.add_argument("config", type=Path, help="YAML config, e.g. configs/countdown_cot.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the config's out_dir from its last checkpoint "
                        "(or start it, if it has none)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a finished run's best model")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--data", type=Path, help="a data file of the run's task to score instead")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="generate task data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    g = data_sub.add_parser("generate", help="write generated examples as a data file")
    g.add_argument("task", help="countdown or prosqa")
    g.add_argument("--n", type=int, default=1000, help="number of examples")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split", default="train", choices=["train", "valid", "test"],
                   help="valid/test draw from held-out targets where the task has them")
    g.add_argument("--operands", type=int, help="Countdown: numbers per problem (3, 4, 5)")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("options", nargs="*", help="task options, e.g. max_operand=50")
    g.set_defaults(func=cmd_data_generate)

    p = sub.add_parser("analyze", help="latent diagnostics of a run: subspace capture "
                       "heatmap, silhouette, latents decoded to tokens; latent_sft runs also "
                       "ECR@K, #L and N_eff")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--n", type=int, default=500, help="examples whose latents are collected")
    p.add_argument("--top-k", type=int, default=5, help="tokens listed per latent")
    p.add_argument("--readout", default="lm_head", choices=["lm_head", "embeddings"])
    p.add_argument("--variance", type=float, default=0.9,
                   help="variance each slot's principal subspace explains")
    p.add_argument("--max-components", type=int, help="cap on a slot's subspace dimension")
    p.add_argument("--ecr-k", type=int, default=50,
                   help="latent_sft runs: K of ECR@K, the top-K tokens of a latent searched "
                        "for its chunk's tokens (D: 50)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("sweep", help="run a grid of runs (methods x N_L x tasks x seeds) "
                       "with shared upstream runs; skips finished runs, resumes the rest")
    p.add_argument("sweep", type=Path,
                   help="sweep file, e.g. configs/sweeps/dual_architecture.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every job")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: one per "
                   "GPU when several are visible, else 0 = one job after another)")
    p.add_argument("--out-dir", type=Path, help="where the jobs' run directories go")
    p.add_argument("--dry-run", action="store_true", help="print the job plan and stop")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Markdown report with figures, CSV and JSON from runs")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories or sweep directories")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="a few-minute CPU comparison of every method")
    p.add_argument("--methods", help="comma-separated subset, e.g. cot,nocot")
    p.add_argument("--out", type=Path, default=None, help="demo directory (default: new one "
                   "under runs/)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method")
    p.set_defaults(func=cmd_demo)
    return parser


def print_results(results: dict[str, Any]) -> None:
    """The results line, once: under torchrun or accelerate launch every process returns them."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(results))


def cmd_train(args: argparse.Namespace) -> int:
    from latentlab.config import load_config
    from latentlab.run import train

    config = load_config(args.config, args.overrides)
    results = train(config, resume=args.resume)
    print_results(results)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from latentlab.run import evaluate_run

    results = evaluate_run(args.run_dir, args.split, args.data, args.batch_size,
                           args.max_new_tokens)
    print_results(results)
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from latentlab.config import load_config
    from latentlab.errors import ConfigError
    from latentlab.tasks import build_task

    if args.n < 1:
        raise ConfigError(f"--n is {args.n}", fix="give the number of examples, 1 or more")
    overrides = [f"task.{o}" for o in args.options]
    if args.operands is not None:
        overrides.append(f"task.operands={args.operands}")
    config = load_config(base={"task": {"name": args.task}, "method": {"name": "cot"}},
                         overrides=overrides)
    task = build_task(config.task)
    examples = task.generate(args.split, args.n, args.seed)
    task.write(examples, args.out)
    print(json.dumps({"task": args.task, "split": args.split, "n": len(examples),
                      "out": str(args.out)}))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from latentlab.analysis import analyze_run

    summary = analyze_run(args.run_dir, args.split, args.n, args.top_k, args.readout,
                          args.variance, args.max_components, args.ecr_k)
    print(json.dumps(summary))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from latentlab.sweep import load_sweep, plan_table, run_sweep

    if args.dry_run:
        print(plan_table(load_sweep(args.sweep, args.overrides, args.out_dir)))
        return 0
    result = run_sweep(args.sweep, args.overrides, workers=args.workers, out_dir=args.out_dir)
    return 0 if result.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from latentlab.report import build_report

    report = build_report(args.run_dirs, args.out, split=args.split)
    print(json.dumps({"report": str(report.out / "report.md"), "runs": len(report.runs),
                      "files": [str(f) for f in report.files], "skipped": report.skipped}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from latentlab.demo import run_demo

    methods = args.methods.split(",") if args.methods else None
    run_demo(methods=methods, out=args.out, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
