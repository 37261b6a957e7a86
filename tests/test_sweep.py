"""`latentlab sweep`: planning a grid, skipping finished runs, resuming, failures, workers."""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import metric_rows

from latentlab.config import load_config
from latentlab.engine.trainer import Interrupted
from latentlab.errors import ConfigError, RunError
from latentlab.recipes import RunDir, train
from latentlab.study.sweep import load_sweep, plan_table, run_sweep
from latentlab.study.sweep.execute import LOCK_FILE, STATUS_FILE, format_table

SWEEPS = Path(__file__).parents[1] / "configs" / "sweeps"
TINY = SWEEPS / "tiny.yaml"
TINY_JOBS = ["upstream-base", "nocot-s0", "nocot-s1", "soft-nl1-s0", "soft-nl1-s1",
             "soft-nl2-s0", "soft-nl2-s1"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Train with one thread: on a few shared cores, more threads than free cores make these
    tiny runs several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_sweep(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def statuses(out: Path) -> dict[str, dict[str, Any]]:
    return {j["name"]: j for j in json.loads((out / STATUS_FILE).read_text())["jobs"]}


def test_tiny_sweep_plan_shares_the_base_and_applies_n_l_to_soft_only(tmp_path: Path) -> None:
    plan = load_sweep(TINY, out_dir=tmp_path)
    assert [j.name for j in plan.jobs] == TINY_JOBS
    jobs = {j.name: j for j in plan.jobs}
    base = jobs["upstream-base"]
    assert base.kind == "upstream" and base.config is not None
    assert base.config.method.name == "nocot" and base.config.train.max_steps == 3
    for job in plan.jobs:
        assert job.error is None and job.config is not None
        assert job.run_dir == tmp_path / job.name and job.config.run_dir() == job.run_dir
        if job.name.startswith("soft"):
            assert job.needs == ("upstream-base",)
            assert job.config.model.init_from == str(base.run_dir)
            assert job.config.method.latent_budget == int(job.name[len("soft-nl")])
        elif job.name.startswith("nocot"):
            assert job.needs == () and job.config.model.init_from is None
            assert "method.latent_budget" not in job.assignment
        assert job is base or job.config.train.seed == int(job.name[-1])
    # The command line's overrides come last, for every job and upstream.
    plan = load_sweep(TINY, ["train.lr=0.01"], out_dir=tmp_path)
    assert {j.config.train.lr for j in plan.jobs if j.config} == {0.01}


def test_grid_over_base_files_with_inherited_upstreams_include_and_exclude(
        tmp_path: Path) -> None:
    tiny = yaml.safe_load(TINY.read_text())["config"]
    (tmp_path / "count.yaml").write_text(yaml.safe_dump(tiny))
    prosqa = {**tiny, "task": {"name": "prosqa", "n_train": 20, "n_valid": 4}}
    (tmp_path / "pros.yaml").write_text(yaml.safe_dump(prosqa))
    sweep = write_sweep(tmp_path / "s.yaml", {
        "out_dir": str(tmp_path / "out"),
        "grid": {"base": ["count.yaml", "pros.yaml"], "task.operands": [3, 4],
                 "method.name": ["liu", "h1"], "train.seed": [0, 1],
                 "model.init_from": ["${upstream.base}"]},
        "apply_if": {"task.operands": {"base": ["count.yaml"]}},
        "exclude": [{"method.name": "h1", "train.seed": 1}],
        "include": [{"base": "pros.yaml", "method.name": "coconut",
                     "model.init_from": "${upstream.cot}"}],
        "upstream": {"base": {"inherit": ["task.operands", "train.seed"]},
                     "cot": {"config": "pros.yaml", "overrides": ["method.name=cot",
                                                                  "model.init_from=${upstream.base}"]}},
    })
    jobs = {j.name: j for j in load_sweep(sweep).jobs}
    ups = [n for n, j in jobs.items() if j.kind == "upstream"]
    # One Base per (base file, operands, seed) that a job needs, each before its first user;
    # ProsQA has no operands, so its jobs share one Base per seed.
    assert ups == ["upstream-base-count-op3-s0", "upstream-base-count-op3-s1",
                   "upstream-base-count-op4-s0", "upstream-base-count-op4-s1",
                   "upstream-base-pros-s0", "upstream-base-pros-s1", "upstream-cot"]
    grid = [n for n, j in jobs.items() if j.kind == "grid"]
    assert grid == ["count-op3-liu-s0", "count-op3-liu-s1", "count-op3-h1-s0",
                    "count-op4-liu-s0", "count-op4-liu-s1", "count-op4-h1-s0",
                    "pros-liu-s0", "pros-liu-s1", "pros-h1-s0", "pros-coconut-from-cot"]
    assert jobs["count-op4-liu-s1"].needs == ("upstream-base-count-op4-s1",)
    assert jobs["count-op4-liu-s1"].config.task.operands == 4
    assert jobs["upstream-base-count-op4-s1"].config.train.seed == 1
    # An upstream of an upstream (Coconut from a CoT model trained from the Base), planned
    # before it. The include gives no seed: its Base is the seed-0 one (the default), not a
    # second run of the same config.
    assert jobs["upstream-cot"].needs == ("upstream-base-pros-s0",)
    assert jobs["pros-coconut-from-cot"].needs == ("upstream-cot",)
    assert all(j.error is None for j in jobs.values())


@pytest.mark.parametrize(("data", "message"), [
    ({"gird": {}}, r"unknown key gird.*did you mean grid\?"),
    ({"upstream": {"b": {"confg": "x.yaml"}}}, r"unknown key upstream\.b\.confg.*config\?"),
    ({"base": None, "config": None}, "give exactly one of base: FILE, config:"),
    ({"base": "x.yaml"}, "comes from base and config"),
    ({"grid": {"method.name": []}}, r"grid\.method\.name = \[\] is invalid: List should "),
    ({"grid": {"method.name": ["soft"]},
      "apply_if": {"method.latent_budget": {"method.name": ["soft"]}}},
     "apply_if.method.latent_budget names method.latent_budget, which is not a grid key"),
    ({"exclude": [{"train.sed": 0}]}, "exclude names train.sed, which is not a grid key"),
    ({"grid": {"out_dir": ["a"]}}, "grid sets out_dir"),
    ({"grid": {"model.init_from": ["${upstream.nope}"]}}, r"\$\{upstream.nope\} names no "),
    ({"upstream": {"a": {"overrides": ["model.init_from=${upstream.a}"]}},
      "grid": {"model.init_from": ["${upstream.a}"]}}, "upstream a starts from itself"),
    ({"overrides": ["train.lr"]}, "not of the form key=value"),
    ({"workers": -1}, "workers = -1 is invalid"),
    ({"gpus": "all"}, "gpus = 'all' is invalid"),
])
def test_sweep_file_mistakes_name_the_key_and_the_fix(tmp_path: Path, data: dict[str, Any],
                                                      message: str) -> None:
    spec = {"config": {"task": {"name": "countdown"}, "method": {"name": "nocot"}},
            "out_dir": str(tmp_path / "out"), **data}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path / "s.yaml", spec))


