"""Analyses of latents (METHODS.md section 6, paper A): cross-subspace capture and readout.

- `capture_matrix`: do the `N_L` latent slots use different directions? Per slot, the principal
  subspace of its (centred) vectors over many examples; `H_ij` is the share of slot `j`'s
  variance that lies in slot `i`'s subspace. Paper A finds `H_off` (mean off-diagonal) near 1:
  the slots share one subspace.
- `top_tokens`: project latents onto the vocabulary and list the most likely tokens.
- `plot_heatmap`: `H` as an annotated heatmap.
- `analyze_run`: all of the above for a trained run, written to `RUN_DIR/analysis/`, plus the
  method's own analyses (`Method.analyses`, e.g. Latent-SFT's ECR@K and N_eff).

Works for any method with latents (`Method.latents(examples) -> [n, N_L, d]`); docs/analysis.md
gives the definitions and the choices made where paper A is silent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ValidationError
from sklearn.metrics import silhouette_score
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from latentlab.engine.checkpoint import atomic_write_text
from latentlab.errors import ConfigError, DataError, RunError
from latentlab.methods import METHODS
from latentlab.recipes import RunDir, load_run
from latentlab.tasks import build_task
from latentlab.tasks.base import Example, Split

DECODED_EXAMPLES = 10  # examples whose latents latent_tokens.md decodes
# Cumulative explained-variance ratios carry float rounding: without slack, variance=1.0 would
# count noise directions beyond a slot's true rank.
_VARIANCE_SLACK = 1e-9
# A slot whose centred energy is below this fraction of its raw energy does not vary across
# examples (float rounding of a constant vector is ~1e-32); its H column would be 0/0.
_CONSTANT_SLOT = 1e-20

TokenScores = list[tuple[str, float]]


@dataclass(frozen=True)
class CaptureResult:
    """Cross-subspace capture of `N_L` latent slots over `n` examples.

    `H[i][j]`: share of slot j's variance inside slot i's principal subspace (row = subspace,
    column = data). `components[i]`: dimension of slot i's subspace. `h_off`/`silhouette`/
    `chance` are None with a single slot (no pair to compare).
    """

    H: list[list[float]]
    h_off: float | None  # mean of the off-diagonal entries of H
    silhouette: float | None  # of the raw latents labelled by slot
    components: list[int]
    variance: float  # the explained-variance target used to pick `components`
    max_components: int  # the cap applied to `components`
    # The H_off that slots with isotropic variance in R^d would give (mean of k_i / d over the
    # off-diagonal): a large subspace captures much of anything, so read h_off against this.
    chance: float | None


def default_max_components(n: int, d: int) -> int:
    """The default cap on a slot's components: a quarter of the dimensions the centred data can
    span (`min(n - 1, d)`), at least 1. Kept well below `d` so that `chance` stays low (0.25 at
    most) and a high `H_off` cannot come from subspaces that cover most of the space."""
    return max(1, min(n - 1, d) // 4)


def capture_matrix(latents: Tensor, variance: float = 0.9, max_components: int | None = None,
                   metric: Literal["euclidean", "cosine"] = "euclidean") -> CaptureResult:
    """Paper A's cross-subspace capture of `latents` [n, N_L, d] (n examples, N_L slots).

    Each slot is centred with its own mean over the n examples; `U_i` = the fewest principal
    components of slot i that explain `variance` of its variance, at most `max_components`
    (default `default_max_components(n, d)`); `H_ij = ||Z_j U_i||_F^2 / ||Z_j||_F^2`.
    The silhouette (scikit-learn, `metric`) is taken on the raw latents: centring every slot on
    its own mean would put all clusters at the origin and hide the separation it measures.
    """
    if latents.ndim != 3:
        raise ValueError(f"latents must be [n, N_L, d], got shape {tuple(latents.shape)}")
    n, slots, d = latents.shape
    if n < 2:
        raise ValueError(f"capture needs latents of at least 2 examples, got {n}")
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    cap = default_max_components(n, d) if max_components is None else max_components
    if cap < 1:
        raise ValueError(f"max_components must be at least 1, got {cap}")

    z = latents.detach().to("cpu", torch.float64)
    centred = z - z.mean(dim=0, keepdim=True)
    energy = centred.pow(2).sum(dim=(0, 2))  # ||Z_j||_F^2 per slot
    constant = (energy <= _CONSTANT_SLOT * z.pow(2).sum(dim=(0, 2))).nonzero().flatten()
    if len(constant):
        raise ValueError(f"slot {int(constant[0])} does not vary across examples: its share "
                         "of variance in any subspace is undefined")

    bases: list[Tensor] = []
    components: list[int] = []
    for i in range(slots):
        _, singular, vh = torch.linalg.svd(centred[:, i], full_matrices=False)
        explained = singular.pow(2).cumsum(0) / singular.pow(2).sum()
        k = min(int((explained < variance - _VARIANCE_SLACK).sum()) + 1, cap)
        components.append(k)
        bases.append(vh[:k].T)  # [d, k], orthonormal columns: U_i
    H = [[float((centred[:, j] @ bases[i]).pow(2).sum() / energy[j]) for j in range(slots)]
         for i in range(slots)]

    if slots < 2:
        return CaptureResult(H, None, None, components, variance, cap, None)
    off = [(i, j) for i in range(slots) for j in range(slots) if i != j]
    h_off = sum(H[i][j] for i, j in off) / len(off)
    chance = sum(components[i] / d for i, _ in off) / len(off)
    # Rows are example-major ([n, N_L] flattened), so the slot labels repeat 0..N_L-1.
    labels = np.tile(np.arange(slots), n)
    silhouette = float(silhouette_score(z.reshape(n * slots, d).numpy(), labels, metric=metric))
    return CaptureResult(H, h_off, silhouette, components, variance, cap, chance)


@torch.no_grad()
def top_tokens(latents: Tensor, weight: Tensor, tokenizer: PreTrainedTokenizerBase,
               k: int = 5) -> list[Any]:
    """The top-k tokens of each latent read through `weight` [V, d] (the LM head or the input
    embeddings): softmax(`Z W^T`). Returns nested lists shaped like `latents.shape[:-1]` whose
    leaves are `k` (decoded token, probability) pairs, most likely first."""
    vocab, d = weight.shape
    if latents.shape[-1] != d:
        raise ValueError(f"latents have {latents.shape[-1]} dimensions, the weight {d}")
    flat = latents.reshape(-1, d).to(weight.device, weight.dtype)
    # Matmul in the weight's dtype (a float copy of a large bf16 vocabulary costs GBs), softmax
    # in float32.
    probs = (flat @ weight.T).float().softmax(dim=-1)
    scores, ids = probs.topk(min(k, vocab), dim=-1)
    rows = [[(tokenizer.decode([t]), p) for t, p in zip(row_ids, row_scores, strict=True)]
            for row_ids, row_scores in zip(ids.tolist(), scores.tolist(), strict=True)]
    return _nest(rows, tuple(latents.shape[:-1]))


def _nest(items: list[TokenScores], shape: tuple[int, ...]) -> Any:
    """Regroup a flat, row-major list into nested lists of the given leading shape."""
    if not shape:
        return items[0]
    step = len(items) // shape[0]
    return [_nest(items[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def plot_heatmap(H: Sequence[Sequence[float]], path: Path, title: str) -> Figure:
    """Save `H` as an annotated heatmap PNG (colour scale fixed to 0..1, so heatmaps of
    different runs compare by eye); returns the figure."""
    values = np.asarray(H, dtype=float)
    slots = len(values)
    side = 2.0 + 0.5 * slots
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg: no display, no pyplot global state
    ax = fig.add_subplot()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    labels = [f"slot {i}" for i in range(slots)]
    ax.set_xticks(range(slots), labels, rotation=45 if slots > 6 else 0)
    ax.set_yticks(range(slots), labels)
    ax.set_xlabel("slot j (whose variance)")
    ax.set_ylabel("slot i (whose subspace $U_i$)")
    fontsize = 9 if slots <= 8 else 6
    for i in range(slots):
        for j in range(slots):
            # viridis is light at the top of the scale: dark text there, light text below
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=fontsize,
                    color="black" if values[i, j] > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="$H_{ij}$")
    ax.set_title(title)
    fig.savefig(path, dpi=150)
    return fig


def analyze_run(run_dir: Path, split: Split = "valid", n: int = 500, k: int = 5,
                readout: Literal["lm_head", "embeddings"] = "lm_head",
                variance: float = 0.9, max_components: int | None = None,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Capture matrix and latent tokens of a finished run's best model on the first `n`
    examples of `split`; writes `capture.json`, `capture.png` and `latent_tokens.md` into
    `run_dir/analysis/` and returns the summary (what `capture.json` holds, plus `files`).
    A method with analyses of its own (`Method.analyses`, e.g. Latent-SFT's ECR@K, #L and
    N_eff; `options` are theirs) also writes `NAME.json` for each, whose numbers (without the
    per-example rows) the summary holds under `NAME`."""
    if n < 2:  # checked first: the split's size is not the problem
        raise ConfigError(f"n is {n}: the capture matrix compares at least 2 examples",
                          fix="analyse 2 examples or more")
    checked = _check_method(run_dir, options or {})
    method, config = load_run(run_dir, "cuda" if torch.cuda.is_available() else "cpu")
    task = build_task(config.task)
    examples = task.load(split)[:n]
    if len(examples) < 2:  # n >= 2: the split itself is this small
        raise DataError(f"split {split} of run {run_dir} holds {len(examples)} example(s); "
                        "the capture matrix needs at least 2", fix="analyse a larger split")
    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    size = config.eval.batch_size
    about = {"run_dir": str(run_dir), "task": config.task.name, "method": config.method.name,
             "split": split, "n": len(examples)}
    # First: a method's own analyses may need other runs, whose absence stops the rest.
    own = {name: {**about, **values} for name, values in method.analyses(
        task, examples, run_dir, checked, size, config.eval.max_new_tokens).items()}
    for name, values in own.items():
        atomic_write_text(out / f"{name}.json", json.dumps(values, indent=1))

    latents = torch.cat([method.latents(examples[s:s + size]).float().cpu()
                         for s in range(0, len(examples), size)])
    # Variable-length latents (Latent-SFT) are zero after each example's #L: keep the leading
    # slots every example uses (a slot that never varies has no subspace).
    width = int((latents != 0).any(-1).all(0).long().cumprod(0).sum())
    if width == 0:
        raise DataError("an example used no latent step", fix="analyse a longer-trained run")
    capture = capture_matrix(latents[:, :width], variance, max_components)

    summary: dict[str, Any] = {**about, "latent_budget": latents.shape[1],
                               "dim": latents.shape[2], **asdict(capture)}
    atomic_write_text(out / "capture.json", json.dumps(summary, indent=1))
    h_off = "one slot" if capture.h_off is None else f"$H_{{off}}$ = {capture.h_off:.3f}"
    plot_heatmap(capture.H, out / "capture.png",
                 f"{config.method.name} on {config.task.name} ({split}, n={len(examples)}): "
                 f"{h_off}")

    if readout == "lm_head":
        weight = method.backbone.get_output_embeddings().weight
    elif readout == "embeddings":
        weight = method.backbone.get_input_embeddings().weight
    else:
        raise ValueError(f"readout must be lm_head or embeddings, got {readout}")
    shown = examples[:DECODED_EXAMPLES]
    tokens = top_tokens(latents[:len(shown)], weight, method.tokenizer, k)
    title = f"{config.method.name} on {config.task.name} ({split})"
    atomic_write_text(out / "latent_tokens.md", _tokens_markdown(title, shown, tokens, readout))
    files = [str(out / name) for name in ("capture.json", "capture.png", "latent_tokens.md")]
    result = {**summary, "readout": readout, "files": files}
    for name, values in own.items():
        result[name] = {key: v for key, v in values.items() if key != "per_example"}
        files.append(str(out / f"{name}.json"))
    return result


