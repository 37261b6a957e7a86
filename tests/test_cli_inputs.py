"""The CLI's inputs (issue 21): numeric options checked before any work, `data generate`
refusing to replace a file or write into a directory, interrupts worded right, and `eval` and
`analyze` summarised in words on stderr while the last stdout line stays the JSON.

Every error is the one line `latentlab: error: PROBLEM. Fix: FIX.`, exit status 2. No case
loads a model: the checks come first, and the summaries are of patched results.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from latentlab import cli
from latentlab.cli import main
from latentlab.errors import ConfigError, PathError
from latentlab.tasks import CountdownConfig, CountdownTask, ProsQAConfig, ProsQATask, Task

ERROR_LINE = re.compile(r"^latentlab: error: (?P<problem>.+)\. Fix: (?P<fix>.+)\.$")


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line on stderr, checked against the error format."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert ERROR_LINE.match(lines[0]), lines[0]
    return lines[0]


def files_in(folder: Path) -> set[str]:
    """Every name below `folder`, hidden ones (temporary files) included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------- numeric and usage errors
# (bad numbers and usage errors of every sub-command are cases of tests/test_bad_input.py)

def test_analyze_run_names_a_too_small_n_not_the_split(tmp_path: Path) -> None:
    from latentlab.study.analysis import analyze_run

    with pytest.raises(ConfigError, match="n is 1: the capture matrix compares at least 2") \
            as err:
        analyze_run(tmp_path / "nope", n=1)
    assert err.value.fix == "analyse 2 examples or more"


# ---------------------------------------------------------------- data generate --out

def generate(out: Path, *extra: str) -> int:
    return main(["data", "generate", "countdown", "--n", "5", "--out", str(out), *extra])


def test_generate_refuses_to_replace_a_file_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "existing.jsonl"
    out.write_text("20,000 rows of earlier work\n", encoding="utf-8")
    assert generate(out) == 2
    line = error_line(capsys)
    assert line == (f"latentlab: error: --out {out} already exists. "
                    "Fix: add --force or choose another --out.")
    assert out.read_text(encoding="utf-8") == "20,000 rows of earlier work\n"
    assert files_in(tmp_path) == {"existing.jsonl"}

    assert generate(out, "--force") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 5
    assert len(out.read_text(encoding="utf-8").splitlines()) == 5
    assert files_in(tmp_path) == {"existing.jsonl"}  # no temporary file left


