"""Analyses of latents: capture matrix against hand-computed values, token readout, heatmap,
and `analyze_run` on tiny trained runs (Latent-SFT's metrics on a two-phase pipeline)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from test_training import TINY
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch import nn
from transformers import PreTrainedTokenizerFast

from latentlab.config import dump_config, load_config
from latentlab.errors import ConfigError, RunError
from latentlab.methods.base import steps_text
from latentlab.methods.latent_sft import LatentSFT, LatentSFTEncoder
from latentlab.methods.latent_sft.metrics import ecr_at_k, effective_parallelism, solution_paths
from latentlab.recipes import evaluate, load_run, train
from latentlab.study.analysis import (
    analyze_run,
    capture_matrix,
    default_max_components,
    plot_heatmap,
    top_tokens,
)
from latentlab.tasks import build_task
from latentlab.tasks.countdown import all_solutions

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
    able = ["pause", "soft", "liu", "h1", "h2", "coconut", "latent_sft", "codi"]
    assert err.value.fix == f"analyse a run of {', '.join(able[:-1])} or {able[-1]}"


def test_cli_analyze_prints_the_summary_as_json(soft_run: Path, capsys) -> None:
    from latentlab.cli import main

    assert main(["analyze", str(soft_run), "--n", "4", "--top-k", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "soft" and summary["n"] == 4
    assert len(summary["H"]) == 3 and (soft_run / "analysis" / "capture.png").is_file()


# ----------------------------------------------------------------- Latent-SFT's metrics

LATENT_SFT_KEYS = {
    "run_dir", "task", "method", "split", "n", "phase", "encoder_run", "chunk_size", "k",
    "ecr_at_k", "length", "n_eff_mean", "n_eff_share_above", "n_eff_threshold", "n_eff_examples",
    "multi_solution_examples", "n_eff_note", "per_example", "summary"}


@pytest.fixture(scope="module")
def latent_sft_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A phase-encoder run and a phase-latent run from it (as test_latent_sft's pipeline);
    eval.batch_size=3: the 8 validation examples go in batches of 3, 3, 2."""
    root = tmp_path_factory.mktemp("latent_sft")
    encoder, latent = root / "encoder", root / "latent"
    common = ["method.name=latent_sft", "train.max_steps=null", "train.eval_every=0",
              "method.max_latent_steps=4", "eval.batch_size=3"]
    train(load_config(base=TINY, overrides=[f"out_dir={encoder}", *common,
                                            "method.schedule_epochs=[1,1,1]"]))
    train(load_config(base=TINY, overrides=[
        f"out_dir={latent}", *common, "method.phase=latent", f"method.encoder_from={encoder}",
        f"model.init_from={encoder}", "train.epochs=1"]))
    return encoder, latent


