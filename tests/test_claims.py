"""The claims table's verdict logic (`study.claims`) on hand-made results, and the shipped
claims file read and applied through `latentlab report`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import quick_run

from latentlab.errors import ConfigError
from latentlab.study.claims import (
    ClaimsFile,
    check,
    close,
    greater,
    inside,
    overall,
    read_claims,
)

CLAIMS = Path(__file__).parents[1] / "configs" / "claims" / "papers.yaml"


@dataclass(frozen=True)
class M:
    mean: float
    std: float
    n: int = 3


def test_a_difference_inside_the_seed_spread_is_inconclusive() -> None:
    assert greater(M(0.60, 0.02), M(0.50, 0.03), 2) == "confirmed"  # 0.10 > 0.05
    assert greater(M(0.52, 0.02), M(0.50, 0.03), 2) == "inconclusive"  # 0.02 <= 0.05
    assert greater(M(0.40, 0.02), M(0.50, 0.03), 2) == "not confirmed"
    assert greater(M(0.90, 0.0, n=1), M(0.10, 0.0, n=3), 2) == "inconclusive"  # one seed
    assert close(M(0.500, 0.002), M(0.505, 0.002), 0.01, 2) == "confirmed"  # 0.009 <= 0.01
    assert close(M(0.50, 0.01), M(0.505, 0.01), 0.01, 2) == "inconclusive"  # 0.025 > 0.01
    assert close(M(0.50, 0.01), M(0.60, 0.01), 0.01, 2) == "not confirmed"  # 0.08 > 0.01
    assert inside(M(0.95, 0.02), 0.9, 1.0, 2) == "confirmed"
    assert inside(M(0.91, 0.02), 0.9, 1.0, 2) == "inconclusive"
    assert inside(M(0.50, 0.02), 0.9, 1.0, 2) == "not confirmed"
    assert overall(["confirmed", "confirmed"]) == "confirmed"
    assert overall(["confirmed", "inconclusive"]) == "inconclusive"
    assert overall(["inconclusive", "not confirmed"]) == "not confirmed"
    assert overall([]) == "inconclusive"


@dataclass
class G:
    """A hand-made group: its fields, its config and its metrics."""

    method: str
    latent_budget: int | None
    accuracy: M
    task: str = "countdown"
    operands: int | None = 4
    config: dict[str, Any] = field(default_factory=dict)


def value(group: G, key: str) -> Any:
    return getattr(group, key) if hasattr(group, key) else group.config.get(key)


def measure(group: G, metric: str) -> M:
    return getattr(group, metric)


def label(group: G) -> str:
    return f"{group.method} ({group.config})"


def test_claims_are_checked_cell_by_cell() -> None:
    claims = ClaimsFile.model_validate({"claims": [
        {"id": "A1", "claim": "h2 > h1 > liu", "paper": "-", "command": "c",
         "order": [{"method": "h2"}, {"method": "h1"}, {"method": "liu"}]}]})
    groups = [G("h2", 4, M(0.70, 0.01)), G("h1", 4, M(0.60, 0.01)), G("liu", 4, M(0.50, 0.01)),
              # At N_L = 8, H1 and Liu are tied within their spread: inconclusive there.
              G("h2", 8, M(0.70, 0.01)), G("h1", 8, M(0.52, 0.02)), G("liu", 8, M(0.50, 0.02))]
    (checked,) = check(claims, groups, value, measure, label)
    assert checked.verdict == "inconclusive"
    assert checked.measured[0].startswith("task=countdown, operands=4, latent_budget=4: h2 0.7")
    assert [line.rsplit(": ", 1)[1] for line in checked.measured] == [
        "confirmed", "confirmed", "confirmed", "inconclusive"]
    groups[4] = G("h1", 8, M(0.40, 0.02))  # now H1 is below Liu at N_L = 8
    (checked,) = check(claims, groups, value, measure, label)
    assert checked.verdict == "not confirmed"


def test_a_selector_several_groups_match_is_compared_for_each_of_them() -> None:
    claims = ClaimsFile.model_validate({"claims": [
        {"id": "C1", "claim": "cot > nocot", "paper": "-", "command": "c", "per": ["task"],
         "order": [{"method": "cot"}, {"method": "nocot"}]}]})
    groups = [G("cot", None, M(0.80, 0.01)),
              G("nocot", None, M(0.50, 0.01), config={"from": "random init"}),
              G("nocot", None, M(0.85, 0.01), config={"from": "cot"})]
    (checked,) = check(claims, groups, value, measure, label)
    assert checked.measured == [
        "task=countdown: cot 0.8 ± 0.01 (3) > nocot ({'from': 'random init'}) 0.5 ± 0.01 (3): "
        "confirmed",
        "task=countdown: cot 0.8 ± 0.01 (3) > nocot ({'from': 'cot'}) 0.85 ± 0.01 (3): "
        "not confirmed"]
    assert checked.verdict == "not confirmed"
    # A selector that names the key picks one group, named by the selector.
    claims.claims[0].order = [{"method": "cot"}, {"method": "nocot", "from": "cot"}]
    (checked,) = check(claims, groups, value, measure, label)
    assert checked.measured == ["task=countdown: cot 0.8 ± 0.01 (3) > nocot from=cot 0.85 ± "
                                "0.01 (3): not confirmed"]


def test_the_shipped_claims_file_is_valid_and_mistakes_are_named(tmp_path: Path) -> None:
    claims = read_claims(CLAIMS)
    assert {c.id for c in claims.claims} >= {"A1", "A2", "A3", "A4", "A5", "C1"}
    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - {id: X, claim: c, paper: p, command: c, "
                   "order: [{method: a}], within: [{method: a}, {method: b}]}\n")
    with pytest.raises(ConfigError, match=r"claims\.0 is invalid: give exactly one of order"):
        read_claims(bad)


def test_the_report_opens_with_the_claims(tmp_path: Path) -> None:
    from latentlab.recipes import train
    from latentlab.study.report import build_report

    for seed in (0, 1):
        train(quick_run(tmp_path / "runs" / f"cot-{seed}", f"train.seed={seed}"))
    claims = tmp_path / "claims.yaml"
    claims.write_text("claims:\n  - {id: T1, claim: CoT answers, paper: '-', command: cmd, "
                      "per: [task], range: [0.0, 1.0], of: {method: cot}}\n")
    report = build_report([tmp_path / "runs"], tmp_path / "report", "test", claims)
    text = (report.out / "report.md").read_text()
    assert text.index("## Claims") < text.index("## Method x task")
    assert "| T1 | CoT answers |" in text and "**confirmed**" in text
    saved = json.loads((report.out / "results.json").read_text())["claims"]
    assert saved[0]["id"] == "T1" and saved[0]["verdict"] == "confirmed"


def test_a_claim_reads_a_number_of_an_analysis_file(tmp_path: Path) -> None:
    from latentlab.study.report import Group, Run, _metric

    runs = [Run(tmp_path / str(i), {}, {}, {},
                {"latent_sft": {"ecr_at_k": v, "length": {"compression": 3.0 + i}}})
            for i, v in enumerate((1.1, 1.3))]
    group = Group("countdown", 4, "latent_sft", 32, {}, runs)
    ecr = _metric(group, "latent_sft.ecr_at_k", "test")
    assert ecr is not None and ecr.n == 2 and ecr.mean == pytest.approx(1.2)
    compression = _metric(group, "latent_sft.length.compression", "test")
    assert compression is not None and compression.mean == pytest.approx(3.5)
    assert _metric(group, "latent_sft.missing", "test") is None
