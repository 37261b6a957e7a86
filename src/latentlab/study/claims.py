"""Claims of the source papers as checks on finished runs, with a verdict each.

A claims file (`configs/claims/papers.yaml`) lists claims; each compares groups of runs (runs that
differ only in their seed, as `latentlab report` groups them) chosen by selectors, on a metric,
cell by cell (by default per task and `N_L`):

- `order: [A, B, C]`: A's metric above B's, B's above C's;
- `within: [A, B]` with `tolerance`: A and B at most `tolerance` apart;
- `range: [low, high]` with `of: A`: A's metric inside the range.

Metrics: `accuracy`, `perplexity`, `h_off`, `silhouette`, or any number of a run's
`analysis/NAME.json` as `NAME.KEY[.KEY...]` (Latent-SFT's `latent_sft.ecr_at_k`).

A selector is a mapping of run-config keys (dotted, e.g. `method.orthogonality`) or the group
fields `method`, `task`, `operands`, `latent_budget` to values. A selector that several groups
of a cell match (one method started from random initialisation and from another run, say)
makes one comparison for each of them, each named by its group's label. The verdict of one
comparison uses the spread over seeds (the sample standard deviations added): a difference
inside it is **inconclusive**, as is anything measured with fewer than `min_seeds` seeds; a
claim is **confirmed** when every comparison is, **not confirmed** when one contradicts it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise, product
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from latentlab.config import read_yaml
from latentlab.errors import ConfigError

Verdict = Literal["confirmed", "not confirmed", "inconclusive"]
GROUP_FIELDS = ("method", "task", "operands", "latent_budget")  # selector keys of a group


class Measured(Protocol):
    """A metric's mean and sample standard deviation over `n` seeds."""

    mean: float
    std: float
    n: int


# How the caller reads its groups: a group's value of a selector key (a group field or a
# dotted config key), and a group's metric over its seeds.
Value = Callable[[Any, str], Any]
Measure = Callable[[Any, str], Measured | None]


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    claim: str = Field(description="the claim in words")
    paper: str = Field(description="the paper's own figure, for comparison")
    command: str = Field(description="what produces the runs (a sweep)")
    metric: str = Field("accuracy", description="accuracy or perplexity (of the report's "
                        "split), h_off or silhouette (`latentlab analyze`), or a number of an "
                        "analysis file as NAME.KEY[.KEY...], e.g. latent_sft.ecr_at_k")
    per: list[str] = Field(default_factory=lambda: ["task", "operands", "latent_budget"],
                           description="group fields the comparisons are made within")
    order: list[dict[str, Any]] | None = None
    within: list[dict[str, Any]] | None = None
    tolerance: float | None = Field(None, ge=0)
    range: tuple[float, float] | None = None
    of: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_comparison(self) -> Claim:
        given = [k for k in ("order", "within", "range") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of order, within, range")
        if self.within is not None and (len(self.within) != 2 or self.tolerance is None):
            raise ValueError("within takes two selectors and a tolerance")
        if self.range is not None and self.of is None:
            raise ValueError("range needs `of`, the selector it applies to")
        if self.order is not None and len(self.order) < 2:
            raise ValueError("order needs at least two selectors")
        return self


class ClaimsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_seeds: int = Field(2, ge=1, description="fewer seeds than this: inconclusive")
    claims: list[Claim]


@dataclass(frozen=True)
class Checked:
    claim: Claim
    verdict: Verdict
    measured: list[str]  # one line per comparison: what was compared, its numbers, its verdict


def read_claims(path: Path) -> ClaimsFile:
    try:
        return ClaimsFile.model_validate(read_yaml(path))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"claims file {path}: {where} is invalid: "
                          f"{err['msg'].removeprefix('Value error, ')}",
                          fix="correct it (the format is in latentlab/study/claims.py)") from None


def greater(a: Measured, b: Measured, min_seeds: int) -> Verdict:
    """Whether a's mean is above b's, beyond the spread over seeds."""
    if min(a.n, b.n) < min_seeds:
        return "inconclusive"
    spread = a.std + b.std
    if a.mean - b.mean > spread:
        return "confirmed"
    if b.mean - a.mean > spread:
        return "not confirmed"
    return "inconclusive"


