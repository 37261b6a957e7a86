"""Analyses of latents: capture matrix against hand-computed values, token readout, heatmap,
and `analyze_run` on a tiny trained run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from test_training import TINY
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from latentlab.analysis import (
    analyze_run,
    capture_matrix,
    default_max_components,
    plot_heatmap,
    top_tokens,
)
from latentlab.config import dump_config, load_config
from latentlab.errors import RunError
from latentlab.run import load_run, train
from latentlab.tasks import build_task

D = 12


def slot(stds: dict[int, float], n: int = 16, mean: float = 0.0, shift_axis: int = D - 1
         ) -> torch.Tensor:
    """[n, D] vectors with exactly the variance `stds[a]**2` along axis `a`, no covariance and
    mean `mean * e_shift_axis`: every sign pattern over the axes, repeated to n rows."""
    axes = list(stds)
    patterns = list(itertools.product((-1.0, 1.0), repeat=len(axes)))
    assert n % len(patterns) == 0
    rows = []
    for signs in patterns * (n // len(patterns)):
        row = torch.zeros(D, dtype=torch.float64)
        row[shift_axis] = mean
        for axis, sign in zip(axes, signs, strict=True):
            row[axis] += sign * stds[axis]
        rows.append(row)
    return torch.stack(rows)


def slots(*vectors: torch.Tensor) -> torch.Tensor:
    return torch.stack(vectors, dim=1)  # [n, N_L, D]


def test_identical_subspaces_capture_each_other_fully() -> None:
    # Same plane, different spreads within it and far-apart means.
    z = slots(slot({0: 2.0, 1: 1.0}, mean=50.0), slot({0: 1.0, 1: 3.0}, mean=-20.0))
    result = capture_matrix(z, variance=1.0)
    assert np.allclose(result.H, [[1.0, 1.0], [1.0, 1.0]])
    assert result.h_off == pytest.approx(1.0)
    assert result.components == [2, 2]


def test_orthogonal_subspaces_capture_nothing() -> None:
    z = slots(slot({0: 1.0, 1: 1.0}, mean=5.0), slot({2: 1.0, 3: 2.0}, mean=7.0))
    result = capture_matrix(z, variance=1.0)
    assert np.allclose(result.H, [[1.0, 0.0], [0.0, 1.0]])
    assert result.h_off == pytest.approx(0.0)


@pytest.mark.parametrize(("second", "h01", "h10"), [
    ({1: 1.0, 2: 1.0}, 0.5, 0.5),  # share one of two equal axes
    # slot 1's variance on the shared axis e1 is 4 of 4 + 1; slot 0's is 1 of 1 + 1
    ({1: 2.0, 2: 1.0}, 0.8, 0.5),
])
def test_partial_overlap_is_the_shared_share_of_variance(second: dict[int, float], h01: float,
                                                         h10: float) -> None:
    z = slots(slot({0: 1.0, 1: 1.0}), slot(second, mean=3.0))
    H = capture_matrix(z, variance=1.0).H
    assert H[0][1] == pytest.approx(h01)
    assert H[1][0] == pytest.approx(h10)
    assert H[0][0] == pytest.approx(1.0) and H[1][1] == pytest.approx(1.0)


def test_rows_are_subspaces_and_columns_are_data() -> None:
    # Slot 1 lies inside slot 0's 3-d subspace; slot 0 has a third of its variance in slot 1's.
    z = slots(slot({0: 1.0, 1: 1.0, 2: 1.0}), slot({0: 1.0}))
    result = capture_matrix(z, variance=1.0, max_components=D)
    assert result.H[0][1] == pytest.approx(1.0)
    assert result.H[1][0] == pytest.approx(1 / 3)
    assert result.h_off == pytest.approx((1 + 1 / 3) / 2)
    assert result.components == [3, 1]
    assert result.chance == pytest.approx((3 / D + 1 / D) / 2)


def test_each_slot_is_centred_on_its_own_mean() -> None:
    z = torch.randn(40, 3, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    offsets = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(1)) * 100
    a, b = capture_matrix(z), capture_matrix(z + offsets)
    assert np.allclose(a.H, b.H) and a.components == b.components


# Variances 0.5, 0.3, 0.15, 0.05 along e0..e3: cumulative 0.5, 0.8, 0.95, 1.0.
SPECTRUM = {0: 0.5 ** 0.5, 1: 0.3 ** 0.5, 2: 0.15 ** 0.5, 3: 0.05 ** 0.5}


@pytest.mark.parametrize(("variance", "k", "diagonal"), [
    (0.5, 1, 0.5), (0.8, 2, 0.8), (0.9, 3, 0.95), (0.96, 4, 1.0), (1.0, 4, 1.0)])
def test_component_count_is_the_fewest_reaching_the_variance(variance: float, k: int,
                                                             diagonal: float) -> None:
    z = slots(slot(SPECTRUM), slot({5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0}))
    result = capture_matrix(z, variance=variance, max_components=D)
    assert result.components[0] == k
    assert result.H[0][0] == pytest.approx(diagonal)  # the diagonal is the explained share


def test_component_count_matches_the_rank_and_an_eigenvalue_count() -> None:
    gen = torch.Generator().manual_seed(2)
    n, d = 60, 32
    rank3 = torch.randn(n, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, d, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)  # anisotropic, full rank
    full = torch.randn(n, d, generator=gen, dtype=torch.float64) * scales
    z = slots(rank3, full)
    assert capture_matrix(z, variance=1.0, max_components=d).components[0] == 3
    # Independent count for 90%: eigenvalues of the covariance, largest first.
    eig = np.linalg.eigvalsh(np.cov(full.numpy(), rowvar=False))[::-1]
    expected = int(np.searchsorted(np.cumsum(eig) / eig.sum(), 0.9) + 1)
    assert capture_matrix(z, variance=0.9, max_components=d).components[1] == expected


def test_components_are_capped_and_the_cap_is_reported() -> None:
    z = torch.randn(16, 2, D, generator=torch.Generator().manual_seed(3))  # isotropic
    default = capture_matrix(z, variance=1.0)
    assert default.max_components == default_max_components(16, D) == min(15, D) // 4 == 3
    assert default.components == [3, 3]
    assert capture_matrix(z, variance=1.0, max_components=1).components == [1, 1]


def test_silhouette_matches_a_hand_computation() -> None:
    # Slot 0 at 0 and 1, slot 1 at 10 and 11 (d = 1); s = (b - a) / max(a, b) per point.
    z = torch.tensor([[[0.0], [10.0]], [[1.0], [11.0]]])
    outer, inner = (10.5 - 1) / 10.5, (9.5 - 1) / 9.5
    assert capture_matrix(z).silhouette == pytest.approx((outer + inner) / 2)


def test_silhouette_is_high_for_separated_slots_and_low_for_identical_ones() -> None:
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(100, 3, D, generator=gen)
    separated = noise * 0.1 + torch.eye(3, D)[None] * 10
    assert capture_matrix(separated).silhouette > 0.9
    assert abs(capture_matrix(noise).silhouette) < 0.1
    assert capture_matrix(separated, metric="cosine").silhouette > 0.9


def test_one_slot_has_no_pairs_to_compare() -> None:
    result = capture_matrix(slots(slot({0: 1.0, 1: 1.0})), variance=1.0)
    assert np.allclose(result.H, [[1.0]])
    assert result.h_off is None and result.silhouette is None and result.chance is None


@pytest.mark.parametrize(("latents", "message"), [
    (torch.randn(8, D), "must be"),
    (torch.randn(1, 2, D), "at least 2"),
    (slots(slot({0: 1.0}), torch.ones(16, D, dtype=torch.float64) * 0.1), "slot 1 does not vary"),
])
def test_bad_latents_are_refused(latents: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        capture_matrix(latents)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(
        WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])))


def test_top_tokens_are_the_softmax_of_the_projection() -> None:
    tokenizer = word_tokenizer(["east", "north", "west", "south"])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    logits = [2.0, 1.0, -2.0, -1.0]  # of z = (2, 1)
    total = sum(math.exp(x) for x in logits)
    (top,) = top_tokens(torch.tensor([[2.0, 1.0]]), weight, tokenizer, k=3)
    assert [t for t, _ in top] == ["east", "north", "south"]
    assert [p for _, p in top] == pytest.approx([math.exp(x) / total for x in (2, 1, -1)])
    # Nested like the leading dimensions; k beyond the vocabulary gives the whole vocabulary.
    grid = top_tokens(torch.randn(2, 3, 2), weight, tokenizer, k=9)
    assert len(grid) == 2 and all(len(row) == 3 for row in grid)
    assert all(len(cell) == 4 and sum(p for _, p in cell) == pytest.approx(1.0)
               for row in grid for cell in row)
    assert [t for t, _ in top_tokens(torch.tensor([0.0, -3.0]), weight, tokenizer, k=1)] == [
        "south"]


def test_heatmap_is_a_png_of_H(tmp_path: Path) -> None:
    H = [[1.0, 0.25, 0.5], [0.125, 0.9, 0.0], [0.75, 0.333, 1.0]]
    path = tmp_path / "h.png"
    fig = plot_heatmap(H, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).ndim == 3
    ax = fig.axes[0]
    image = ax.images[0]
    assert np.array_equal(image.get_array(), H)
    assert image.get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for row in H for v in row]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["slot 0", "slot 1", "slot 2"]


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("soft")
    # eval.batch_size=3: analyze_run collects the 8 validation latents in batches of 3, 3, 2.
    train(load_config(base=TINY, overrides=[
        f"out_dir={run}", "method.name=soft", "method.latent_budget=3", "train.max_steps=4",
        "eval.batch_size=3"]))
    return run


def test_analyze_run_writes_the_capture_and_the_tokens(soft_run: Path) -> None:
    summary = analyze_run(soft_run, split="valid", k=4)
    out = soft_run / "analysis"
    assert summary["files"] == [str(out / f) for f in (
        "capture.json", "capture.png", "latent_tokens.md")]
    saved = json.loads((out / "capture.json").read_text())
    assert saved["n"] == 8 and saved["latent_budget"] == 3 and saved["dim"] == 128
    assert saved["method"] == "soft" and saved["split"] == "valid"
    assert np.array(saved["H"]).shape == (3, 3)
    assert saved["max_components"] == default_max_components(8, 128) == 1
    assert saved["components"] == [1, 1, 1]
    off = [saved["H"][i][j] for i in range(3) for j in range(3) if i != j]
    assert saved["h_off"] == pytest.approx(sum(off) / 6)
    assert -1.0 <= saved["silhouette"] <= 1.0
    assert (out / "capture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The batched latents are those of one batch: same H as from all 8 examples at once.
    method, config = load_run(soft_run)
    examples = build_task(config.task).load("valid")
    latents = method.latents(examples)
    assert np.allclose(saved["H"], capture_matrix(latents).H, atol=1e-4)

    # 8 examples (fewer than 10 exist), 3 slot rows each with k=4 cells; top-1 of example 0,
    # slot 0 is the argmax of the LM head's logits.
    text = (out / "latent_tokens.md").read_text()
    assert text.count("## Example ") == 8
    rows = [line for line in text.splitlines() if line.startswith("| ") and "top 1" not in line]
    assert len(rows) == 8 * 3 and all(line.count(" | ") == 4 for line in rows)
    top1 = method.tokenizer.decode([int(method.backbone.lm_head(latents[0, 0]).argmax())])
    assert rows[0].startswith(f"| 0 | ` {json.dumps(top1, ensure_ascii=False)} ` ")

    fewer = analyze_run(soft_run, n=4, k=2, readout="embeddings")
    assert fewer["n"] == 4 and fewer["readout"] == "embeddings"
    assert json.loads((out / "capture.json").read_text())["n"] == 4


def test_a_method_without_latents_is_refused(tmp_path: Path) -> None:
    # The refusal comes from the config, before any weights are loaded: no training needed.
    dump_config(load_config(base=TINY, overrides=[f"out_dir={tmp_path}"]),
                tmp_path / "config.yaml")
    with pytest.raises(RunError, match="method cot has no latents to analyse") as err:
        analyze_run(tmp_path)
    able = ["pause", "soft", "liu", "h1", "h2", "coconut", "latent_sft"]
    assert err.value.fix == f"analyse a run of {', '.join(able[:-1])} or {able[-1]}"


def test_cli_analyze_prints_the_summary_as_json(soft_run: Path, capsys) -> None:
    from latentlab.cli import main

    assert main(["analyze", str(soft_run), "--n", "4", "--top-k", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "soft" and summary["n"] == 4
    assert len(summary["H"]) == 3 and (soft_run / "analysis" / "capture.png").is_file()