def _check_method(run_dir: Path, options: dict[str, Any]) -> BaseModel | None:
    """Before loading any weights: refuse a method without latents, and check the options of
    the method's own analyses (`Method.analysis_options`)."""
    run = RunDir(run_dir)
    if not run.is_run():
        if options:
            raise ConfigError(f"--option {next(iter(options))} given, but {run_dir} holds no "
                              "run to read its analysis options from",
                              fix="give the directory a `latentlab train` run wrote")
        return None  # load_run names this problem and its fix
    method = run.config().method
    cls = METHODS[method.name].implementation(method)
    if not cls.has_latents():
        able = [m for m, c in METHODS.items() if c.has_latents()]
        choices = f"{', '.join(able[:-1])} or {able[-1]}" if len(able) > 1 else able[0]
        raise RunError(f"method {method.name} has no latents to analyse",
                       fix=f"analyse a run of {choices}")
    if cls.analysis_options is None:
        if options:
            raise ConfigError(f"--option {next(iter(options))}: method {method.name} has no "
                              "analysis options", fix="drop --option")
        return None
    try:
        return cls.analysis_options.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"])
        known = ", ".join(cls.analysis_options.model_fields)
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"--option {name} is not an analysis option of method "
                              f"{method.name}", fix=f"use one of {known}") from None
        raise ConfigError(f"--option {name}={err.get('input')!r} is invalid for method "
                          f"{method.name}: {err['msg']}",
                          fix=f"give its analysis options ({known}) valid values") from None


