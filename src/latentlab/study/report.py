"""`latentlab report`: a Markdown report with PNG figures from finished runs (paper A's views).

Reads each run directory's `config.yaml`, `results.json`, `metrics.jsonl` and, where
`latentlab analyze` wrote one, `analysis/capture.json`; a directory that is not a run is searched
for runs below it (a sweep's out_dir). Runs that differ only in their seed (and in where they
started from, `model.init_from`, which follows the seed when the Base does) form a group, shown
as the mean and the standard deviation over its seeds.

Figures (each built only when some run has the data): accuracy against `N_L` per method and
task; Countdown accuracy by operand count, one line per `N_L`; validation curves (accuracy,
perplexity); perplexity by position after the latents (Coprocessor text runs); capture
heatmaps side by side; accuracy axes read in % and never leave 0..100%. Plus a method x task
table, `results.csv` (one row per run) and `results.json` (runs, groups, and every figure's
plotted numbers). docs/sweeps_reports.md describes them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from latentlab.config import flatten_dotted
from latentlab.engine.checkpoint import atomic_write_text
from latentlab.errors import DataError, RunError
from latentlab.recipes.run_dir import CONFIG_FILE, RESULTS_FILE, RESUMABLE_CHANGES, RunDir
from latentlab.recipes.run_dir import find_runs as runs_below
from latentlab.study.claims import GROUP_FIELDS, Checked, check, claims_table, read_claims

Split = Literal["valid", "test"]
# Config keys that never make runs different experiments: what a resume may change (where a
# run lives, how it was stopped, run or logged), its seed, how it was scored (and, see
# `_ignored`, the runs it started from).
IGNORED_KEYS = RESUMABLE_CHANGES | {"train.seed", "eval.splits", "eval.batch_size"}
# Keys every figure reads by name; the other keys that vary across runs form a group's variant.
AXIS_KEYS = frozenset({"task.name", "task.operands", "method.name", "method.latent_budget"})
TITLE_WIDTH = 45  # characters per line of a panel title (long variants wrap)
LEGEND_WIDTH = 60  # characters per line of a legend label
LEGEND_LINE = 0.17  # inches of figure height per legend line (7-point text)
MAX_TICKS = 12  # more distinct x values than this keep matplotlib's own ticks
CSV_COLUMNS = ("run_dir", "task", "operands", "method", "latent_budget", "variant", "seed",
               "model", "split", "accuracy", "perplexity", "n", "valid_accuracy",
               "valid_perplexity", "test_accuracy", "test_perplexity", "h_off", "silhouette",
               "trainable_parameters", "train_flops_per_example",
               "inference_flops_per_example", "accuracy_latents_zeros", "accuracy_latents_mean",
               "accuracy_latents_shuffled")
ABLATED = ("zeros", "mean", "shuffled")  # results.json's latent_dependence (recipes.dependence)
ORTHOGONALITY = "method.orthogonality"  # the weight λ of the orthogonality figure


# ------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Run:
    """One finished run, as the report sees it."""

    run_dir: Path
    config: dict[str, Any]  # config.yaml flattened to dotted keys
    results: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]]  # validation metric -> (step, value) rows
    analyses: dict[str, Any]  # every analysis/NAME.json, by NAME (the method's own too)

    @property
    def capture(self) -> dict[str, Any] | None:
        """analysis/capture.json (`latentlab analyze`), where written."""
        return self.analyses.get("capture")

    def capture_number(self, key: str) -> float | None:
        """A number of analysis/capture.json (`h_off`, `silhouette`), None where not written."""
        return number_at(self.analyses, "capture", key)

    def get(self, key: str) -> Any:
        return self.config.get(key)

    @property
    def latent_budget(self) -> int | None:
        """N_L as the method declared it (`Method.latent_budget`, in results.json); runs
        written before it was recorded: their `method.latent_budget` option."""
        budget = self.results.get("latent_budget", self.get("method.latent_budget"))
        return budget if isinstance(budget, int) else None

    def ablated(self, split: str, kind: str) -> float | None:
        """Accuracy with the latents replaced (`latent_dependence`), where recorded."""
        return number_at(self.results, split, "latent_dependence", kind)

    def flops(self, which: str) -> float | None:
        """Forward FLOPs per example (`train_forward` or `inference`), where recorded."""
        return number_at(self.results, "flops_per_example", which)

    def score(self, split: str, metric: str) -> float | None:
        return number_at(self.results, split, metric)


def number_at(node: Any, *keys: str) -> float | None:
    """The number under `keys` in nested mappings (a run's results or analyses), else None."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return float(node) if isinstance(node, int | float) else None


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories (`config.yaml` beside `results.json`) given directly or found below a
    given directory, each once, in path order."""
    paths = list(paths)  # read twice: the error below names them
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise RunError(f"{missing[0]} does not exist", "give run directories or a sweep's out_dir")
    found = [run.path for run in runs_below(paths)]
    if not found:
        raise RunError(f"no run with {CONFIG_FILE} and {RESULTS_FILE} in or below "
                       f"{', '.join(str(p) for p in paths)}",
                       "give the directories of finished runs, or a sweep's out_dir")
    return found


def read_run(run_dir: Path) -> Run:
    """A run's files. config.yaml is read as plain YAML, not validated: a report must still
    read runs written by an older version of the config schema. An unreadable file raises
    `DataError`; a partial last line of metrics.jsonl (a killed run) is skipped."""
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
        analyses = {f.stem: json.loads(f.read_text(encoding="utf-8"))
                    for f in sorted((run_dir / "analysis").glob("*.json"))}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{run_dir} has an unreadable file ({' '.join(str(exc).split())})",
                        "repair or remove it") from None
    if not (isinstance(config, dict) and isinstance(results, dict)):
        raise DataError(f"{run_dir}: {CONFIG_FILE} or {RESULTS_FILE} is not a mapping",
                        "point the report at latentlab run directories")
    curves: dict[str, list[tuple[int, float]]] = {}
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(row, dict) and row.get("split") == "valid"):
            continue
        for name in ("accuracy", "perplexity"):
            if isinstance(row.get(name), int | float):
                curves.setdefault(name, []).append((int(row["step"]), float(row[name])))
    # Where a run started (the upstream's method) tells apart two runs of one method, one
    # from random weights and one fine-tuned from another method's model. Runs written
    # before results.json recorded it: unknown (None).
    start = (results["starts_from"] or "random init") if "starts_from" in results else None
    config = flatten_dotted(config) | {"from": start}
    return Run(run_dir, config, results, curves, analyses)


# ------------------------------------------------------------------------------------------
# Grouping over seeds


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (0 with one seed)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.fmean(values),
                   statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


@dataclass
class Group:
    """Runs that differ only in their seed."""

    task: str
    operands: int | None
    method: str
    latent_budget: int | None
    variant: dict[str, Any]  # the other config keys that vary across the report's runs
    runs: list[Run]

    @property
    def task_label(self) -> str:
        return self.task + (f" ({self.operands} operands)" if self.operands is not None else "")

    @property
    def method_label(self) -> str:
        """Method, `N_L` and variant: what one line or table row stands for."""
        return self.label()

    def label(self, without: str | None = None) -> str:
        """`method_label` less the variant key `without` (the axis a figure plots)."""
        variant = self.variant_text_without(without)
        text = self.method + (f" N_L={self.latent_budget}" if self.latent_budget else "")
        return text + (f" ({variant})" if variant else "")

    @property
    def variant_text(self) -> str:
        return self.variant_text_without(None)

    def variant_text_without(self, without: str | None) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.variant.items()
                         if k != without)

    def stat(self, value: Callable[[Run], float | None]) -> Stat | None:
        values = [v for v in map(value, self.runs) if v is not None]
        return Stat.of(values) if values else None


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by their config without the ignored keys. A group's variant holds the keys
    (besides task, operands, method and `N_L`) whose value differs among the runs of its task
    and method: what tells apart two lines of the same method, e.g. `orthogonality` in a λ
    sweep, but not the options every run of a method shares (a variant's fixed choices)."""
    values: dict[tuple[str, str, str], set[str]] = {}
    for run in runs:
        for key, value in run.config.items():
            slot = (run.get("task.name"), run.get("method.name"), key)
            values.setdefault(slot, set()).add(json.dumps(value, sort_keys=True, default=str))
    groups: dict[str, Group] = {}
    for run in runs:
        task, method = run.get("task.name"), run.get("method.name")
        variant = {k: v for k, v in sorted(run.config.items())
                   if len(values[task, method, k]) > 1 and not _ignored(k)
                   and k not in AXIS_KEYS}
        identity = {k: v for k, v in run.config.items() if not _ignored(k)}
        key = json.dumps(identity, sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Group(task, run.get("task.operands"), method, run.latent_budget,
                                variant, [])
        groups[key].runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (r.get("train.seed") or 0, str(r.run_dir)))
    return sorted(groups.values(), key=lambda g: (
        g.task, g.operands or 0, g.method, g.latent_budget or 0,
        json.dumps(g.variant, sort_keys=True, default=str)))


def _ignored(key: str) -> bool:
    # `*_from` keys (model.init_from, method.encoder_from) name the run a run started from:
    # a different directory per seed when the upstream has seeds.
    return key in IGNORED_KEYS or key.endswith("_from")


# ------------------------------------------------------------------------------------------
# Figures: the numbers first (`Plot`), then the drawing (`render`)


@dataclass
class Line:
    label: str
    x: list[float]
    y: list[float]  # mean over seeds
    err: list[float]  # standard deviation over seeds
    n: list[int]  # seeds behind each point
    reference: bool = False  # drawn dashed: a method without latents, or the Base


@dataclass
class Plot:
    """One figure's plotted numbers: named panels of lines, or named heatmaps."""

    name: str  # the PNG is `<name>.png`
    title: str
    caption: str
    xlabel: str = ""
    ylabel: str = ""
    panels: dict[str, list[Line]] = field(default_factory=dict)
    heatmaps: dict[str, list[list[float]]] = field(default_factory=dict)
    panel_ylabels: dict[str, str] = field(default_factory=dict)  # where not `ylabel`
    # The y values are shares (accuracy, 0..1): the axis stays within 0..100% and reads in %.
    share: bool = False
    # x takes a few values (N_L, operands, positions): ticks at those only; False (training
    # steps): matplotlib's own ticks, which do not crowd.
    discrete_x: bool = True


def _line(label: str, points: dict[float, Stat], reference: bool = False) -> Line:
    xs = sorted(points)
    return Line(label, xs, [points[x].mean for x in xs], [points[x].std for x in xs],
                [points[x].n for x in xs], reference)


def accuracy_vs_latents(groups: Sequence[Group], split: Split) -> Plot | None:
    """Accuracy against `N_L`, a panel per task, a line per method (and variant); methods
    without latents are dashed horizontal references."""
    panels: dict[str, list[Line]] = {}
    for task in _unique(g.task_label for g in groups):
        members = [g for g in groups if g.task_label == task]
        lines: dict[str, dict[float, Stat]] = {}
        for g in members:
            stat = g.stat(lambda r: r.score(split, "accuracy"))
            if g.latent_budget and stat:
                label = g.method + (f" ({g.variant_text})" if g.variant else "")
                lines.setdefault(label, {})[g.latent_budget] = stat
        if not lines:
            continue
        panels[task] = [_line(label, points) for label, points in lines.items()]
        span = [min(min(p) for p in lines.values()), max(max(p) for p in lines.values())]
        if span[0] == span[1]:  # one budget: a reference still needs a visible width
            span = [span[0] - 0.5, span[1] + 0.5]
        for g in members:
            stat = g.stat(lambda r: r.score(split, "accuracy"))
            if not g.latent_budget and stat:
                panels[task].append(Line(g.method_label, span, [stat.mean] * 2, [stat.std] * 2,
                                         [stat.n] * 2, reference=True))
    if not panels:
        return None
    return Plot("accuracy_vs_latents", f"{split} accuracy against the latent budget",
                f"{split.capitalize()} accuracy against the number of latents `N_L`, per task; "
                "points are means over seeds, bars one standard deviation; dashed lines are "
                "methods without latents.", "latent budget N_L", f"{split} accuracy",
                panels=panels, share=True)


def perplexity_vs_orthogonality(groups: Sequence[Group], split: Split) -> Plot | None:
    """Perplexity against the orthogonality weight λ, a panel per task, a line per method and
    `N_L` (paper A: the penalty's cost in text perplexity); drawn when some line has two λ."""
    panels: dict[str, list[Line]] = {}
    for task in _unique(g.task_label for g in groups):
        lines: dict[str, dict[float, Stat]] = {}
        for g in groups:
            weight = g.runs[0].get(ORTHOGONALITY)
            stat = g.stat(lambda r: r.score(split, "perplexity"))
            if g.task_label == task and isinstance(weight, int | float) and stat:
                lines.setdefault(g.label(without=ORTHOGONALITY), {})[float(weight)] = stat
        kept = [_line(label, points) for label, points in lines.items() if len(points) > 1]
        if kept:
            panels[task] = kept
    if not panels:
        return None
    return Plot("perplexity_vs_orthogonality", f"{split} perplexity against the orthogonality "
                "weight", f"{split.capitalize()} perplexity against λ "
                "(`method.orthogonality`), per task, one line per method and `N_L`; means over "
                "seeds, bars one standard deviation.", "orthogonality weight λ",
                f"{split} perplexity", panels=panels)


def countdown_by_operands(groups: Sequence[Group], split: Split) -> Plot | None:
    """Countdown accuracy against the operand count, a panel per method, a line per `N_L`."""
    panels: dict[str, dict[str, dict[float, Stat]]] = {}
    for g in groups:
        stat = g.stat(lambda r: r.score(split, "accuracy"))
        if g.task != "countdown" or g.operands is None or stat is None:
            continue
        panel = g.method + (f" ({g.variant_text})" if g.variant else "")
        label = f"N_L={g.latent_budget}" if g.latent_budget else "no latents"
        panels.setdefault(panel, {}).setdefault(label, {})[g.operands] = stat
    if not panels:
        return None
    return Plot("countdown_operands", f"Countdown {split} accuracy by operand count",
                f"Countdown {split} accuracy against the number of operands (the branching "
                "factor), one panel per method and one line per `N_L`; means over seeds, bars "
                "one standard deviation.", "operands", f"{split} accuracy",
                panels={p: [_line(label, points) for label, points in lines.items()]
                        for p, lines in panels.items()}, share=True)


def validation_curves(groups: Sequence[Group], metric: str) -> Plot | None:
    """The validation metric logged during training against the step, a panel per task, a
    line per group (mean over the seeds at the steps they all logged)."""
    panels: dict[str, list[Line]] = {}
    for g in groups:
        curves = [dict(r.curves[metric]) for r in g.runs if r.curves.get(metric)]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        points = {float(s): Stat.of([c[s] for c in curves]) for s in steps}
        panels.setdefault(g.task_label, []).append(_line(g.method_label, points))
    if not panels:
        return None
    return Plot(f"valid_{metric}", f"validation {metric} during training",
                f"Validation {metric} logged during training (`metrics.jsonl`) against the "
                "optimizer step; means over seeds at the steps every seed logged.",
                "step", f"validation {metric}", panels=panels, share=metric == "accuracy",
                discrete_x=False)


def perplexity_by_position(groups: Sequence[Group], split: Split) -> Plot | None:
    """Perplexity of the k-th token after the latents (paper B, Table 1): left, the method's
    and its frozen Base's (dashed; drawn once when the groups share one Base); right, the
    relative reduction `100 (Base - method) / Base`."""
    absolute: list[Line] = []
    relative: list[Line] = []
    bases: list[Line] = []
    for g in groups:
        pairs = [(r.results[split]["perplexity_by_position"],
                  r.results[split].get("base_perplexity_by_position"))
                 for r in g.runs if "perplexity_by_position" in (r.results.get(split) or {})]
        if not pairs:
            continue
        absolute.append(_line(g.method_label, _by_position([p for p, _ in pairs])))
        if any(base is None for _, base in pairs):
            continue
        base = _line(f"{g.method_label}: Base", _by_position([b for _, b in pairs]), True)
        if all(base.y != seen.y for seen in bases):
            bases.append(base)
        relative.append(_line(g.method_label, _by_position(
            [[100 * (b - p) / b for p, b in zip(ppl, base_ppl, strict=True)]
             for ppl, base_ppl in pairs])))
    if not absolute:
        return None
    if len(bases) == 1:
        bases[0].label = "frozen Base"
    panels = {"perplexity": absolute + bases}
    if relative:
        panels["reduction vs the Base"] = relative
    return Plot("perplexity_by_position", f"{split} perplexity by position after the latents",
                f"{split.capitalize()} perplexity of the k-th token after the latents (left; "
                "dashed: the frozen Base on the same tokens) and its relative reduction "
                "`100 (Base - method) / Base` in % (right); means over seeds.",
                "position after the latents", "perplexity", panels=panels,
                panel_ylabels={"reduction vs the Base": "reduction (%)"})


def _by_position(rows: Sequence[Sequence[float]]) -> dict[float, Stat]:
    return {float(k + 1): Stat.of([row[k] for row in rows]) for k in range(len(rows[0]))}


def capture_heatmaps(groups: Sequence[Group]) -> Plot | None:
    """Cross-subspace capture `H` of one run per group (its lowest seed), side by side."""
    heatmaps: dict[str, list[list[float]]] = {}
    for g in groups:
        run = next((r for r in g.runs if r.capture), None)
        if run is not None and run.capture is not None:
            h_off = run.capture.get("h_off")
            title = f"{g.task_label}: {g.method_label}, seed {run.get('train.seed')}"
            heatmaps[title + (f", H_off={h_off:.3f}" if h_off is not None else "")] = \
                run.capture["H"]
    if not heatmaps:
        return None
    return Plot("capture_heatmaps", "cross-subspace capture",
                "Cross-subspace capture `H_ij` (share of slot j's variance inside slot i's "
                "principal subspace) from `latentlab analyze`, one run per group (its lowest "
                "seed); a diagonal map means specialised slots, a uniform one a shared subspace.",
                heatmaps=heatmaps)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def render(plot: Plot, path: Path) -> Figure:
    """Draw `plot` and save it as a PNG (Agg, no display); returns the figure. Each line is
    one `errorbar` container and each heatmap one image, in the order of `plot`."""
    count = len(plot.panels) or len(plot.heatmaps)
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    side = 4.2 if plot.panels else 3.2
    # Legends go under their panel, labels wrapped (a variant can be long): each panel gets
    # the height of the tallest legend, so that no legend covers lines.
    legends = {title: [textwrap.fill(line.label, LEGEND_WIDTH) for line in lines]
               for title, lines in plot.panels.items()}
    legend_height = max((sum(label.count("\n") + 1 for label in labels)
                         for labels in legends.values()), default=0) * LEGEND_LINE
    fig = Figure(figsize=(side * cols + 0.8, (side + legend_height) * rows),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes, plot.panels.items(), strict=False):
        for line in lines:
            ax.errorbar(line.x, line.y, yerr=line.err, label=line.label, capsize=3,
                        marker="" if line.reference else "o",
                        linestyle="--" if line.reference else "-")
        if plot.share:
            _share_axis(ax)
        ax.set(title=textwrap.fill(title, TITLE_WIDTH), xlabel=plot.xlabel,
               ylabel=plot.panel_ylabels.get(title, plot.ylabel))
        ticks = sorted({x for line in lines if not line.reference for x in line.x}
                       or {x for line in lines for x in line.x})
        if plot.discrete_x and len(ticks) <= MAX_TICKS \
                and all(float(x).is_integer() for x in ticks):
            ax.set_xticks(ticks)  # N_L, operands, positions: only the values that exist
        ax.legend(ax.containers, legends[title], fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.16), frameon=False)
    image = None
    for ax, (title, matrix) in zip(axes, plot.heatmaps.items(), strict=False):
        image = _heatmap(ax, np.asarray(matrix, dtype=float), title)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:count]), label="$H_{ij}$", shrink=0.8)
    fig.suptitle(plot.title)
    fig.savefig(path, dpi=120)
    return fig


