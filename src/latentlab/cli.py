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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from latentlab.errors import ConfigError, LatentlabError, PathError
from latentlab.signals import handling


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a usage error is a ConfigError (`_Parser`)
        if args.func is not cmd_train:  # train checks its config first (a typo fails fast)
            _quiet_progress_bars()
        with _sigterm_interrupts():
            status = int(args.func(args) or 0)
        _leave_process_group()
        return status
    except KeyboardInterrupt as exc:  # outside the training loop, which saves and stops itself
        # Ctrl-C raises a KeyboardInterrupt without text; `_sigterm_interrupts` names SIGTERM.
        return _report(f"interrupted by {str(exc) or 'SIGINT'}. Fix: run the command again (a "
                       "training run continues from its last checkpoint with --resume).", 130)
    except OSError as exc:
        return _report(str(PathError.from_os_error(exc)), 2)
    except LatentlabError as err:
        # Only training raises Interrupted: without the trainer loaded (a usage error, a bad
        # option) the error is not one, and importing it (torch) would take seconds.
        trainer = sys.modules.get("latentlab.engine.trainer")
        interrupted = trainer is not None and isinstance(err, trainer.Interrupted)
        return _report(str(err), 130 if interrupted else 2)


def _quiet_progress_bars() -> None:
    """In a log file, transformers' load/save bars are noise (importing it takes seconds)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


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


def _sigterm_interrupts() -> contextlib.AbstractContextManager[None]:
    """Let SIGTERM stop the command as Ctrl-C does (a KeyboardInterrupt), not kill it."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return handling((signal.SIGTERM,), interrupt)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors (a missing argument, `--n abc`) raised as ConfigError,
    so that `main` prints them in one line like every other error rather than the usage text;
    sub-command parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message, fix=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latentlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method on a task from a YAML config")
    p.add_argument("config", type=Path, help="YAML config, e.g. configs/countdown_cot.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the out_dir the config and overrides give, from "
                        "its last checkpoint (an error if that directory holds no run)")
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
    g.add_argument("--operands", type=int,
                   help="Countdown: numbers per problem (sets task.operands, whose limits apply)")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    g.add_argument("options", nargs="*", help="task options, e.g. max_operand=50")
    g.set_defaults(func=cmd_data_generate)

    p = sub.add_parser("analyze", help="latent diagnostics of a run: subspace capture "
                       "heatmap, silhouette, latents decoded to tokens, and the method's own "
                       "analyses (e.g. Latent-SFT's ECR@K, #L and N_eff)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--n", type=int, default=500, help="examples whose latents are collected")
    p.add_argument("--top-k", type=int, default=5, help="tokens listed per latent")
    p.add_argument("--readout", default="lm_head", choices=["lm_head", "embeddings"])
    p.add_argument("--variance", type=float, default=0.9,
                   help="share of variance each slot's principal subspace explains, in (0, 1]")
    p.add_argument("--max-components", type=int, help="cap on a slot's subspace dimension")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the method's own analyses, e.g. ecr_k=50 for "
                        "Latent-SFT's ECR@K (docs/analysis.md lists them); repeatable")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("sweep", help="run a grid of runs (methods x N_L x tasks x seeds) "
                       "with shared upstream runs; skips finished runs, resumes the rest")
    p.add_argument("sweep", type=Path,
                   help="sweep file, e.g. configs/sweeps/dual_architecture.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every job")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: one per "
                   "GPU when several are visible, else 0 = one job after another)")
    p.add_argument("--out-dir", type=Path, help="where the jobs' run directories go")
    p.add_argument("--jobs", nargs="+", metavar="NAME", help="run only these jobs (names or "
                   "shell-style patterns, e.g. 'liu-*-s0') and the upstream runs they need: a "
                   "part of the sweep")
    p.add_argument("--dry-run", action="store_true", help="print the job plan and stop")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Markdown report with figures, CSV and JSON from runs")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories or sweep directories")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--claims", type=Path, help="a claims file (e.g. configs/claims/papers.yaml): "
                   "the report opens with each claim's verdict")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="a few-minute CPU comparison of every method")
    p.add_argument("--methods", help="comma-separated subset, e.g. cot,nocot")
    p.add_argument("--out", type=Path, default=None, help="demo directory (default: new one "
                   "under runs/)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method")
    p.set_defaults(func=cmd_demo)
    return parser


def print_results(results: dict[str, Any], summary: Sequence[str] = ()) -> None:
    """The results line, once: under torchrun or accelerate launch every process returns them.
    `summary`, lines for a person, goes to stderr first: scripts parse the last stdout line."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        for line in summary:
            print(line, file=sys.stderr)
        print(json.dumps(results))


def _require_at_least(flag: str, value: int | None, minimum: int, why: str = "") -> None:
    """Refuse a count below `minimum` before the command does any work (None: not given)."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} is {value}{why}", fix=f"give {flag} {minimum} or more")


def cmd_train(args: argparse.Namespace) -> int:
    from latentlab.config import load_config

    config = load_config(args.config, args.overrides)  # before the slow imports below
    _quiet_progress_bars()
    from latentlab.recipes import train

    results = train(config, resume=args.resume)
    print_results(results)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from latentlab.recipes import evaluate_run

    # evaluate_run refuses a --batch-size or --max-new-tokens below 1 before loading the model.
    results = evaluate_run(args.run_dir, args.split, args.data, args.batch_size,
                           args.max_new_tokens)
    print_results(results, _eval_summary(results))
    return 0