def _tokens_markdown(title: str, examples: list[Example], tokens: list[list[TokenScores]],
                     readout: str) -> str:
    k = len(tokens[0][0])
    through = "LM head" if readout == "lm_head" else "input embeddings"
    lines = [f"# Latent tokens: {title}", "",
             f"Each latent `z` read through the {through} `W` as softmax(`z W^T`): its top {k} "
             f"tokens and their probabilities, for the first {len(examples)} examples.", ""]
    for index, (example, slots) in enumerate(zip(examples, tokens, strict=True)):
        lines += [f"## Example {index}", "", "```text", example.question, "```", "",
                  f"Answer: {_code(example.answer)}", "",
                  "| slot | " + " | ".join(f"top {r + 1}" for r in range(k)) + " |",
                  "|---" * (k + 1) + "|"]
        for slot, pairs in enumerate(slots):
            cells = [f"{_code(json.dumps(tok, ensure_ascii=False))} {p:.3f}" for tok, p in pairs]
            lines.append(f"| {slot} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _code(text: str) -> str:
    """`text` as a Markdown code span that survives a table: fenced by more backticks than it
    contains, pipes escaped (GitHub tables split cells on `|` even inside code)."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    escaped = text.replace("|", "\\|")
    return f"{fence} {escaped} {fence}"