@pytest.mark.parametrize("force", [False, True])
def test_generate_into_a_directory_names_it_and_leaves_nothing(
        force: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    (out / "kept.jsonl").parent.mkdir()
    (out / "kept.jsonl").write_text("{}\n", encoding="utf-8")
    assert generate(out, *(["--force"] if force else [])) == 2
    line = error_line(capsys)
    assert f"--out {out} is a directory. Fix: give the path of a file" in line
    assert ".tmp" not in line
    assert files_in(tmp_path) == {"data", "data/kept.jsonl"}


def countdown() -> CountdownTask:
    return CountdownTask(CountdownConfig(operands=3, max_operand=9, max_target=30))


def prosqa() -> ProsQATask:
    return ProsQATask(ProsQAConfig())


@pytest.mark.parametrize("make", [countdown, prosqa], ids=["countdown", "prosqa"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(
        make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task: Task = make()
    examples = task.generate("train", 3, seed=0)
    path = tmp_path / "data.jsonl"
    path.write_text("old\n", encoding="utf-8")

    def no_space(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        task.write(examples, path)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert files_in(tmp_path) == {"data.jsonl"}


def test_a_write_interrupted_midway_leaves_no_temporary_file(tmp_path: Path) -> None:
    examples = countdown().generate("train", 3, seed=0)

    def interrupted() -> Any:
        yield examples[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        countdown().write(interrupted(), tmp_path / "data.jsonl")
    assert files_in(tmp_path) == set()


def test_writing_to_a_directory_names_the_directory(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(PathError, match=f"^{re.escape(str(folder))} is a directory, not a "
                                        "file") as err:
        countdown().write(countdown().generate("train", 2, seed=0), folder)
    assert ".tmp" not in str(err.value)
    assert files_in(tmp_path) == {"data"}


# ---------------------------------------------------------------- interrupts

def ctrl_c() -> None:
    raise KeyboardInterrupt  # as Python's SIGINT handler does: no text


def sigterm() -> None:
    signal.raise_signal(signal.SIGTERM)  # main's handler turns it into a KeyboardInterrupt


def test_an_interrupt_names_its_signal(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for interrupt, name in ((ctrl_c, "SIGINT"), (sigterm, "SIGTERM")):
        def command(args: Any, interrupt: Any = interrupt) -> int:
            interrupt()
            raise AssertionError("the signal did not stop the command")

        monkeypatch.setattr(cli, "cmd_report", command)
        assert main(["report", "runs", "--out", "report"]) == 130
        line = error_line(capsys)
        assert line.startswith(f"latentlab: error: interrupted by {name}. Fix: run the "
                               "command again"), line


# ---------------------------------------------------------------- summaries

EVAL_RESULTS = {"task": "countdown", "method": "cot", "split": "test", "data": None,
                "accuracy": 0.826, "n": 1000, "latent_steps": 3.25, "step_edges": 0.5,
                "run_dir": "runs/x", "best_step": 8}


def test_eval_summarises_in_words_on_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import latentlab.recipes.training

    monkeypatch.setattr(latentlab.recipes, "evaluate_run", lambda *args: dict(EVAL_RESULTS))
    assert main(["eval", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1]) == EVAL_RESULTS  # what scripts parse
    assert err.splitlines() == [
        "test accuracy 82.6% on 1000 examples (cot on countdown, run runs/x, best model from "
        "step 8)",
        "other metrics: latent_steps 3.25, step_edges 0.5"]


def test_eval_summary_of_a_data_file_and_an_unknown_best_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import latentlab.recipes.training

    results = {**EVAL_RESULTS, "data": "d.jsonl", "accuracy": 0.0, "n": 8, "best_step": None}
    del results["latent_steps"], results["step_edges"]
    monkeypatch.setattr(latentlab.recipes, "evaluate_run", lambda *args: dict(results))
    assert main(["eval", str(tmp_path), "--data", "d.jsonl"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "accuracy 0.0% on 8 examples of d.jsonl (cot on countdown, run runs/x, best model)"]


def test_eval_summary_of_a_text_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import latentlab.recipes.training

    results = {"task": "text", "method": "h1", "split": "valid", "n": 40, "perplexity": 12.3456,
               "base_perplexity": 15.0, "perplexity_by_position": [11.0, 13.0],
               "run_dir": "runs/t"}
    monkeypatch.setattr(latentlab.recipes, "evaluate_run", lambda *args: dict(results))
    assert main(["eval", str(tmp_path), "--split", "valid"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "valid perplexity 12.346 on 40 windows (h1 on text, run runs/t, best model)",
        "other metrics: base_perplexity 15"]


ANALYSIS = {"run_dir": "runs/s", "task": "countdown", "method": "soft", "split": "valid",
            "n": 500, "latent_budget": 3, "dim": 64, "H": [[1.0] * 3] * 3, "h_off": 0.9123,
            "silhouette": 0.1234, "components": [3, 4, 4], "variance": 0.9,
            "max_components": 16, "chance": 0.0573, "readout": "lm_head",
            "files": ["runs/s/analysis/capture.json", "runs/s/analysis/capture.png"]}


@pytest.mark.parametrize("latent_sft", [None, {"k": 50, "ecr_at_k": 0.5321, "n_eff_mean": 1.8,
                                               "summary": "ECR@50 0.532, mean N_eff 1.800"}])
def test_analyze_summarises_in_words_on_stderr(latent_sft: dict[str, Any] | None,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import latentlab.study.analysis

    summary = {**ANALYSIS, **({"latent_sft": latent_sft} if latent_sft else {})}
    monkeypatch.setattr(latentlab.study.analysis, "analyze_run", lambda *args: dict(summary))
    assert main(["analyze", "runs/s"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1]) == summary
    expected = [
        "soft on countdown, valid split, 500 examples: H_off 0.912 (isotropic chance 0.057), "
        "silhouette 0.123",
        "subspace dimensions per slot: 3 4 4 (explaining 0.9 of each slot's variance, at most "
        "16)",
        "files: runs/s/analysis/capture.json, runs/s/analysis/capture.png"]
    if latent_sft:
        expected.insert(2, "latent_sft: ECR@50 0.532, mean N_eff 1.800")
    assert err.splitlines() == expected
