"""Config loading: YAML + dotted overrides, one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentlab.config import load_config
from latentlab.errors import ConfigError

BASE = {"task": {"name": "countdown"}, "method": {"name": "cot"}}


def test_defaults_and_overrides_are_typed() -> None:
    cfg = load_config(base=BASE, overrides=["train.lr=3e-4", "task.operands=5",
                                            "method.name=nocot", "eval.splits=[test]"])
    assert cfg.train.lr == 3e-4 and cfg.task.operands == 5
    assert cfg.method.name == "nocot" and cfg.eval.splits == ["test"]
    assert cfg.run_dir() == Path("runs/countdown-nocot-gpt2-tiny")


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.lrr=1"], "unknown config key train.lrr.*did you mean train.lr"),
    (["train.lr=-1"], "train.lr = -1 is invalid"),
    (["train.batch_size=abc"], "train.batch_size = 'abc' is invalid"),
    (["method.name=nope"], "method.name is 'nope', which is not known.*cot"),
    (["task.operands=5", "task.name=prosqa"], "unknown config key task.operands"),
    (["train.lr"], "not of the form key=value"),
    (["zzz.a=1"], "unknown config key zzz"),
])
def test_bad_values_name_the_key_and_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(base=BASE, overrides=overrides)
    assert "Fix:" in str(info.value)


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {name: countdown\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_every_shipped_config_validates() -> None:
    configs = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    assert configs, "configs/ is empty"
    for path in configs:
        load_config(path)
