"""The README's first lines are the two commands a new user runs; CI runs the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_test_command() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    commands = [line for line in block if line and not line.startswith("#")]
    assert len(commands) == 2 and lines.index("```bash") < 5
    demo, tests = commands
    assert demo.endswith("latentlab demo") and tests.endswith("python -m pytest -q")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_results_page_tables_marked_as_reports_are_what_the_report_generates(
        tmp_path: Path) -> None:
    # docs/results.md embeds report tables between `<!-- report: NAME -->` markers; each must
    # be what `latentlab report` makes of the committed runs experiments/results/NAME/runs.
    from latentlab.study.report import build_report

    text = (ROOT / "docs" / "results.md").read_text()
    blocks = re.findall(r"<!-- report: (\S+) -->\n(.*?)\n<!-- /report -->", text, re.S)
    assert blocks
    for name, table in blocks:
        report = build_report([ROOT / "experiments" / "results" / name / "runs"],
                              tmp_path / name)
        generated = (report.out / "report.md").read_text()
        assert table.strip() in generated, name
