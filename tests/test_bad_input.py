"""Bad input, through the real CLI: one clear line naming the problem and the fix, exit status
2, no traceback, and nothing written (every file of the sandbox, which holds a finished run,
its config and the case's data files, hashes the same before and after; no file appears).

Each case builds its command line in a fresh `Sandbox`; the message is a regex searched in the
error line. Two cases also run as real processes (`python -m latentlab`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import pytest
import yaml
from conftest import RUN_CONFIG, FinishedRun

from latentlab.cli import main

# With this variable set to a file, each case appends its row of docs/reliability.md's table.
TABLE_ENV = "LATENTLAB_CASES_TABLE"
ERROR_LINE = re.compile(r"^latentlab: error: (?P<problem>.+)\. Fix: (?P<fix>.+)\.$")
# (numbers, target) with a valid answer, and one with none at all
SOLVABLE = {"question": "Numbers: 2 3 4. Target: 20.", "steps": ["3+2=5", "5*4=20"],
            "answer": "(2+3)*4", "meta": {"numbers": [2, 3, 4], "target": 20}}
NOT_UTF8 = b'{"question": "\xff"}\n'
UNSOLVABLE = {**SOLVABLE, "question": "Numbers: 1 1 1. Target: 29.", "steps": [],
              "answer": "1+1+1", "meta": {"numbers": [1, 1, 1], "target": 29}}


class Sandbox:
    """A temporary directory for one case; `run` is a copy of a finished run."""

    def __init__(self, root: Path, finished: FinishedRun) -> None:
        self.root = root
        self.finished = finished
        self.config = self.file("run.yaml", finished.config.read_text())

    @cached_property
    def run(self) -> Path:
        return Path(shutil.copytree(self.finished.run_dir, self.root / "run"))

    @property
    def new(self) -> str:
        """An out_dir override for a run directory that does not exist yet."""
        return f"out_dir={self.root / 'new'}"

    def train(self, *args: str, config: Path | None = None) -> list[str]:
        """`train` of the finished run's config into a new run directory, plus `args`."""
        return ["train", str(config or self.config), self.new, *args]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def rows(self, name: str, *rows: dict | str) -> Path:
        """A JSON-lines file; a str row is written as it is (a broken line)."""
        return self.file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                       for r in rows))

    def config_with(self, name: str, **sections: dict) -> Path:
        data = {k: {**v, **sections.get(k, {})} for k, v in RUN_CONFIG.items()}
        return self.file(name, yaml.safe_dump({**data, **{k: v for k, v in sections.items()
                                                          if k not in data}}))

    def damage(self, rel: str) -> Path:
        """Cut a file of the run copy in half (a disk error, an interrupted copy)."""
        path = self.run / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return self.run

    def without(self, rel: str) -> Path:
        shutil.rmtree(self.run / rel)
        return self.run

    def bigger_tokenizer(self) -> Path:
        """The run's tokenizer with 50 more tokens: it no longer fits the run's model."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.run / "tokenizer"))
        tokenizer.add_tokens([f"extra{i}" for i in range(50)])
        tokenizer.save_pretrained(str(self.root / "big-tokenizer"))
        return self.root / "big-tokenizer"

    def snapshot(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file()}


Build = Callable[[Sandbox], list[str]]
CASES: list[tuple[str, Build, str]] = [
    # ---- configs
    ("fp16-on-a-cpu", lambda s: s.train("train.mixed_precision=fp16"),
     r"train\.mixed_precision=fp16 needs a CUDA GPU, and none is visible.*Fix: set "
     r"train\.mixed_precision=auto"),
    ("tracker-not-installed", lambda s: s.train("train.trackers=[wandb]"),
     r"train\.trackers names wandb, which is not installed.*Fix: pip install wandb"),
    ("unknown-key", lambda s: s.train("train.lrr=1"),
     r"unknown config key train\.lrr.*did you mean train\.lr\?"),
    ("unknown-key-in-file", lambda s: s.train(config=s.config_with("c.yaml", train={"epoch": 3})),
     r"unknown config key train\.epoch.*did you mean train\.epochs\?"),
    ("unknown-section", lambda s: s.train("trainer.lr=1"), r"unknown config key trainer"),
    ("wrong-type", lambda s: s.train("train.batch_size=abc"),
     r"config key train\.batch_size = 'abc' is invalid.*Fix: change train\.batch_size"),
    ("negative-lr", lambda s: s.train("train.lr=-1"),
     r"train\.lr = -1 is invalid: Input should be greater than 0"),
    ("zero-batch-size", lambda s: s.train("train.batch_size=0"),
     r"train\.batch_size = 0 is invalid: Input should be greater than or equal to 1"),
    ("impossible-range", lambda s: s.train("task.min_operand=9", "task.max_operand=3"),
     r"config section task is invalid: min_operand \(9\) is above max_operand \(3\)"),
    ("unknown-choice", lambda s: s.train("train.on_nonfinite=ignore"),
     r"train\.on_nonfinite = 'ignore' is invalid: Input should be 'stop' or 'skip'"),
    ("unknown-method", lambda s: s.train("method.name=nope"),
     r"method\.name is 'nope', which is not known.*Fix: use one of .*cot"),
    ("unknown-task", lambda s: s.train("task.name=nope"),
     r"task\.name is 'nope', which is not known.*countdown"),
    ("override-without-value", lambda s: s.train("train.lr"),
     r"override 'train\.lr' is not of the form key=value"),
    ("override-inside-a-value", lambda s: s.train("train.lr.x=1"),
     r"override train\.lr\.x: lr is not a section"),
    ("config-missing", lambda s: ["train", str(s.root / "nope.yaml"), s.new],
     r"config file .*nope\.yaml does not exist"),
    ("config-is-a-directory", lambda s: ["train", str(s.root), s.new],
     r"config file .* is a directory, not a file"),
    ("config-not-yaml", lambda s: ["train", str(s.file("c.yaml", "task: {name: countdown\n")),
                                   s.new], r"config file .*c\.yaml is not valid YAML"),
    ("config-not-a-mapping", lambda s: ["train", str(s.file("c.yaml", "- 1\n- 2\n")), s.new],
     r"does not hold a mapping of sections"),
    ("config-not-utf8", lambda s: ["train", str(s.file("c.yaml", b"task: {name: \xff}\n")),
                                   s.new], r"config file .*c\.yaml is not UTF-8 text"),
    # ---- data files
    ("data-truncated-line", lambda s: s.train(
        f"task.train={s.rows('d.jsonl', SOLVABLE, json.dumps(SOLVABLE)[:40])}"),
     r"d\.jsonl:2 is not valid JSON.*Fix: repair or delete that line"),
    ("data-missing-field", lambda s: s.train(
        f"task.train={s.rows('d.jsonl', {k: v for k, v in SOLVABLE.items() if k != 'answer'})}"),
     r"d\.jsonl:1 has no field 'answer'"),
    ("data-wrong-field-type", lambda s: s.train(
        f"task.train={s.rows('d.jsonl', {**SOLVABLE, 'steps': '3+2=5'})}"),
     r"d\.jsonl:1: field 'steps' is not a list of strings"),
    ("data-row-not-an-object", lambda s: s.train(f"task.train={s.rows('d.jsonl', '[1, 2]')}"),
     r"d\.jsonl:1 is not a JSON object"),
    ("data-empty-file", lambda s: s.train(f"task.train={s.file('d.jsonl', '')}"),
     r"the train split of task 'countdown' is empty \(.*d\.jsonl holds no examples\)"),
    ("data-not-utf8", lambda s: s.train(f"task.train={s.file('d.jsonl', NOT_UTF8)}"),
     r"d\.jsonl is not UTF-8 text.*Fix: re-encode the file as UTF-8"),
    ("data-no-solution", lambda s: s.train(f"task.train={s.rows('d.jsonl', UNSOLVABLE)}"),
     r"d\.jsonl:1: numbers \[1, 1, 1\] cannot make target 29.*Fix: delete that row"),
    ("data-wrong-answer", lambda s: s.train(
        f"task.train={s.rows('d.jsonl', {**SOLVABLE, 'answer': '2+3+4'})}"),
     r"d\.jsonl:1: answer '2\+3\+4' does not make 20"),
    ("data-of-another-task", lambda s: s.train(
        f"task.train={s.rows('d.jsonl', {'question': 'Q?', 'answer': '<<1+1=2>> #### 2'})}"),
     r"d\.jsonl:1 has no field 'steps'.*read as countdown data"),
    ("data-missing", lambda s: s.train(f"task.train={s.root / 'nope.jsonl'}"),
     r"data file .*nope\.jsonl does not exist"),
    ("data-is-a-directory", lambda s: s.train(f"task.train={s.root}"),
     r"data file .* is a directory, not a file"),
    # ---- models and tokenizers
    ("tokenizer-of-another-model", lambda s: s.train(
        f"model.name={s.run / 'best' / 'model'}", f"model.tokenizer={s.bigger_tokenizer()}"),
     r"model\.tokenizer=.*big-tokenizer is not the tokenizer saved with the model .*best/model: "
     r"their vocabularies differ"),
    ("tokenizer-missing", lambda s: s.train(f"model.tokenizer={s.root / 'nope'}"),
     r"cannot load the tokenizer '.*nope': directory .*nope does not exist"),
    ("model-damaged", lambda s: s.train(
        f"model.name={s.damage('best/model/model.safetensors') / 'best' / 'model'}"),
     r"cannot load the model saved in .*best/model \(Error while deserializing"),
    # ---- run directories
    ("existing-run-without-resume", lambda s: ["train", str(s.config), f"out_dir={s.run}"],
     r"run directory .*run already holds a run.*Fix: add --resume"),
    ("resume-with-another-config", lambda s: ["train", str(s.config), f"out_dir={s.run}",
                                              "train.lr=0.001", "--resume"],
     r"--resume with a config that differs from the run's in train\.lr"),
    ("resume-damaged-checkpoint", lambda s: [
        "train", str(s.config), f"out_dir={s.damage('checkpoints/step-0000012/model.safetensors')}",
        "--resume"], r"checkpoint .*step-0000012 cannot be loaded.*Fix: restore it"),
    ("out-dir-is-a-file", lambda s: ["train", str(s.config), f"out_dir={s.config}"],
     r"run directory .*run\.yaml cannot be created: .*run\.yaml is a file"),
    ("out-dir-inside-a-file", lambda s: ["train", str(s.config), f"out_dir={s.config}/run"],
     r"run directory .*run\.yaml/run cannot be created: .*run\.yaml is a file"),
    ("out-dir-not-a-run", lambda s: [
        "train", str(s.config), f"out_dir={s.file('other/metrics.jsonl', '{}').parent}"],
     r"other holds metrics\.jsonl but no config\.yaml: it is not a latentlab run"),
    ("init-from-missing", lambda s: s.train(f"model.init_from={s.root / 'nope'}"),
     r"model\.init_from=.*nope does not exist"),
    ("init-from-not-a-run", lambda s: s.train(f"model.init_from={s.root}"),
     r"model\.init_from=.* is not a latentlab run directory"),
    ("init-from-other-architecture", lambda s: s.train(
        f"model.init_from={s.run}", "model.name=qwen3-tiny"),
     r"model\.init_from=.*run holds a model with model\.name=gpt2-tiny, not the one this "
     r"config describes\. Fix: set model\.name=gpt2-tiny"),
    ("init-from-other-tokenizer", lambda s: s.train(
        f"model.init_from={s.run}", "model.tokenizer_vocab_size=512"),
     r"holds a model with model\.tokenizer_vocab_size=300"),
    ("init-from-unfinished-run", lambda s: s.train(f"model.init_from={s.without('best')}"),
     r"model\.init_from=.*run has no best/ model"),
    ("init-from-damaged-model", lambda s: s.train(
        f"model.init_from={s.damage('best/model/model.safetensors')}"),
     r"cannot load the model saved in .*best/model \(Error while deserializing"),
    # ---- eval
    ("eval-missing-run", lambda s: ["eval", str(s.root / "nope")],
     r"run directory .*nope does not exist"),
    ("eval-not-a-run", lambda s: ["eval", str(s.root)], r"is not a latentlab run directory"),
    ("eval-run-is-a-file", lambda s: ["eval", str(s.config)], r"is not a latentlab run directory"),
    ("eval-no-best-model", lambda s: ["eval", str(s.without("best"))],
     r"run .* has no best model yet"),
    ("eval-damaged-model", lambda s: ["eval", str(s.damage("best/model/model.safetensors"))],
     r"cannot load the model saved in .*best/model \(Error while deserializing"),
    ("eval-data-missing", lambda s: ["eval", str(s.run), "--data", str(s.root / "nope.jsonl")],
     r"data file .*nope\.jsonl does not exist"),
    ("eval-data-is-a-directory", lambda s: ["eval", str(s.run), "--data", str(s.root)],
     r"data file .* is a directory"),
    ("eval-data-empty", lambda s: ["eval", str(s.run), "--data", str(s.file("d.jsonl", ""))],
     r"d\.jsonl holds no examples"),
    ("eval-data-of-another-task", lambda s: [
        "eval", str(s.run), "--data", str(s.rows("d.jsonl", {"question": "Q?", "answer": "2"}))],
     r"d\.jsonl:1 has no field 'steps'.*countdown"),
    ("eval-zero-batch-size", lambda s: ["eval", str(s.run), "--batch-size", "0"],
     r"--batch-size is 0"),
    # ---- data generate
    ("generate-unknown-task", lambda s: ["data", "generate", "nope", "--out", str(s.root / "o")],
     r"task\.name is 'nope', which is not known"),
    ("generate-zero-examples", lambda s: ["data", "generate", "countdown", "--n", "0",
                                          "--out", str(s.root / "o.jsonl")], r"--n is 0"),
    ("generate-impossible-option", lambda s: [
        "data", "generate", "countdown", "--operands", "9", "--out", str(s.root / "o.jsonl")],
     r"task\.operands = 9 is invalid"),
    ("generate-out-inside-a-file", lambda s: [
        "data", "generate", "countdown", "--n", "2", "--out", f"{s.config}/o.jsonl"],
     r"run\.yaml exists and is not a directory"),
]
# Numbers and usage errors, refused before the run directory, sweep file or method list named
# (all missing here) is even looked at.
CASES += [
    ("analyze-variance-above-1", lambda s: ["analyze", "nope", "--variance", "2"],
     r"--variance is 2\.0\. Fix: give a share of variance above 0 and at most 1, e\.g\. 0\.9"),
    ("analyze-variance-0", lambda s: ["analyze", "nope", "--variance", "0"],
     r"--variance is 0\.0\. Fix: give a share"),
    ("analyze-variance-nan", lambda s: ["analyze", "nope", "--variance", "nan"],
     r"--variance is nan\. Fix: give a share"),
    ("analyze-n-0", lambda s: ["analyze", "nope", "--n", "0"],
     r"--n is 0: the capture matrix compares at least 2 examples\. Fix: give --n 2 or more"),
    ("analyze-n-1", lambda s: ["analyze", "nope", "--n", "1"], r"--n is 1: the capture matrix"),
    ("analyze-top-k-0", lambda s: ["analyze", "nope", "--top-k", "0"],
     r"--top-k is 0\. Fix: give --top-k 1 or more"),
    ("analyze-option-without-value", lambda s: ["analyze", "nope", "--option", "ecr_k"],
     r"--option 'ecr_k' is not NAME=VALUE\. Fix: write e\.g\. --option ecr_k=50"),
    ("analyze-max-components-0", lambda s: ["analyze", "nope", "--max-components", "0"],
     r"--max-components is 0\. Fix: give --max-components 1 or more"),
    ("sweep-negative-workers", lambda s: ["sweep", "nope.yaml", "--workers", "-1", "--dry-run"],
     r"--workers is -1\. Fix: give --workers 0 or more"),
    ("demo-zero-steps", lambda s: ["demo", "--steps", "0", "--methods", "nope"],
     r"--steps is 0\. Fix: give --steps 1 or more"),
    ("not-a-number", lambda s: ["analyze", "nope", "--n", "abc"],
     r"argument --n: invalid int value: 'abc'\. Fix: see `latentlab analyze --help`"),
    ("missing-argument", lambda s: ["data", "generate", "countdown"],
     r"the following arguments are required: --out\. Fix: see `latentlab data generate --help`"),
    ("generate-over-an-existing-file", lambda s: [
        "data", "generate", "countdown", "--n", "5", "--out",
        str(s.rows("existing.jsonl", SOLVABLE))], r"existing\.jsonl already exists.*--force"),
    ("generate-into-a-directory", lambda s: [
        "data", "generate", "countdown", "--n", "5", "--force", "--out", str(s.run)],
     r"is a directory"),
    ("report-of-a-directory-without-runs", lambda s: [
        "report", str(s.file("empty/notes.txt", "no runs here").parent), "--out",
        str(s.root / "report")], r"no run with config\.yaml and results\.json in or below "
                                 r"\S+/empty\. Fix: give the directories of finished runs"),
    ("resume-without-a-run", lambda s: s.train("--resume"),
     r"--resume found no run to continue in .*new.*Fix: repeat the overrides"),
]
SUBPROCESS = {"existing-run-without-resume", "data-truncated-line"}


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(build: Build, message: str, request: pytest.FixtureRequest,
                                 finished_run: FinishedRun, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    sandbox = Sandbox(tmp_path, finished_run)
    argv = build(sandbox)
    before = sandbox.snapshot()
    capsys.readouterr()
    if request.node.callspec.id in SUBPROCESS:  # a real process: its exit status and stderr
        proc = subprocess.run([sys.executable, "-m", "latentlab", *argv], capture_output=True,
                              text=True, timeout=300)
        status, err = proc.returncode, proc.stderr
    else:
        status, err = main(argv), capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("latentlab: error:")]
    assert len(errors) == 1, err
    assert ERROR_LINE.match(errors[0]), errors[0]
    assert re.search(message, errors[0]), errors[0]
    after = sandbox.snapshot()
    assert after == before
    if table := os.environ.get(TABLE_ENV):  # docs/reliability.md's table, as measured
        line = errors[0].replace(str(tmp_path), "TMP").replace("|", "\\|")
        with open(table, "a", encoding="utf-8") as handle:
            handle.write(f"| {request.node.callspec.id} | `{line}` | {status} | "
                         f"{len(after)} files, sha256 unchanged |\n")
