"""The demo's own code path, shortened: a latent method pulls in its Base and both report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from latentlab.errors import ConfigError
from latentlab.study.demo import run_demo


def test_demo_trains_the_base_first_and_writes_the_report(tmp_path: Path, capsys) -> None:
    rows = run_demo(methods=["h1"], out=tmp_path, steps=2)
    assert [r["method"] for r in rows] == ["nocot", "h1"]
    assert rows[1]["starts_from"] == "nocot"
    saved = yaml.safe_load((tmp_path / "h1" / "config.yaml").read_text())
    assert Path(saved["model"]["init_from"]) == tmp_path / "upstream-nocot"
    report = (tmp_path / "report.md").read_text()
    assert "| h1 | nocot |" in report and "| nocot | random init |" in report
    # The latent method's row shows its accuracy with the latents replaced; the Base has none.
    ablated = rows[1]["test_ablated"]
    assert set(ablated) == {"zeros", "mean", "shuffled"} and rows[0]["test_ablated"] is None
    assert " / ".join(f"{ablated[k]:.1%}" for k in ("zeros", "mean", "shuffled")) in report
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert "| h1 |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="has no job nope"):
        run_demo(methods=["nope"], out=tmp_path / "x")
