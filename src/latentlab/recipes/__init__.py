"""Recipes in plain code, one per kind of task: config -> task -> tokenizer -> backbone ->
method -> engine -> scores. `train` and `evaluate_run` are the commands; `RunDir` is what a
run writes; `load_run` rebuilds a trained method from its directory."""

from latentlab.recipes.building import build_method, load_run
from latentlab.recipes.reasoning import evaluate
from latentlab.recipes.run_dir import RunDir
from latentlab.recipes.training import RECIPES, evaluate_run, train

__all__ = ["RECIPES", "RunDir", "build_method", "evaluate", "evaluate_run", "load_run", "train"]
