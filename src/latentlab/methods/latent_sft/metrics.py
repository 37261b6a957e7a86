"""Latent-SFT's metrics (paper D; METHODS.md section 5; docs/methods/latent_sft.md).

- `ecr_at_k`: effective compression rate ECR@K, the mean number of a chunk's `r` tokens found
  among the top-K tokens of the latent that summarises it (D: 1.169 of 2, 2.385 of 4, K = 50).
- `effective_parallelism`: `N_eff = exp(H(π))`, `π = softmax(s)`, with
  `s_m = (1/T) Σ_t log(Σ_{v in segment t of path m} q_t(v) + ε)` over `M` distinct correct
  solution paths, each cut into `T` segments (T = latent steps); D: most samples above 1.7.
- `length_stats`: reasoning length `#L` against CoT length, Pass@1 and Pass@1 / #L;
  `latent_length_report` runs a model over examples to get them.
- `solution_paths` tokenises and segments a task's correct solutions (`Task.solutions`): the
  paths of `effective_parallelism`.
- `report` and `latent_measures`: all of the above for a trained model, as `latentlab analyze`
  writes them to `RUN_DIR/analysis/latent_sft.json` (through each phase's `analyses`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from latentlab.methods.base import extract_answer, steps_text
from latentlab.methods.latent_sft.method import LatentSFT
from latentlab.tasks.base import Example, Task

N_EFF_THRESHOLD = 1.7  # D: "most samples above 1.7" (multi-path reasoning)


def ecr_at_k(alphas_topk_indices: Sequence[Tensor | Sequence[Sequence[int]]],
             chunks: Sequence[Sequence[Sequence[int]]], k: int = 50) -> float:
    """ECR@K over examples: `alphas_topk_indices[e]` holds, per latent `i` of example `e`, its
    tokens most likely first (at least `k`; e.g. `LatentSFT.encoder_alphas(examples, k)`), and
    `chunks[e][i]` the tokens of chunk `S_i` that latent `i` summarises (`LatentSFT.chunks`).
    Every position of a chunk counts (a token twice in a chunk counts twice if found)."""
    found, latents = 0, 0
    for indices, example_chunks in zip(alphas_topk_indices, chunks, strict=True):
        rows = indices.tolist() if isinstance(indices, Tensor) else indices
        if len(rows) != len(example_chunks):
            raise ValueError(f"{len(rows)} latents but {len(example_chunks)} chunks")
        for top, chunk in zip(rows, example_chunks, strict=True):
            if len(top) < k:
                raise ValueError(f"a latent lists {len(top)} tokens, ECR@{k} needs {k}")
            best = set(top[:k])
            found += sum(token in best for token in chunk)
            latents += 1
    if latents == 0:
        raise ValueError("no latent to score")
    return found / latents


def effective_parallelism(q_steps: Tensor, paths: Sequence[Sequence[Sequence[int]]],
                          eps: float = 1e-6) -> float:
    """`N_eff = exp(H(π))` of one problem: `q_steps` [T, V] holds the distribution each latent
    step superposes (`LatentSFT.latent_distributions`), `paths[m][t]` the tokens of segment
    `t` of correct solution `m` (`solution_paths`). A segment's mass sums over its distinct
    tokens. N_eff is 1 for one dominant path and M for M equally covered ones."""
    steps = q_steps.shape[0]
    if not paths:
        raise ValueError("no solution path")
    scores = []
    for path in paths:
        if len(path) != steps:
            raise ValueError(f"a path has {len(path)} segments, q has {steps} steps")
        total = 0.0
        for t, segment in enumerate(path):
            tokens = torch.tensor(sorted(set(segment)), dtype=torch.long)
            mass = float(q_steps[t].double()[tokens].sum()) if len(tokens) else 0.0
            total += math.log(mass + eps)
        scores.append(total / steps)
    pi = torch.tensor(scores, dtype=torch.float64).softmax(0)
    entropy = -float(torch.xlogy(pi, pi).sum())
    return math.exp(entropy)


def split_segments(tokens: Sequence[int], parts: int) -> list[list[int]]:
    """`tokens` cut into `parts` contiguous segments of near-equal length (segment t ends at
    round((t+1) n / parts)); with fewer tokens than parts some segments are empty."""
    n = len(tokens)
    bounds = [round(t * n / parts) for t in range(parts + 1)]
    return [list(tokens[a:b]) for a, b in pairwise(bounds)]


def solution_paths(tokenizer: PreTrainedTokenizerBase, solutions: Sequence[Sequence[str]],
                   parts: int) -> list[list[list[int]]]:
    """Each solution's steps as the CoT writes them (`steps_text`), tokenised and cut into
    `parts` segments: the `paths` of `effective_parallelism`."""
    return [split_segments(tokenizer(steps_text(list(s)), add_special_tokens=False)["input_ids"],
                           parts) for s in solutions]


def length_stats(latent_steps: Sequence[int], cot_lengths: Sequence[int],
                 correct: Sequence[bool]) -> dict[str, float | None]:
    """Reasoning length against CoT length and accuracy (D, Table 2): mean `#L`, mean CoT
    tokens, their ratio (`compression`), the Pearson `correlation` of #L with CoT length over
    examples, Pass@1 (%) and Pass@1 / #L. A ratio or correlation that is undefined (no latent
    step; a constant length) is None."""
    n = len(latent_steps)
    if not n or len(cot_lengths) != n or len(correct) != n:
        raise ValueError("latent_steps, cot_lengths and correct need one entry per example")
    steps = torch.tensor(latent_steps, dtype=torch.float64)
    cot = torch.tensor(cot_lengths, dtype=torch.float64)
    mean_steps, mean_cot = float(steps.mean()), float(cot.mean())
    pass_at_1 = 100.0 * sum(bool(c) for c in correct) / n
    centred_s, centred_c = steps - mean_steps, cot - mean_cot
    spread = float(centred_s.norm() * centred_c.norm())
    return {"n": n, "latent_steps": mean_steps, "cot_tokens": mean_cot,
            "compression": mean_cot / mean_steps if mean_steps else None,
            "correlation": float(centred_s @ centred_c) / spread if spread else None,
            "pass@1": pass_at_1,
            "pass@1_per_latent": pass_at_1 / mean_steps if mean_steps else None}


def batches(examples: Sequence[Example], size: int) -> list[list[Example]]:
    return [list(examples[s:s + size]) for s in range(0, len(examples), size)]


@torch.no_grad()
def latent_length_report(method: LatentSFT, task: Task, examples: Sequence[Example],
                         batch_size: int = 64, max_new_tokens: int = 128
                         ) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Generate for `examples` in batches and return `length_stats` and one row per example
    (`latent_steps`, `cot_tokens`, `prediction`, `correct`)."""
    was_training = method.training
    method.eval()
    rows: list[dict[str, Any]] = []
    for batch in batches(examples, batch_size):
        completions, steps = method.generate_with_steps(batch, max_new_tokens)
        for example, completion, n in zip(batch, completions, steps, strict=True):
            answer = extract_answer(completion)
            rows.append({"latent_steps": n, "cot_tokens": len(method.tokens(steps_text(
                example.steps))), "prediction": answer, "correct": task.score(answer, example)})
    method.train(was_training)
    stats = length_stats([r["latent_steps"] for r in rows], [r["cot_tokens"] for r in rows],
                         [r["correct"] for r in rows])
    return stats, rows



