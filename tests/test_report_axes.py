"""`latentlab report`'s accuracy axes stay within 0..100% (issue 21: runs all at 0% accuracy
drew flat lines on a -4%..4% axis). Built from tiny fake run directories: a config, the
results and a validation curve each, no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

import latentlab.study.report
from latentlab.study.report import Plot, build_report

ACCURACY_FIGURES = {"accuracy_vs_latents", "countdown_operands", "valid_accuracy"}


def fake_run(root: Path, method: str, latent_budget: int | None, seed: int,
             accuracy: float) -> None:
    """A finished run (no checkpoints: its results are final) scoring `accuracy` on test and
    on every validation, with a validation perplexity far above 1."""
    run_dir = root / f"{method}-{latent_budget}-s{seed}"
    run_dir.mkdir(parents=True)
    config = {"task": {"name": "countdown", "operands": 3},
              "method": {"name": method, **({"latent_budget": latent_budget}
                                            if latent_budget else {})},
              "train": {"seed": seed}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "results.json").write_text(json.dumps(
        {"task": "countdown", "method": method, "test": {"accuracy": accuracy, "n": 8}}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "split": "valid", "accuracy": accuracy,
                    "perplexity": 12.0 + step}) + "\n" for step in (2, 4)))


@pytest.mark.parametrize("scores", [
    (0.0, 0.0),  # every run at 0%: matplotlib centres the flat lines on 0
    (1.0, 1.0),  # every run at 100%
    (0.0, 0.3),  # seeds apart: a standard deviation reaching below 0%
    (1.0, 0.7),  # ... and above 100%
], ids=["all-zero", "all-perfect", "spread-low", "spread-high"])
def test_accuracy_axes_stay_within_0_and_100_percent(
        scores: tuple[float, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for seed, accuracy in enumerate(scores):
        for method, budget in (("soft", 1), ("soft", 2), ("nocot", None)):
            fake_run(runs, method, budget, seed, accuracy)
    figures: dict[str, Figure] = {}
    render = latentlab.study.report.render

    def keep(plot: Plot, path: Path) -> Figure:
        figures[plot.name] = render(plot, path)
        return figures[plot.name]

    monkeypatch.setattr(latentlab.study.report, "render", keep)
    report = build_report([runs], tmp_path / "report")
    assert report.skipped == [] and len(report.runs) == 6
    assert ACCURACY_FIGURES | {"valid_perplexity"} <= set(figures)

    for name in ACCURACY_FIGURES:
        panels = [ax for ax in figures[name].axes if ax.get_visible()]
        assert panels, name
        for ax in panels:
            low, high = ax.get_ylim()
            assert 0.0 <= low < high <= 1.0, (name, low, high)
            for container in ax.containers:
                line = container.lines[0]
                assert all(low <= y <= high for y in line.get_ydata()), name
                assert not line.get_clip_on()  # a line at 0% or 100% is not hidden or halved
            assert isinstance(ax.yaxis.get_major_formatter(), PercentFormatter), name

    # Perplexity is no share: its axis keeps matplotlib's limits.
    (ax,) = [ax for ax in figures["valid_perplexity"].axes if ax.get_visible()]
    low, high = ax.get_ylim()
    assert low < 14.0 < high and high > 1.0
