"""GSM8K: both shared formats load and score; numbers are compared after normalisation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from latentlab.errors import DataError
from latentlab.tasks import Example, build_task
from latentlab.tasks.base import TaskConfig
from latentlab.tasks.gsm8k import GSM8KConfig, GSM8KTask


def gold(answer: str) -> Example:
    return Example(question="q", steps=(), answer=answer)


def sizes(t: GSM8KTask) -> dict[str, int]:
    return {split: len(t.load(split)) for split in ("train", "valid", "test")}


def test_openai_jsonl_loads_with_valid_cut_from_train(shared_data: Path) -> None:
    t = GSM8KTask(GSM8KConfig(train=str(shared_data / "gsm8k/train.jsonl"),
                              test=str(shared_data / "gsm8k/test.jsonl")))
    assert sizes(t) == {"train": 7473 - 500, "valid": 500, "test": 1319}
    train, valid = t.load("train"), t.load("valid")
    rows = [json.loads(line) for line in (shared_data / "gsm8k/train.jsonl").open()]
    assert [e.question for e in train + valid] == [r["question"] for r in rows]
    assert valid[-1].question == rows[-1]["question"]  # valid is the tail of the file
    first = train[0]
    assert first.question.startswith("Natalia sold clips")
    assert first.steps == ("48/2=24", "48+24=72") and first.answer == "72"
    for split in ("train", "valid", "test"):
        examples = t.load(split)
        assert all(t.score(e.answer, e) for e in examples)
        assert all("," not in e.answer and "<<" not in "".join(e.steps) for e in examples)


def test_aug_text_loads(shared_data: Path) -> None:
    root = shared_data / "gsm8k_aug"
    t = GSM8KTask(GSM8KConfig(format="aug", train=str(root / "train_small.txt"),
                              valid=str(root / "valid.txt"), test=str(root / "test.txt")))
    assert sizes(t) == {"train": 6973, "valid": 500, "test": 1319}
    first = t.load("valid")[0]
    assert first.question.endswith("How much does he pay per year?")
    assert first.steps == ("4-2=2", "2/.5=4", "12/4=3", "100*3=300") and first.answer == "300"
    for split in ("train", "valid", "test"):
        examples = t.load(split)
        assert all(t.score(e.answer, e) for e in examples)


def test_defaults_point_at_shared_data(shared_data: Path) -> None:
    t = build_task(TaskConfig(name="gsm8k"))
    assert len(t.load("test")) == 1319
    aug = GSM8KTask(GSM8KConfig(format="aug"))
    assert len(aug.load("valid")) == 500
    # An explicit null valid cuts it from train, also for aug.
    carved = GSM8KTask(GSM8KConfig(format="aug", valid=None, valid_from_train=100))
    assert len(carved.load("valid")) == 100 and len(carved.load("train")) == 6973 - 100


@pytest.mark.parametrize(("prediction", "answer", "correct"), [
    ("1,000", "1000", True),
    ("$5", "5", True),
    ("12.0", "12", True),
    ("12.", "12", True),
    ("The answer is 42.", "42", True),
    ("So she pays $1,234.50 in total", "1234.5", True),
    ("-7", "-7", True),
    ("7", "-7", False),
    ("41", "42", False),
    ("42 or 43", "42", False),
    ("forty-two", "42", False),
    ("", "42", False),
])
def test_numeric_normalisation(prediction: str, answer: str, correct: bool) -> None:
    t = GSM8KTask(GSM8KConfig())
    assert t.score(prediction, gold(answer)) is correct


def test_gold_answers_are_normalised(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"question": "q", "answer": "<<a=1,200>> so #### 1,200"},
            {"question": "q", "answer": "#### $12.0"},
            {"question": "q", "answer": "#### 0.50"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = GSM8KTask(GSM8KConfig(test=str(path))).read(path, "test")
    assert [e.answer for e in examples] == ["1200", "12", "0.5"]
    assert examples[0].steps == ("a=1,200",)


@pytest.mark.parametrize(("text", "message"), [
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q", "ans',
     r"rows\.jsonl:2 is not valid"),
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n',
     r"rows\.jsonl:2 has no field 'answer'"),
    ('{"question": "q", "answer": "no final number"}\n', r"rows\.jsonl:1: the solution has no"),
    ('{"question": 3, "answer": "#### 1"}\n', r"rows\.jsonl:1: fields 'question' and 'answer'"),
])
def test_bad_jsonl_rows_raise(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        GSM8KTask(GSM8KConfig(test=str(path))).load("test")


def test_bad_aug_lines_raise(tmp_path: Path) -> None:
    path = tmp_path / "rows.txt"
    path.write_text("q||<<1+1=2>> #### 2\nno separator #### 3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.txt:2 has no '\|\|'"):
        GSM8KTask(GSM8KConfig(format="aug", test=str(path))).load("test")


def test_missing_file_and_impossible_cut(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        GSM8KTask(GSM8KConfig(test=str(tmp_path / "nope.jsonl"))).load("test")
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="valid_from_train"):
        GSM8KTask(GSM8KConfig(train=str(path))).load("valid")


def test_hub_options() -> None:
    with pytest.raises(ValidationError):
        GSM8KConfig(format="hub", train="train.jsonl")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DataError, match=r"latentlab\[hub\]"):
            GSM8KTask(GSM8KConfig(format="hub")).load("test")