def _eval_summary(results: dict[str, Any]) -> list[str]:
    """`latentlab eval`'s results in words: the headline score, then the other metrics."""
    what = "accuracy" if "accuracy" in results else "perplexity"
    score = results[what]
    scored = f"{what} {score:.1%}" if what == "accuracy" else f"{what} {score:.3f}"
    if results.get("data"):  # --data: the split only names the predictions file
        scored += f" on {results['n']} examples of {results['data']}"
    else:
        scored = (f"{results['split']} {scored} on {results['n']} "
                  + ("examples" if what == "accuracy" else "windows"))
    best_step = results.get("best_step")  # None: a run from before best/ recorded its step
    model = "best model" + (f" from step {best_step}" if best_step is not None else "")
    lines = [f"{scored} ({results['method']} on {results['task']}, run {results['run_dir']}, "
             f"{model})"]
    others = [f"{key} {value:.4g}" for key, value in results.items()
              if key not in (what, "n", "best_step") and isinstance(value, int | float)
              and not isinstance(value, bool)]
    if others:
        lines.append("other metrics: " + ", ".join(others))
    return lines


def cmd_data_generate(args: argparse.Namespace) -> int:
    _require_at_least("--n", args.n, 1)
    from latentlab.config import load_config
    from latentlab.tasks import build_task

    overrides = [f"task.{o}" for o in args.options]
    if args.operands is not None:  # the task's config checks it: one rule for files and CLI
        overrides.append(f"task.operands={args.operands}")
    config = load_config(base={"task": {"name": args.task}, "method": {"name": "cot"}},
                         overrides=overrides)
    task = build_task(config.task)
    # Before generating (minutes for a large --n): refuse an --out that cannot be written.
    if args.out.is_dir():
        raise PathError(f"--out {args.out} is a directory",
                        fix="give the path of a file to write, e.g. "
                            f"{args.out / f'{args.task}-{args.split}.jsonl'}")
    if args.out.exists() and not args.force:
        raise PathError(f"--out {args.out} already exists",
                        fix="add --force or choose another --out")
    examples = task.generate(args.split, args.n, args.seed)
    task.write(examples, args.out)
    print(json.dumps({"task": args.task, "split": args.split, "n": len(examples),
                      "out": str(args.out)}))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    # The options first: importing the analysis (torch, scikit-learn) takes seconds.
    _require_at_least("--n", args.n, 2, why=": the capture matrix compares at least 2 examples")
    _require_at_least("--top-k", args.top_k, 1)
    _require_at_least("--max-components", args.max_components, 1)
    if not 0.0 < args.variance <= 1.0:  # NaN fails too
        raise ConfigError(f"--variance is {args.variance}",
                          fix="give a share of variance above 0 and at most 1, e.g. 0.9")
    options = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--option {item!r} is not NAME=VALUE",
                              fix="write e.g. --option ecr_k=50")
        options[name.strip()] = yaml.safe_load(value)
    from latentlab.study.analysis import analyze_run

    summary = analyze_run(args.run_dir, args.split, args.n, args.top_k, args.readout,
                          args.variance, args.max_components, options)
    print_results(summary, _analysis_summary(summary))
    return 0


def _analysis_summary(summary: dict[str, Any]) -> list[str]:
    """`latentlab analyze`'s summary in words: the capture numbers and where the files are."""
    head = (f"{summary['method']} on {summary['task']}, {summary['split']} split, "
            f"{summary['n']} examples: ")
    if summary["h_off"] is None:
        head += "one latent slot, so no H_off or silhouette"
    else:
        head += (f"H_off {summary['h_off']:.3f} (isotropic chance {summary['chance']:.3f}), "
                 f"silhouette {summary['silhouette']:.3f}")
    lines = [head, f"subspace dimensions per slot: {' '.join(map(str, summary['components']))} "
                   f"(explaining {summary['variance']:g} of each slot's variance, at most "
                   f"{summary['max_components']})"]
    lines += [f"{name}: {values['summary']}" for name, values in summary.items()
              if isinstance(values, dict) and "summary" in values]
    lines.append("files: " + ", ".join(summary["files"]))
    return lines


def cmd_sweep(args: argparse.Namespace) -> int:
    _require_at_least("--workers", args.workers, 0)
    from latentlab.study.sweep import load_sweep, plan_table, run_plan, select

    plan = load_sweep(args.sweep, args.overrides, args.out_dir)
    if args.jobs:
        plan = select(plan, args.jobs)
    if args.dry_run:
        print(plan_table(plan))
        return 0
    return 0 if run_plan(plan, args.workers).ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from latentlab.study.report import build_report

    report = build_report(args.run_dirs, args.out, split=args.split, claims=args.claims)
    print(json.dumps({"report": str(report.out / "report.md"), "runs": len(report.runs),
                      "files": [str(f) for f in report.files], "skipped": report.skipped}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _require_at_least("--steps", args.steps, 1)
    from latentlab.study.demo import run_demo

    methods = args.methods.split(",") if args.methods else None
    run_demo(methods=methods, out=args.out, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