def close(a: Measured, b: Measured, tolerance: float, min_seeds: int) -> Verdict:
    """Whether a and b are at most `tolerance` apart, beyond the spread over seeds."""
    if min(a.n, b.n) < min_seeds:
        return "inconclusive"
    gap, spread = abs(a.mean - b.mean), a.std + b.std
    if gap + spread <= tolerance:
        return "confirmed"
    if gap - spread > tolerance:
        return "not confirmed"
    return "inconclusive"


def inside(a: Measured, low: float, high: float, min_seeds: int) -> Verdict:
    if a.n < min_seeds:
        return "inconclusive"
    if low <= a.mean - a.std and a.mean + a.std <= high:
        return "confirmed"
    if a.mean + a.std < low or a.mean - a.std > high:
        return "not confirmed"
    return "inconclusive"


def overall(verdicts: Sequence[Verdict]) -> Verdict:
    if not verdicts:
        return "inconclusive"
    if "not confirmed" in verdicts:
        return "not confirmed"
    return "confirmed" if all(v == "confirmed" for v in verdicts) else "inconclusive"


def check(claims: ClaimsFile, groups: Sequence[Any], value: Value, measure: Measure,
          label: Callable[[Any], str]) -> list[Checked]:
    """Every claim's comparisons on `groups`, cell by cell, and its verdict; `label` names a
    group where a selector matches several."""
    return [_check(claim, groups, value, measure, label, claims.min_seeds)
            for claim in claims.claims]


def _check(claim: Claim, groups: Sequence[Any], value: Value, measure: Measure,
           label: Callable[[Any], str], min_seeds: int) -> Checked:
    cells: dict[tuple[Any, ...], list[Any]] = {}
    for g in groups:
        cells.setdefault(tuple(value(g, k) for k in claim.per), []).append(g)
    verdicts: list[Verdict] = []
    lines: list[str] = []
    for cell, members in cells.items():
        where = ", ".join(f"{k}={v}" for k, v in zip(claim.per, cell, strict=True)
                          if v is not None)

        def pick(selector: dict[str, Any],
                 members: list[Any] = members) -> list[tuple[str, Measured]]:
            """(name, metric) of each group the selector matches that has the metric."""
            found = [g for g in members if all(value(g, k) == v for k, v in selector.items())]
            measured = [(g, measure(g, claim.metric)) for g in found]
            return [(label(g) if len(found) > 1 else _name(selector), m)
                    for g, m in measured if m is not None]

        def note(text: str, verdict: Verdict, where: str = where) -> None:
            verdicts.append(verdict)
            lines.append(f"{where}: {text}: {verdict}")

        if claim.order is not None:
            for above, below in pairwise([pick(s) for s in claim.order]):
                for (na, a), (nb, b) in product(above, below):
                    note(f"{na} {_fmt(a)} > {nb} {_fmt(b)}", greater(a, b, min_seeds))
        elif claim.within is not None and claim.tolerance is not None:
            for (na, a), (nb, b) in product(*(pick(s) for s in claim.within)):
                note(f"|{na} {_fmt(a)} - {nb} {_fmt(b)}| <= {claim.tolerance:g}",
                     close(a, b, claim.tolerance, min_seeds))
        elif claim.range is not None and claim.of is not None:
            low, high = claim.range
            for na, a in pick(claim.of):
                note(f"{na} {_fmt(a)} in [{low:g}, {high:g}]", inside(a, low, high, min_seeds))
    if not lines:
        lines.append("no runs to compare")
    return Checked(claim, overall(verdicts), lines)


def _name(selector: dict[str, Any]) -> str:
    return " ".join(f"{v}" if k in GROUP_FIELDS else f"{k.rsplit('.', 1)[-1]}={v}"
                    for k, v in selector.items())


def _fmt(m: Measured) -> str:
    return f"{m.mean:.3g} ± {m.std:.2g} ({m.n})"


def claims_table(checked: Sequence[Checked], cell: Callable[[str], str] = str) -> list[str]:
    """The claims as Markdown rows: claim, measured, paper, verdict, command."""
    rows = ["| id | claim | measured (mean ± sd (seeds) per comparison) | paper | verdict | "
            "command |", "|---|---|---|---|---|---|"]
    for c in checked:
        measured = "<br>".join(cell(line) for line in c.measured)
        rows.append(f"| {c.claim.id} | {c.claim.claim} | {measured} | {c.claim.paper} | "
                    f"**{c.verdict}** | `{c.claim.command}` |")
    return rows