def test_analyze_latent_sft_writes_ecr_lengths_and_n_eff(latent_sft_runs: tuple[Path, Path]
                                                         ) -> None:
    encoder_run, latent_run = latent_sft_runs
    summary = analyze_run(latent_run, split="valid")
    path = latent_run / "analysis" / "latent_sft.json"
    assert summary["files"][-1] == str(path)
    saved = json.loads(path.read_text())
    assert set(saved) == LATENT_SFT_KEYS
    assert summary["latent_sft"] == {k: v for k, v in saved.items() if k != "per_example"}
    assert (saved["phase"], saved["n"], saved["split"], saved["k"]) == ("latent", 8, "valid", 50)
    assert saved["encoder_run"] == str(encoder_run)

    # ECR@50 against the encoder's alphas of all 8 examples at once (analyze went in batches
    # of 3); K = 50 is beyond α's support (top_k), so the ranking must cover the vocabulary.
    encoder, config = load_run(encoder_run)
    assert isinstance(encoder, LatentSFT) and encoder.config.top_k < 50
    task = build_task(config.task)
    examples = task.load("valid")
    alphas = encoder.encoder_alphas(examples, 50)
    assert all(i.shape[1] == 50 for i, _ in alphas)
    chunks = [encoder.chunks(e) for e in examples]
    expected = ecr_at_k([i for i, _ in alphas], chunks, k=50)
    assert saved["ecr_at_k"] == pytest.approx(expected)
    assert 0.0 < saved["ecr_at_k"] < encoder.config.chunk_size

    # Lengths: #L and Pass@1 as `evaluate` measures them; CoT tokens from the tokenizer.
    method, _ = load_run(latent_run)
    metrics, _ = evaluate(method, task, examples, config.eval)
    rows = saved["per_example"]
    assert saved["length"]["latent_steps"] == pytest.approx(metrics["latent_steps"])
    assert saved["length"]["pass@1"] == pytest.approx(100 * metrics["accuracy"])
    assert [r["cot_tokens"] for r in rows] == [
        len(method.tokenizer(steps_text(e.steps), add_special_tokens=False)["input_ids"])
        for e in examples]

    # N_eff: 1 <= N_eff <= M where defined (M >= 2 solutions, T >= 1 latent step), and example
    # by example the value of that example alone.
    assert [r["solutions"] for r in rows] == [
        len(all_solutions(e.meta["numbers"], e.meta["target"])) for e in examples]
    scored = [r["n_eff"] for r in rows if r["n_eff"] is not None]
    assert len(scored) == saved["n_eff_examples"] >= 2
    for example, row in zip(examples, rows, strict=True):
        assert (row["n_eff"] is None) == (row["solutions"] < 2 or row["latent_steps"] < 1)
        if row["n_eff"] is not None:
            assert 1.0 - 1e-9 <= row["n_eff"] <= row["solutions"] + 1e-9
            (q,) = method.latent_distributions([example])
            solutions = all_solutions(example.meta["numbers"], example.meta["target"])
            alone = effective_parallelism(q, solution_paths(method.tokenizer, solutions, len(q)))
            assert row["n_eff"] == pytest.approx(alone, rel=1e-4)
    assert saved["multi_solution_examples"] == sum(r["solutions"] >= 2 for r in rows)
    assert saved["n_eff_mean"] == pytest.approx(sum(scored) / len(scored))
    assert saved["n_eff_share_above"] == sum(v > 1.7 for v in scored) / len(scored)

    # The encoder run itself: the same ECR@K, no lengths, no N_eff (its decoder never learned
    # to produce latents). With K = V every chunk token is found: ECR = mean chunk length.
    vocab = encoder.backbone.get_input_embeddings().num_embeddings
    own = analyze_run(encoder_run, split="valid", options={"ecr_k": vocab})["latent_sft"]
    assert own["phase"] == "encoder" and own["encoder_run"] == str(encoder_run)
    r = encoder.config.chunk_size
    lengths = [len(encoder.tokenizer(steps_text(e.steps), add_special_tokens=False)
                   ["input_ids"]) for e in examples]
    assert own["ecr_at_k"] == pytest.approx(sum(lengths) / sum(-(-n // r) for n in lengths))
    assert own["length"] is None and own["n_eff_mean"] is None
    assert "phase-latent run" in own["n_eff_note"]
    assert json.loads((encoder_run / "analysis" / "latent_sft.json").read_text())[
        "per_example"] is None


class ChunkEcho:
    """A stand-in encoder whose latent i of example j ranks chunk i of example j first (then
    tokens no chunk uses): ECR@K is the mean chunk length, unless alphas and chunks of
    different examples are paired. Records the batches it is given."""

    def __init__(self, vocab: int = 40) -> None:
        self.backbone = SimpleNamespace(get_input_embeddings=lambda: nn.Embedding(vocab, 1))
        self.batches: list[int] = []

    def chunks(self, example: Any) -> list[list[int]]:
        j = int(example.question)
        return [[2 * j, 2 * j + 1], [20 + j]][: 1 + j % 2]  # 1 or 2 chunks

    def encoder_alphas(self, batch: list[Any], k: int) -> list[tuple[torch.Tensor, None]]:
        self.batches.append(len(batch))
        filler = list(range(30, 40))
        return [(torch.tensor([(c + filler)[:k] for c in self.chunks(e)]), None) for e in batch]


def test_encoder_ecr_pairs_each_examples_alphas_with_its_chunks() -> None:
    examples = [SimpleNamespace(question=str(j)) for j in range(7)]
    echo = ChunkEcho()
    chunks = [c for e in examples for c in echo.chunks(e)]
    mean_length = sum(map(len, chunks)) / len(chunks)
    assert LatentSFTEncoder.ecr(echo, examples, k=5, batch_size=3) == pytest.approx(mean_length)
    assert echo.batches == [3, 3, 1]
    # K = 1 finds only each chunk's first token: one per latent.
    assert LatentSFTEncoder.ecr(echo, examples, k=1, batch_size=2) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="K <= the vocabulary size \\(40\\)"):
        LatentSFTEncoder.ecr(echo, examples, k=41)


def test_cli_analyze_passes_ecr_k_and_refuses_a_k_beyond_the_vocabulary(
        latent_sft_runs: tuple[Path, Path], capsys) -> None:
    from latentlab.cli import main

    encoder_run, _ = latent_sft_runs
    assert main(["analyze", str(encoder_run), "--n", "4", "--option", "ecr_k=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["latent_sft"]["k"] == 1 and summary["latent_sft"]["n"] == 4
    assert 0.0 <= summary["latent_sft"]["ecr_at_k"] <= 1.0  # one token per latent at most
    with pytest.raises(ConfigError, match="ECR@K needs 1 <= K"):
        analyze_run(encoder_run, n=2, options={"ecr_k": 10**6})
    # Checked before the model loads: the method's own options, valid values only.
    with pytest.raises(ConfigError, match="--option ecr_k=-3 is invalid for method latent_sft"):
        analyze_run(encoder_run, n=2, options={"ecr_k": -3})
    with pytest.raises(ConfigError, match=r"--option ecr is not an analysis option of method "
                                          r"latent_sft\. Fix: use one of ecr_k"):
        analyze_run(encoder_run, n=2, options={"ecr": 5})


def test_a_removed_encoder_run_is_a_clear_error(latent_sft_runs: tuple[Path, Path],
                                                tmp_path: Path, capsys) -> None:
    from latentlab.cli import main

    encoder_run, latent_run = latent_sft_runs
    gone, latent = tmp_path / "encoder", tmp_path / "latent"
    shutil.copytree(encoder_run, gone, ignore=shutil.ignore_patterns("analysis"))
    shutil.copytree(latent_run, latent, ignore=shutil.ignore_patterns("analysis"))
    config = load_config(latent / "config.yaml")
    config.method.encoder_from = str(gone)
    dump_config(config, latent / "config.yaml")
    analyze_run(latent, n=2)  # works while the encoder run is there
    shutil.rmtree(latent / "analysis")
    shutil.rmtree(gone)
    with pytest.raises(RunError, match=f"encoder run {gone} .*cannot be loaded") as err:
        analyze_run(latent, n=2)
    assert str(gone) in err.value.fix and str(latent / "config.yaml") in err.value.fix
    assert not (latent / "analysis" / "capture.json").exists()  # stopped before the capture
    assert main(["analyze", str(latent), "--n", "2"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("latentlab: error: ") and "\n" not in message
    assert str(gone) in message and "Fix: restore the phase-encoder run" in message