@one_thread()
def test_sweep_skips_finished_runs_resumes_stopped_ones_and_reports_failures(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = yaml.safe_load(TINY.read_text())
    # Failures of every kind beside the tiny grid: at run time (every example is longer than
    # max_length), in an upstream (its job is not attempted) and in the config itself.
    data["upstream"]["broken"] = {"overrides": ["train.max_length=8"]}
    data["include"] = [{"method.name": "nocot", "train.max_length": 8},
                       {"method.name": "soft", "model.init_from": "${upstream.broken}"},
                       {"method.name": "soft", "method.latent_budget": 0}]
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    failing = {"upstream-broken": ("failed", "longer than train.max_length=8"),
               "nocot-max_length8": ("failed", "longer than train.max_length=8"),
               "soft-from-broken": ("upstream_failed", "upstream upstream-broken did not"),
               "soft-nl0": ("failed", "method.latent_budget = 0 is invalid")}

    result = run_sweep(sweep, out_dir=out)
    status = statuses(out)
    assert list(status) == [*TINY_JOBS[:1], *list(failing)[:1], *TINY_JOBS[1:],
                            *list(failing)[1:]]
    assert not result.ok
    for name in TINY_JOBS:
        assert status[name]["status"] == "trained", status[name]
        assert RunDir(out / name).is_finished()
        assert status[name]["result"] == "test accuracy " + format(json.loads(
            (out / name / "results.json").read_text())["test"]["accuracy"], ".3f")
    for name, (state, message) in failing.items():
        assert status[name]["status"] == state and message in status[name]["error"], name
    table = format_table(result.jobs)  # what the sweep prints last
    assert "soft-nl0" in table and "errors:" in table

    dry_run = plan_table(load_sweep(sweep, out_dir=out))
    assert "nocot-s0           finished  test accuracy" in dry_run
    assert "upstream-broken    train" in dry_run and "soft-nl0           invalid" in dry_run

    # Again: nothing finished trains again (its files are untouched); the failures fail again.
    stamps = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in TINY_JOBS}
    run_sweep(sweep, out_dir=out)
    status = statuses(out)
    assert all(status[n]["status"] == "already_done" for n in TINY_JOBS)
    assert stamps == {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in TINY_JOBS}
    assert {n: status[n]["status"] for n in failing} == {n: s for n, (s, _) in failing.items()}

    # A job stopped mid-training (a checkpoint at step 2 of 4, no final scores) is not
    # finished: the sweep resumes it, and it ends as the uninterrupted run did.
    job = next(j for j in load_sweep(sweep, out_dir=out).jobs if j.name == "nocot-s1")
    uninterrupted = metric_rows(job.run_dir)
    for path in sorted(job.run_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    train(load_config(base=job.config.model_dump(), overrides=["train.stop_after=2"]))
    assert not (job.run_dir / "results.json").exists() and not RunDir(job.run_dir).is_finished()
    run_sweep(sweep, out_dir=out)
    status = statuses(out)
    assert status["nocot-s1"]["status"] == "resumed"
    assert all(status[n]["status"] == "already_done" for n in TINY_JOBS if n != "nocot-s1")
    assert RunDir(job.run_dir).is_finished() and metric_rows(job.run_dir) == uninterrupted

    # A finished run whose config is not the job's any more is reported, not passed off.
    run_sweep(sweep, ["train.lr=0.001"], out_dir=out)
    status = statuses(out)
    assert status["nocot-s0"]["status"] == "failed"
    assert "finished run of another config (it differs in train.lr)" in status["nocot-s0"]["error"]
    # Keys a resume may change (how a run ends, runs or logs) leave it the same experiment.
    run_sweep(sweep, ["train.stop_after=1000", "train.data_workers=0", "model.compile=false",
                      "train.save_every_minutes=1"], out_dir=out)
    assert all(statuses(out)[n]["status"] == "already_done" for n in TINY_JOBS)


def test_an_interrupted_job_stops_the_sweep_and_is_marked(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(config: Any, resume: bool = False) -> None:
        raise Interrupted("stopped by signal SIGINT after step 2; a checkpoint was saved")

    monkeypatch.setattr("latentlab.study.sweep.execute.train", interrupted)  # in this process
    with pytest.raises(Interrupted):
        run_sweep(TINY, out_dir=tmp_path / "out")
    status = statuses(tmp_path / "out")
    assert [s["status"] for s in status.values()] == ["interrupted"] + ["pending"] * 6

    class CtrlC:  # the sweep's clock, as if Ctrl-C came while a worker ran
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr("latentlab.study.sweep.execute.time", CtrlC)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(TINY, workers=2, out_dir=tmp_path / "workers")
    status = statuses(tmp_path / "workers")
    # Two workers ran the Base and nocot-s0 (each got SIGINT and was waited for); the rest
    # had not started.
    assert [s["status"] for s in status.values()] == ["interrupted"] * 2 + ["pending"] * 5


def test_a_second_sweep_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("out").mkdir()
    with (tmp_path / "out" / LOCK_FILE).open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep holds it
        with pytest.raises(RunError, match="another sweep is running in"):
            run_sweep(TINY, out_dir=tmp_path / "out")


def test_worker_subprocesses_wait_for_their_upstream_and_report_failures(
        tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["grid"] = {"method.name": ["soft"], "model.init_from": ["${upstream.base}"]}
    data.pop("apply_if")
    data["include"] = [{"method.name": "nocot", "train.max_length": 8}]
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    out = tmp_path / "out"
    # Two workers without GPUs, each job a `python -m latentlab train job.yaml`: the Base and
    # the failing job start together, the soft run once the Base has finished.
    result = run_sweep(sweep, workers=2, out_dir=out)
    status = statuses(out)
    assert {n: s["status"] for n, s in status.items()} == {
        "upstream-base": "trained", "run": "trained", "nocot-max_length8": "failed"}
    assert not result.ok
    config = load_config(out / "run" / "job.yaml")
    assert config.model.init_from == str(out / "upstream-base") and config.train.max_steps == 4
    assert RunDir(out / "run").is_finished()
    assert "training from step 0" in (out / "run" / "job.log").read_text()
    error = status["nocot-max_length8"]["error"]
    assert "longer than train.max_length=8" in error and "exit status 2" in error
    # A second pass starts no worker: everything finished is skipped.
    result = run_sweep(sweep, workers=2, out_dir=out)
    assert [j.status for j in result.jobs] == ["already_done", "already_done", "failed"]


def test_shipped_sweep_files_plan_into_valid_jobs() -> None:
    files = {f.stem: f for f in SWEEPS.glob("*.yaml")}
    for study in ("dual_architecture", "orthogonality", "latent_sft_r",
                  "coprocessor_pretraining"):
        assert {study, f"{study}_cpu"} <= set(files)
    for path in files.values():
        plan = load_sweep(path)
        assert plan.jobs and len({j.name for j in plan.jobs}) == len(plan.jobs), path
        assert all(j.error is None for j in plan.jobs), (path, [j.error for j in plan.jobs])
    sft = {j.name: j for j in load_sweep(files["latent_sft_r"]).jobs}
    assert sft["r4-s1"].needs == ("upstream-encoder-r4-s1",)
    assert sft["upstream-encoder-r4-s1"].needs == ("upstream-cot",)
    assert sft["r4-s1"].config.method.encoder_from == str(sft["upstream-encoder-r4-s1"].run_dir)


def test_cli_sweep_dry_run_prints_the_plan(capsys) -> None:
    from latentlab.cli import main

    root = Path(__file__).parents[1]
    assert main(["sweep", str(root / "configs/sweeps/tiny.yaml"), "--dry-run"]) == 0
    assert "upstream" in capsys.readouterr().out


def test_a_part_of_a_sweep_is_its_jobs_by_name_or_pattern_with_their_upstreams(capsys) -> None:
    from latentlab.cli import main
    from latentlab.study.sweep import select

    path = SWEEPS / "dual_architecture_prosqa.yaml"
    plan = load_sweep(path)
    part = select(plan, ["liu-*-s0", "h2-nl4-s1"])
    assert [j.name for j in part.jobs] == [
        "upstream-cot-s0", "upstream-base-s0", "upstream-cot-s1", "upstream-base-s1",
        "liu-nl1-s0", "liu-nl4-s0", "liu-nl8-s0", "liu-nl16-s0", "h2-nl4-s1"]
    assert part.jobs[4].config == next(j for j in plan.jobs if j.name == "liu-nl1-s0").config
    with pytest.raises(ConfigError, match=r"has no job nope\*"):
        select(plan, ["liu-nl1-s0", "nope*"])
    assert main(["sweep", str(path), "--jobs", "soft-nl16-s2", "--dry-run"]) == 0
    printed = capsys.readouterr().out.split()
    assert "soft-nl16-s2" in printed and "upstream-base-s2" in printed
    assert "soft-nl16-s1" not in printed and "upstream-cot-s0" not in printed
