"""The README's first lines are the two commands a new user runs; CI runs the second one."""

from __future__ import annotations

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
