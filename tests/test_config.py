"""Config loading: YAML + dotted overrides, one clear message per mistake."""

from __future__ import annotations

import subprocess
import sys
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
    # A bare `no` is YAML's false: mixed_precision still reads it as the option "no".
    assert load_config(base=BASE, overrides=["train.mixed_precision=no"]
                       ).train.mixed_precision == "no"


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


def test_extends_merges_a_parent_config_and_rejects_cycles(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text(
        "task: {name: countdown, operands: 4}\nmethod: {name: nocot}\ntrain: {lr: 0.1}\n")
    (tmp_path / "child.yaml").write_text(
        "extends: parent.yaml\nmethod: {name: liu, latent_budget: 8}\ntrain: {epochs: 2}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.task.operands, cfg.method.name, cfg.method.latent_budget) == (4, "liu", 8)
    assert (cfg.train.lr, cfg.train.epochs) == (0.1, 2)
    # Switching the method keeps only the options the new one has: No-CoT's question_loss
    # does not reach pause, while shared options such as latent_budget carry over.
    (tmp_path / "base.yaml").write_text(
        "task: {name: countdown}\nmethod: {name: nocot, question_loss: true}\n")
    (tmp_path / "pause.yaml").write_text("extends: base.yaml\nmethod: {name: pause}\n")
    assert load_config(tmp_path / "pause.yaml").method.name == "pause"
    cfg = load_config(tmp_path / "base.yaml", ["method.name=soft", "method.latent_budget=2"])
    assert (cfg.method.name, cfg.method.latent_budget) == ("soft", 2)
    cfg = load_config(tmp_path / "child.yaml", ["method.name=pause"])
    assert cfg.method.latent_budget == 8
    with pytest.raises(ConfigError, match=r"unknown config key method\.question_loss"):
        load_config(tmp_path / "pause.yaml", ["method.question_loss=true"])
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_a_config_loads_without_the_model_code_of_transformers() -> None:
    # A typo in a config is reported before anything slow is imported: transformers' model
    # code takes seconds (most of a CLI error's time when every method module imported it).
    code = ("import sys; from latentlab.cli import main; "
            "status = main(['train', 'configs/countdown_cot.yaml', 'train.lrr=1']); "
            "print(status, 'transformers.modeling_utils' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert "unknown config key train.lrr" in proc.stderr
