"""The text task and the pretraining recipe end to end: Base, then a Coprocessor from it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from latentlab.cli import main
from latentlab.config import load_config
from latentlab.errors import ConfigError, DataError
from latentlab.recipes import train
from latentlab.tasks import TextConfig, build_task

SENTENCES = ["The cat sat on the mat.", "A dog ran in the park.", "Rain fell on the town.",
             "Ships sail across the sea.", "Birds sing at dawn."]


def corpus(tmp_path: Path) -> Path:
    docs = [f"<|doc|> Book {i}\n" + " ".join(SENTENCES[(i + j) % 5] for j in range(60)) + "\n"
            for i in range(40)]
    (tmp_path / "a.txt").write_text("".join(docs[:20]), encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(docs[20:]))
    return tmp_path


def test_documents_split_by_hash_and_windows_have_the_right_length(tmp_path: Path) -> None:
    task = build_task(TextConfig(files=[str(corpus(tmp_path) / "*")], heldout_fraction=0.3,
                                 seq_len=16))
    splits = {s: list(task.documents(s)) for s in ("train", "valid", "test")}
    assert sum(len(d) for d in splits.values()) == 40
    assert all(splits.values())  # 30% held out of 40 documents: every split has some
    heads = [{d.splitlines()[0] for d in docs} for docs in splits.values()]
    assert not (heads[0] & heads[1]) and not (heads[0] & heads[2])
    from latentlab.backbones import train_tokenizer
    tok = train_tokenizer(SENTENCES * 5, 300)
    windows = task.windows("train", tok, n=7)
    assert len(windows) == 7 and all(len(w) == 16 for w in windows)
    with pytest.raises(DataError, match="no text file matches"):
        list(build_task(TextConfig(files=[str(tmp_path / "none*.txt")])).documents("train"))


def test_pretrain_a_base_then_a_coprocessor_and_report_perplexity_by_position(
        tmp_path: Path, capsys) -> None:
    files = str(corpus(tmp_path / "data" if (tmp_path / "data").mkdir() is None else tmp_path))
    base = {"task": {"name": "text", "files": [files + "/*"], "seq_len": 32, "n_train": 24,
                     "n_valid": 4, "n_test": 4, "heldout_fraction": 0.3},
            "method": {"name": "nocot"},
            "model": {"name": "gpt2-tiny", "tokenizer_vocab_size": 300},
            "train": {"max_steps": 3, "batch_size": 8, "eval_every": 3, "lr": 1e-3},
            "eval": {"batch_size": 4}}
    base_dir = tmp_path / "base"
    results = train(load_config(base=base, overrides=[f"out_dir={base_dir}"]))
    assert results["valid"]["perplexity"] > 1 and "accuracy" not in results["valid"]
    copro = train(load_config(base=base, overrides=[
        f"out_dir={tmp_path / 'h1'}", "method.name=h1", f"model.init_from={base_dir}",
        "method.latent_budget=2", "method.augmentation_points=3", "method.ahead_tokens=4"]))
    for split in ("valid", "test"):
        assert len(copro[split]["perplexity_by_position"]) == 4
        assert len(copro[split]["base_perplexity_by_position"]) == 4
        assert copro[split]["base_perplexity"] > 1
    rows = [json.loads(r) for r in (tmp_path / "h1" / "metrics.jsonl").read_text().splitlines()]
    assert any("perplexity" in r for r in rows)
    assert main(["eval", str(tmp_path / "h1"), "--split", "test"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["split"] == "test" and last["n"] == 4 and last["perplexity"] > 1
    with pytest.raises(ConfigError, match="no text-pretraining recipe"):
        train(load_config(base=base, overrides=[f"out_dir={tmp_path / 'soft'}",
                                                "method.name=soft"]))