def _share_axis(ax: Axes) -> None:
    """Keep a share's y axis (accuracy) within 0..100%, in %. Matplotlib pads its automatic
    limits, and widens a flat line (runs all at 0% or 100%) to a span around it: without the
    cut, the axis would show impossible values such as -4%."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer) and container.lines[0] is not None:
            # A line at 0% or 100% now lies on the axis edge: drawn unclipped and above the
            # spine, or the spine would hide it. Its points are inside the limits; the error
            # bars, which may reach past 0..100%, stay clipped.
            container.lines[0].set_clip_on(False)
            container.lines[0].set_zorder(3)


def _heatmap(ax: Axes, values: np.ndarray, title: str) -> Any:
    slots = len(values)
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")  # one scale for all maps
    ax.set_xticks(range(slots))
    ax.set_yticks(range(slots))
    ax.set(title=textwrap.fill(title, TITLE_WIDTH), xlabel="slot j (variance)",
           ylabel="slot i (subspace)")
    ax.title.set_fontsize(8)
    if slots <= 8:
        for i in range(slots):
            for j in range(slots):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if values[i, j] > 0.6 else "white")
    return image


# ------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    out: Path
    split: Split
    runs: list[Run]
    groups: list[Group]
    plots: list[Plot]
    skipped: list[str]  # run directories left out, with the reason
    files: list[Path]  # everything written, report.md first


def build_report(paths: Sequence[str | Path], out: str | Path, split: Split = "test",
                 claims: str | Path | None = None) -> Report:
    """Read the runs in or below `paths` and write into `out`: `report.md`, one PNG per
    figure, `results.csv` (a row per run) and `results.json` (runs, groups over seeds and the
    figures' plotted numbers). Scores are those of `split`; a run without it is left out and
    listed. With a `claims` file (`study.claims`), report.md opens with the claims table and
    results.json holds the verdicts. Raises `RunError` when no finished run is found."""
    claims_file = read_claims(Path(claims)) if claims is not None else None
    out = Path(out)
    runs: list[Run] = []
    skipped: list[str] = []
    for run_dir in find_runs(Path(p) for p in paths):
        try:
            run = read_run(run_dir)
        except DataError as err:
            skipped.append(err.problem)
            continue
        if not RunDir(run_dir).is_finished():
            skipped.append(f"{run_dir}: training not finished (resume it)")
        elif not isinstance(run.results.get(split), dict):
            skipped.append(f"{run_dir}: not scored on the {split} split")
        else:
            runs.append(run)
    if not runs:
        raise RunError(f"none of the runs found has {split} scores from finished training",
                       "finish or resume the runs, or choose the other split")
    groups = group_runs(runs)
    candidates = [accuracy_vs_latents(groups, split), countdown_by_operands(groups, split),
                  validation_curves(groups, "accuracy"), validation_curves(groups, "perplexity"),
                  perplexity_by_position(groups, split), perplexity_vs_orthogonality(groups, split),
                  capture_heatmaps(groups)]
    plots = [p for p in candidates if p is not None]
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md"]
    for plot in plots:
        render(plot, out / f"{plot.name}.png")
        files.append(out / f"{plot.name}.png")
    rows = [_csv_row(run, group, split) for group in groups for run in group.runs]
    atomic_write_text(out / "results.csv", _csv_text(rows))
    checked = (check(claims_file, groups, _group_value,
                     lambda g, metric: _metric(g, metric, split), lambda g: g.method_label)
               if claims_file else [])
    atomic_write_text(out / "results.json", json.dumps({
        "split": split, "runs": rows, "groups": [_group_summary(g, split) for g in groups],
        "figures": {p.name: asdict(p) for p in plots}, "skipped": skipped,
        "claims": [{"id": c.claim.id, "verdict": c.verdict, "measured": c.measured}
                   for c in checked]}, indent=1, default=str))
    atomic_write_text(out / "report.md", _markdown(groups, plots, split, paths, skipped,
                                                   checked))
    files += [out / "results.csv", out / "results.json"]
    return Report(out, split, runs, groups, plots, skipped, files)


def _csv_row(run: Run, group: Group, split: Split) -> dict[str, Any]:
    return {
        "run_dir": str(run.run_dir), "task": group.task, "operands": group.operands,
        "method": group.method, "latent_budget": group.latent_budget,
        "variant": group.variant_text, "seed": run.get("train.seed"),
        "model": run.get("model.name"), "split": split,
        "accuracy": run.score(split, "accuracy"), "perplexity": run.score(split, "perplexity"),
        "n": (run.results.get(split) or {}).get("n"),
        **{f"{s}_{m}": run.score(s, m) for s in ("valid", "test")
           for m in ("accuracy", "perplexity")},
        "h_off": run.capture_number("h_off"), "silhouette": run.capture_number("silhouette"),
        "trainable_parameters": run.results.get("trainable_parameters"),
        "train_flops_per_example": run.flops("train_forward"),
        "inference_flops_per_example": run.flops("inference"),
        **{f"accuracy_latents_{kind}": run.ablated(split, kind) for kind in ABLATED}}


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _group_summary(group: Group, split: Split) -> dict[str, Any]:
    stats = {"accuracy": group.stat(lambda r: r.score(split, "accuracy")),
             "perplexity": group.stat(lambda r: r.score(split, "perplexity")),
             "h_off": group.stat(lambda r: r.capture_number("h_off")),
             "silhouette": group.stat(lambda r: r.capture_number("silhouette")),
             "train_flops_per_example": group.stat(lambda r: r.flops("train_forward")),
             "inference_flops_per_example": group.stat(lambda r: r.flops("inference")),
             **{f"accuracy_latents_{kind}": group.stat(lambda r, k=kind: r.ablated(split, k))
                for kind in ABLATED}}
    return {"task": group.task, "operands": group.operands, "method": group.method,
            "latent_budget": group.latent_budget, "variant": group.variant,
            "label": group.method_label, "seeds": [r.get("train.seed") for r in group.runs],
            "run_dirs": [str(r.run_dir) for r in group.runs],
            **{k: asdict(v) if v else None for k, v in stats.items()}}


def _group_value(group: Group, key: str) -> Any:
    """A claim selector's key: a group field, or a dotted key of its runs' config."""
    return getattr(group, key) if key in GROUP_FIELDS else group.runs[0].get(key)


def _metric(group: Group, metric: str, split: Split) -> Stat | None:
    """A claim's metric over a group's seeds: a score of `split`, a capture number, or a
    number of an analysis file as `NAME.KEY[.KEY...]` (`latent_sft.length.compression`)."""
    if metric in ("accuracy", "perplexity"):
        return group.stat(lambda r: r.score(split, metric))
    if metric in ("h_off", "silhouette"):
        return group.stat(lambda r: r.capture_number(metric))
    return group.stat(lambda r: number_at(r.analyses, *metric.split(".")))


def _markdown(groups: Sequence[Group], plots: Sequence[Plot], split: Split,
              paths: Sequence[str | Path], skipped: Sequence[str],
              checked: Sequence[Checked] = ()) -> str:
    lines = ["# latentlab report", "",
             f"{sum(len(g.runs) for g in groups)} runs in {len(groups)} groups from "
             f"{', '.join(f'`{p}`' for p in paths)}. Scores are on the **{split}** split; "
             "a cell is the mean ± standard deviation over seeds (sample standard deviation; "
             "0 with one seed), with the number of seeds in brackets. Raw numbers: "
             "`results.csv` (one row per run), `results.json` (runs, groups and every figure's "
             "plotted values).", ""]
    if checked:
        lines += ["## Claims", "", "Each claim's comparisons, cell by cell, on the "
                  f"{split} split; a difference inside the spread over seeds (the standard "
                  "deviations added) is inconclusive (`latentlab.study.claims`).", "",
                  *claims_table(checked), ""]
    lines += ["## Method x task", "", *_pivot(groups, split), ""]
    geometry = [(g, h_off) for g in groups
                if (h_off := g.stat(lambda r: r.capture_number("h_off")))]
    if geometry:
        lines += ["## Latent geometry (`latentlab analyze`)", "",
                  "| task | method | H_off | silhouette |", "|---|---|---|---|"]
        for g, h_off in geometry:
            sil = g.stat(lambda r: r.capture_number("silhouette"))
            lines.append(f"| {g.task_label} | {g.method_label} | {_cell(h_off, '.3f')} | "
                         f"{_cell(sil, '.3f')} |")
        lines.append("")
    ablated = [g for g in groups if g.stat(lambda r: r.ablated(split, "zeros")) is not None]
    if ablated:
        lines += ["## Latent dependence", "", f"{split.capitalize()} accuracy in % with the "
                  "latents the method inserts replaced by zeros, by their mean over the "
                  "examples, or by another question's (`latent_dependence` in results.json): "
                  "a method whose accuracy does not drop is not using its latents.", "",
                  "| task | method | own latents | zeros | mean | another question's |",
                  "|---|---|---|---|---|---|"]
        for g in ablated:
            cells = [_cell(g.stat(lambda r: r.score(split, "accuracy")), ".1f", 100),
                     *(_cell(g.stat(lambda r, k=kind: r.ablated(split, k)), ".1f", 100)
                       for kind in ABLATED)]
            lines.append(f"| {g.task_label} | {g.method_label} | " + " | ".join(cells) + " |")
        lines.append("")
    costed = [g for g in groups if g.stat(lambda r: r.flops("train_forward"))]
    if costed:
        lines += ["## Compute", "", "Forward FLOPs per example (`flops_per_example` in "
                  "results.json, counted one example at a time: matrix products and attention), "
                  "in GFLOPs.", "", "| task | method | training forward | inference |",
                  "|---|---|---|---|"]
        for g in costed:
            train_flops = g.stat(lambda r: r.flops("train_forward"))
            inference = g.stat(lambda r: r.flops("inference"))
            lines.append(f"| {g.task_label} | {g.method_label} | {_cell(train_flops, '.3f', 1e-9)}"
                         f" | {_cell(inference, '.3f', 1e-9)} |")
        lines.append("")
    for plot in plots:
        lines += [f"## {plot.title[0].upper()}{plot.title[1:]}", "",
                  f"![{plot.title}]({plot.name}.png)", "", plot.caption, ""]
    if skipped:
        lines += ["## Runs left out", "", *(f"- {s}" for s in skipped), ""]
    return "\n".join(lines)


def _pivot(groups: Sequence[Group], split: Split) -> list[str]:
    """Rows: method (with `N_L` and variant); columns: tasks; accuracy in %, or perplexity."""
    tasks = _unique(g.task_label for g in groups)
    methods = _unique(g.method_label for g in groups)
    cells: dict[tuple[str, str], str] = {}
    for g in groups:
        accuracy = g.stat(lambda r: r.score(split, "accuracy"))
        if accuracy is not None:
            cells[g.method_label, g.task_label] = _cell(accuracy, ".1f", 100)
        else:
            cells[g.method_label, g.task_label] = _cell(
                g.stat(lambda r: r.score(split, "perplexity")), ".2f") + " ppl"
    header = "| method | " + " | ".join(tasks) + " |"
    rows = [f"| {m} | " + " | ".join(cells.get((m, t), "") for t in tasks) + " |"
            for m in methods]
    return [header, "|---" * (len(tasks) + 1) + "|", *rows,
            "", f"Accuracy in % on the {split} split (perplexity where marked ppl)."]


def _cell(stat: Stat | None, fmt: str, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    return f"{stat.mean * scale:{fmt}} ± {stat.std * scale:{fmt}} ({stat.n})"
