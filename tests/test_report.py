"""`latentlab report`: built from tiny CPU sweeps, every figure is a valid PNG whose plotted
values are the runs' own numbers (means and standard deviations over seeds)."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import yaml
from test_sweep import SWEEPS, TINY, one_thread

from latentlab.errors import RunError
from latentlab.study.analysis import analyze_run
from latentlab.study.report import Line, Plot, build_report, render
from latentlab.study.sweep import run_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SENTENCES = ["The cat sat on the mat.", "A dog ran in the park.", "Rain fell on the town.",
             "Ships sail across the sea.", "Birds sing at dawn."]


def corpus(folder: Path) -> Path:
    """40 small documents of repeated sentences: a text task that trains in seconds."""
    folder.mkdir()
    for i in range(40):
        text = " ".join(SENTENCES[(i + j) % 5] for j in range(60))
        (folder / f"doc{i:02d}.txt").write_text(f"Book {i}\n{text}\n", encoding="utf-8")
    return folder


def read(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return (yaml.safe_load((run_dir / "config.yaml").read_text()),
            json.loads((run_dir / "results.json").read_text()))


def mean_std(values: list[float]) -> tuple[float, float, int]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
            len(values))


def assert_line(line: Line, x: Sequence[float], points: list[tuple[float, float, int]]) -> None:
    assert line.x == list(x)
    assert line.y == pytest.approx([p[0] for p in points], abs=1e-12)
    assert line.err == pytest.approx([p[1] for p in points], abs=1e-12)
    assert line.n == [p[2] for p in points]


def assert_png_shows(plot: Plot, png: Path, tmp_path: Path) -> None:
    """The file is a PNG matplotlib reads back, and the figure drawn from `plot` holds its
    numbers: one errorbar container per line, one image per heatmap, in order."""
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE), png
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    figure = render(plot, tmp_path / f"again-{plot.name}.png")
    axes = [ax for ax in figure.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    for ax, lines in zip(axes, plot.panels.values(), strict=False):
        drawn = ax.containers
        assert [c.get_label() for c in drawn] == [line.label for line in lines]
        for container, line in zip(drawn, lines, strict=True):
            xy = container.lines[0].get_xydata()
            assert xy[:, 0].tolist() == line.x and xy[:, 1].tolist() == pytest.approx(line.y)
    for ax, matrix in zip(axes, plot.heatmaps.values(), strict=False):
        assert ax.images[0].get_array().tolist() == matrix


@one_thread()
def test_report_of_a_tiny_countdown_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_sweep(TINY, out_dir=sweep)
    for run_dir in sorted(sweep.glob("soft-nl2-*")):  # capture.json for the N_L=2 runs
        analyze_run(run_dir, n=8)
    # 4-step runs score 0 everywhere: give every run its own test accuracy and validation
    # curve, so that a mix-up of runs, seeds or steps changes a plotted number.
    run_dirs = sorted(p.parent for p in sweep.glob("*/results.json"))
    for run_dir in run_dirs:  # the soft runs start from the No-CoT Base
        config, results = read(run_dir)
        assert results["starts_from"] == ("nocot" if config["model"]["init_from"] else None)
    for i, run_dir in enumerate(run_dirs):
        results = json.loads((run_dir / "results.json").read_text())
        results["test"]["accuracy"] = (i + 1) / 16
        (run_dir / "results.json").write_text(json.dumps(results))
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        for row in rows:
            if row.get("split") == "valid":
                row["accuracy"] = (i + row["step"]) / 32
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    report = build_report([sweep], tmp_path / "report")
    out = report.out
    plots = {p.name: p for p in report.plots}
    assert set(plots) == {"accuracy_vs_latents", "countdown_operands", "valid_accuracy",
                          "capture_heatmaps"}
    for name in ("report.md", "results.csv", "results.json", *(f"{p}.png" for p in plots)):
        assert (out / name).is_file(), name
    for plot in plots.values():
        assert_png_shows(plot, out / f"{plot.name}.png", tmp_path)

    # The expected numbers, straight from each run's files: groups of (method, N_L, steps).
    accuracy: dict[tuple[str, Any, int], list[float]] = defaultdict(list)
    curves: dict[tuple[str, Any, int], list[dict[int, float]]] = defaultdict(list)
    for run_dir in run_dirs:
        config, results = read(run_dir)
        key = (config["method"]["name"], config["method"].get("latent_budget"),
               config["train"]["max_steps"])
        accuracy[key].append(results["test"]["accuracy"])
        rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[key].append({r["step"]: r["accuracy"] for r in rows if r.get("split")})
    assert {k: len(v) for k, v in accuracy.items()} == {
        ("nocot", None, 3): 1, ("nocot", None, 4): 2, ("soft", 1, 4): 2, ("soft", 2, 4): 2}
    stat = {k: mean_std(v) for k, v in accuracy.items()}

    task = "countdown (3 operands)"
    soft, base_line, nocot = plots["accuracy_vs_latents"].panels[task]
    assert soft.label == "soft" and not soft.reference
    assert_line(soft, [1, 2], [stat["soft", 1, 4], stat["soft", 2, 4]])
    assert (base_line.label, nocot.label) == ("nocot (max_steps=3)", "nocot (max_steps=4)")
    assert base_line.reference and nocot.reference
    assert_line(base_line, [1, 2], [stat["nocot", None, 3]] * 2)
    assert_line(nocot, [1, 2], [stat["nocot", None, 4]] * 2)

    by_operands = plots["countdown_operands"].panels
    assert list(by_operands) == ["nocot (max_steps=3)", "nocot (max_steps=4)", "soft"]
    assert [line.label for line in by_operands["soft"]] == ["N_L=1", "N_L=2"]
    assert_line(by_operands["soft"][1], [3], [stat["soft", 2, 4]])
    assert_line(by_operands["nocot (max_steps=4)"][0], [3], [stat["nocot", None, 4]])

    labels = {("nocot", None, 3): "nocot (max_steps=3)", ("nocot", None, 4):
              "nocot (max_steps=4)", ("soft", 1, 4): "soft N_L=1", ("soft", 2, 4): "soft N_L=2"}
    drawn = {line.label: line for line in plots["valid_accuracy"].panels[task]}
    assert set(drawn) == set(labels.values())
    for key, label in labels.items():
        steps = sorted(set.intersection(*(set(c) for c in curves[key])))
        assert steps == ([2, 3] if key[2] == 3 else [2, 4])
        assert_line(drawn[label], steps, [mean_std([c[s] for c in curves[key]]) for s in steps])

    captured = json.loads((sweep / "soft-nl2-s0" / "analysis" / "capture.json").read_text())
    (title, matrix), = plots["capture_heatmaps"].heatmaps.items()
    assert title.startswith(f"{task}: soft N_L=2, seed 0") and matrix == captured["H"]

    # The raw numbers: a CSV row per run, and the figures' numbers in results.json.
    with (out / "results.csv").open() as handle:
        table = {r["run_dir"]: r for r in csv.DictReader(handle)}
    assert len(table) == len(run_dirs)
    for run_dir in run_dirs:
        assert float(table[str(run_dir)]["test_accuracy"]) == read(run_dir)[1]["test"]["accuracy"]
    assert table[str(sweep / "soft-nl2-s0")]["h_off"] == str(captured["h_off"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["figures"]["accuracy_vs_latents"]["panels"][task][0]["y"] == soft.y
    assert len(saved["groups"]) == 4 and saved["skipped"] == []
    markdown = (out / "report.md").read_text()
    assert all(f"]({name}.png)" in markdown for name in plots)
    low, high = stat["soft", 2, 4][0] * 100, stat["soft", 2, 4][1] * 100
    assert f"| soft N_L=2 | {low:.1f} ± {high:.1f} (2) |" in markdown

    # Runs without scores on the asked split are left out; none left is an error.
    with pytest.raises(RunError, match="none of the runs found has valid scores"):
        build_report([sweep], tmp_path / "valid", split="valid")


@one_thread()
def test_report_of_text_runs_shows_perplexity_by_position(tmp_path: Path) -> None:
    files = corpus(tmp_path / "data")
    sweep = tmp_path / "sweep"
    run_sweep(SWEEPS / "coprocessor_pretraining_cpu.yaml", [
        f"task.files=[{files}/*]", "task.heldout_fraction=0.3", "task.n_train=24",
        "task.n_valid=4", "task.n_test=4", "train.max_steps=3"], out_dir=sweep)
    # A run named twice (directly and inside the sweep) counts once.
    report = build_report([sweep, sweep / "liu-nl1-s0"], tmp_path / "report")
    plots = {p.name: p for p in report.plots}
    assert set(plots) == {"valid_perplexity", "perplexity_by_position"}
    assert len(report.runs) == 9
    for plot in plots.values():
        assert_png_shows(plot, report.out / f"{plot.name}.png", tmp_path)

    by_position = plots["perplexity_by_position"].panels
    methods = ["h1 N_L=1", "h1 N_L=2", "liu N_L=1", "liu N_L=2"]
    assert [line.label for line in by_position["perplexity"]] == [*methods, "frozen Base"]
    for label, line, reduction in zip(methods, by_position["perplexity"],
                                      by_position["reduction vs the Base"], strict=False):
        method, budget = label.split(" N_L=")
        tests = [read(sweep / f"{method}-nl{budget}-s{seed}")[1]["test"] for seed in (0, 1)]
        positions = range(len(tests[0]["perplexity_by_position"]))
        x = [float(k + 1) for k in positions]
        assert_line(line, x, [mean_std([t["perplexity_by_position"][k] for t in tests])
                              for k in positions])
        assert_line(reduction, x, [mean_std([
            100 * (t["base_perplexity_by_position"][k] - t["perplexity_by_position"][k])
            / t["base_perplexity_by_position"][k] for t in tests]) for k in positions])
    base = read(sweep / "h1-nl1-s0")[1]["test"]["base_perplexity_by_position"]
    assert by_position["perplexity"][-1].y == pytest.approx(base)
    assert "| nocot | " in (report.out / "report.md").read_text()

    # An unfinished run (its newest checkpoint is not the end of training) is left out.
    run_dir = sweep / "h1-nl2-s1"
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "state.json").read_text())
    (latest / "state.json").write_text(json.dumps({**state, "done": False}))
    # So is a run with a damaged file; a partial last metrics line (a killed run) is not.
    (sweep / "liu-nl2-s1" / "results.json").write_text('{"test": ')
    with (sweep / "liu-nl1-s1" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "split": "va')
    report = build_report([sweep], tmp_path / "report2")
    assert len(report.runs) == 7
    unfinished, damaged = report.skipped  # in path order
    assert unfinished == f"{run_dir}: training not finished (resume it)"
    assert damaged.startswith(f"{sweep / 'liu-nl2-s1'} has an unreadable file")
    assert "training not finished" in (report.out / "report.md").read_text()


def test_report_needs_runs(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"no run with config\.yaml and results\.json"):
        build_report([tmp_path], tmp_path / "report")
    with pytest.raises(RunError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "report")


def test_cli_report_errors_cleanly_without_runs(tmp_path: Path, capsys) -> None:
    from latentlab.cli import main

    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no run with config.yaml and results.json" in capsys.readouterr().err


def test_perplexity_against_the_orthogonality_weight(tmp_path: Path) -> None:
    from latentlab.study.report import Run, group_runs, perplexity_vs_orthogonality

    def run(weight: float, seed: int, ppl: float, budget: int = 8) -> Run:
        config = {"task.name": "text", "method.name": "liu", "method.latent_budget": budget,
                  "method.orthogonality": weight, "train.seed": seed}
        return Run(tmp_path / f"{weight}-{seed}-{budget}", config,
                   {"test": {"perplexity": ppl}}, {}, {})

    runs = [run(0.0, 0, 10.0), run(0.0, 1, 12.0), run(3.0, 0, 15.0), run(3.0, 1, 17.0),
            run(0.0, 0, 9.0, budget=16)]  # one λ only at N_L = 16: no line for it
    plot = perplexity_vs_orthogonality(group_runs(runs), "test")
    assert plot is not None and list(plot.panels) == ["text"]
    (line,) = plot.panels["text"]
    assert line.label == "liu N_L=8" and line.x == [0.0, 3.0] and line.y == [11.0, 16.0]
    assert line.n == [2, 2] and line.err == pytest.approx([2 ** 0.5, 2 ** 0.5])
    assert perplexity_vs_orthogonality(group_runs(runs[:2]), "test") is None


def test_runs_of_one_method_that_started_from_different_runs_are_told_apart(
        tmp_path: Path) -> None:
    # results.json's starts_from (the method of the model.init_from run; null: random init)
    # separates the groups; runs written before it was recorded stay unlabelled.
    for name, starts, accuracy in [("scratch", None, 0.5), ("tuned", "cot", 0.8),
                                   ("old", "absent", 0.6)]:
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        config = {"task": {"name": "prosqa"}, "method": {"name": "nocot"},
                  "train": {"seed": 0}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        results: dict[str, Any] = {"test": {"accuracy": accuracy}}
        if starts != "absent":
            results["starts_from"] = starts
        (run_dir / "results.json").write_text(json.dumps(results))
    markdown = (build_report([tmp_path / "runs"], tmp_path / "report").out
                / "report.md").read_text()
    assert "| nocot (from=random init) | 50.0 ± 0.0 (1) |" in markdown
    assert "| nocot (from=cot) | 80.0 ± 0.0 (1) |" in markdown
    assert "| nocot (from=None) | 60.0 ± 0.0 (1) |" in markdown