@torch.no_grad()
def n_eff_rows(method: LatentSFT, task: Task, examples: Sequence[Example],
               batch_size: int = 64) -> list[dict[str, Any]]:
    """Per example: its number of distinct correct solutions (`Task.solutions`), its `#L` and
    `N_eff` (None unless it has at least 2 solutions and at least 1 latent step). `q_t` are the
    distributions the model superposes at inference (`latent_distributions`)."""
    rows: list[dict[str, Any]] = []
    for batch in batches(examples, batch_size):
        # One batch of dense [#L, V] distributions at a time: all of them could fill the GPU.
        for example, q in zip(batch, method.latent_distributions(batch), strict=True):
            solutions = task.solutions(example) or []
            steps = int(q.shape[0])
            n_eff = None
            if len(solutions) >= 2 and steps >= 1:
                n_eff = effective_parallelism(q, solution_paths(method.tokenizer, solutions,
                                                                steps))
            rows.append({"solutions": len(solutions), "latent_steps": steps, "n_eff": n_eff})
    return rows


def report(method: LatentSFT, encoder_run: Path, k: int, ecr: float) -> dict[str, Any]:
    """The keys of `analysis/latent_sft.json` (docs/methods/latent_sft.md), with ECR@K filled
    in; `latent_measures` fills the rest for a phase-latent model."""
    cfg = method.config
    return {"phase": cfg.phase, "encoder_run": str(encoder_run), "chunk_size": cfg.chunk_size,
            "k": k, "ecr_at_k": ecr, "length": None, "n_eff_mean": None,
            "n_eff_share_above": None, "n_eff_threshold": N_EFF_THRESHOLD,
            "n_eff_examples": None, "multi_solution_examples": None, "n_eff_note": "",
            "per_example": None, "summary": f"ECR@{k} {ecr:.3f}"}


def latent_measures(method: LatentSFT, task: Task, examples: Sequence[Example],
                    out: dict[str, Any], batch_size: int = 64, max_new_tokens: int = 128
                    ) -> dict[str, Any]:
    """`out` (a `report`) with a phase-latent model's `latent_length_report` and, where the
    task enumerates solutions (`Task.solutions`), its `N_eff`."""
    stats, rows = latent_length_report(method, task, examples, batch_size, max_new_tokens)
    out["length"] = stats
    per_example = [{key: r[key] for key in ("latent_steps", "cot_tokens", "correct")}
                   for r in rows]
    if examples and task.solutions(examples[0]) is None:
        out["n_eff_note"] = (f"task {task.config.name} has no solution enumerator yet: N_eff "
                             "needs each problem's distinct correct solutions")
    elif method.config.latent_space == "hidden":
        out["n_eff_note"] = ("hidden-state latents are no distributions over the vocabulary: "
                             "N_eff is not defined for them")
    else:
        paths = n_eff_rows(method, task, examples, batch_size)
        values = [p["n_eff"] for p in paths if p["n_eff"] is not None]
        out.update(
            n_eff_examples=len(values),
            multi_solution_examples=sum(p["solutions"] >= 2 for p in paths),
            n_eff_mean=sum(values) / len(values) if values else None,
            n_eff_share_above=(sum(v > N_EFF_THRESHOLD for v in values) / len(values)
                               if values else None),
            n_eff_note="N_eff over the examples with at least 2 distinct correct solutions and "
                       "at least 1 latent step; q_t = the top-k renormalised distribution fed "
                       "at latent step t")
        for row, p in zip(per_example, paths, strict=True):
            row.update(solutions=p["solutions"], n_eff=p["n_eff"])
        if out["n_eff_mean"] is not None:
            out["summary"] += f", mean N_eff {out['n_eff_mean']:.3f}"
    out["per_example"] = per_example
    return out
