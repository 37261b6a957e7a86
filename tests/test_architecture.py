"""The package's layers point down only (docs/design.md): engine <- tasks, methods <- run config
<- recipes <- study tooling <- CLI. Checked from the source, so a new import that runs up (or a
study module that names a method) fails here, not in a review."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from latentlab.methods import METHODS

PACKAGE = Path(__file__).parents[1] / "src" / "latentlab"
# Each module's layer; a module may import its own layer's modules and the layers below.
LAYERS = {
    "errors": 0, "paths": 0, "latents": 0, "signals": 0,
    "engine": 1, "model_config": 1,
    "tasks": 2, "backbones": 2, "token_shift": 2, "lm_head": 2,
    "methods": 3,
    "config": 4,
    "recipes": 5,
    "study": 6,
    "cli": 7, "__main__": 7, "__init__": 0,
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def latentlab_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported latentlab module, whether at module level) for each import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentlab"):
            found.append((node.module or "", id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names
                      if a.name.startswith("latentlab")]
    return found


def test_every_import_points_down_and_none_hides_in_a_function() -> None:
    upward, late = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for target, at_top in latentlab_imports(path):
            if layer(target) > layer(here):
                upward.append(f"{here} -> {target}")
            # The CLI imports its commands when they run (a config error must not wait for
            # torch); anywhere else a late import would hide a cycle.
            if not at_top and not here.endswith(".cli"):
                late.append(f"{here} -> {target}")
    assert not upward, upward
    assert not late, late


def test_the_engine_loads_without_any_method_or_task() -> None:
    code = ("import sys, pkgutil, importlib, latentlab.engine as e\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module("
            "'latentlab.engine.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n.startswith('latentlab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    loaded = ast.literal_eval(out.strip().splitlines()[-1])
    assert "latentlab.engine.trainer" in loaded
    assert not [n for n in loaded if n.split(".")[1:2] not in ([], ["engine"], ["errors"],
                                                               ["signals"])], loaded


def test_study_code_names_no_method() -> None:
    # Study tooling (sweeps, reports, analyses, the demo) reaches methods through their
    # contract only; the demo's jobs are a sweep file, which may name them.
    names = [re.escape(n) for n in METHODS]
    classes = [cls.__name__ for cls in METHODS.values()]
    pattern = re.compile(r"[\"'](" + "|".join(names) + r")[\"']|\b(" + "|".join(classes)
                         + r")\b")
    hits = [f"{path.name}:{i}: {line.strip()}"
            for path in sorted((PACKAGE / "study").rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_every_method_counts_every_sequence_it_reads_against_max_length() -> None:
    # `train.max_length` bounds what the model reads for an example: for each method, every
    # token sequence of its features (the id lists), whatever the method calls them.
    from latentlab.backbones import add_special_tokens, build_backbone, train_tokenizer
    from latentlab.model_config import ModelConfig
    from latentlab.tasks.base import Example

    example = Example("Numbers: 3 5 7. Target: 22.", ("3*5=15", "15+7=22"), "3*5+7")
    text = example.question + "\n" + "\n".join(example.steps) + "\n### " + example.answer
    for name, cls in METHODS.items():
        options = {"phase": "encoder"} if name == "latent_sft" else {}
        config = cls.config_class(**options)
        impl = cls.implementation(config)
        tokenizer = train_tokenizer([text] * 10, 300)
        backbone = build_backbone(ModelConfig(name="gpt2-tiny"), tokenizer, seed=0)
        add_special_tokens(tokenizer, backbone, impl.special_tokens(config))
        method = impl(config, backbone, tokenizer)
        features = method.encode(example)
        # Nested features (one set per role, as CODI's teacher and student) included.
        roles = [features, *(v for v in features.values() if isinstance(v, dict))]
        sequences = [v for role in roles for k, v in role.items()
                     if k.endswith("ids") and isinstance(v, list)]
        assert method.feature_length(features) == sum(map(len, sequences)) > 0, name
