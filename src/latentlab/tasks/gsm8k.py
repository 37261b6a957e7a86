"""GSM8K grade-school maths: OpenAI's JSON lines, iCoT's "GSM8k-Aug" text, or a hub dataset.

Whatever the source, an example is the question, the calculator equations as steps (`48/2=24`,
without `<< >>`) and the final number as the answer. GSM8K cannot be generated: with no file for
a split, the defaults below point at the shared reference data.

Validation: OpenAI's release and the hub have no validation split. When `valid` is None, the
last `valid_from_train` rows of train are the validation split and train keeps the rest (a
fixed, seed-independent cut, so runs agree and validation never overlaps train). GSM8k-Aug ships
its own 500-row valid file, used by default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from latentlab.errors import DataError, require_file
from latentlab.tasks.base import (
    Example,
    Split,
    Task,
    TaskConfig,
    read_jsonl,
    require,
    resolve_path,
)

_DEFAULT_FILES: dict[str, dict[str, str]] = {
    "jsonl": {"train": "${LATENTLAB_SHARED}/data/gsm8k/train.jsonl",
              "test": "${LATENTLAB_SHARED}/data/gsm8k/test.jsonl"},
    "aug": {"train": "${LATENTLAB_SHARED}/data/gsm8k_aug/train_small.txt",
            "valid": "${LATENTLAB_SHARED}/data/gsm8k_aug/valid.txt",
            "test": "${LATENTLAB_SHARED}/data/gsm8k_aug/test.txt"},
}
_EQUATION = re.compile(r"<<(.*?)>>")
# A number as written in text: optional sign, thousands separators, decimals (`-1,234.5`, `.5`).
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


class GSM8KConfig(TaskConfig):
    """GSM8K from files (OpenAI's or iCoT's format) or from a hub dataset."""

    name: Literal["gsm8k"] = "gsm8k"
    format: Literal["jsonl", "aug", "hub"] = Field(
        "jsonl", description="jsonl: OpenAI's {question, answer} lines; aug: iCoT's "
                             "`question||<<eq>> <<eq>> #### N` lines; hub: a hub dataset id")
    hub_id: str = Field("openai/gsm8k", description="hub dataset (format hub)")
    hub_config: str = Field("main", description="hub dataset configuration (format hub)")
    valid_from_train: int = Field(
        500, ge=1, description="with no valid file: the last N train rows are the valid split "
                               "and train keeps the rest")

    @model_validator(mode="after")
    def _default_files(self) -> GSM8KConfig:
        """Point unset file fields at the shared data, so `name: gsm8k` alone works offline."""
        if self.format == "hub":
            given = [s for s in ("train", "valid", "test") if self.path(s) is not None]
            if given:
                raise ValueError(f"format hub reads every split from {self.hub_id!r}, but "
                                 f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set; "
                                 "unset them or choose format jsonl or aug")
            return self
        for split, path in _DEFAULT_FILES[self.format].items():
            # A field the user set, even to null (valid: carve it from train), is kept.
            if split not in self.model_fields_set:
                setattr(self, split, path)
        return self


def normalise_number(text: str) -> Decimal | None:
    """The last number in a text as an exact decimal (`$1,000.00` -> 1000); None if none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return Decimal(numbers[-1].replace(",", ""))
    except InvalidOperation:
        return None


def _answer_text(raw: str) -> str | None:
    """The gold answer as a plain number string (`1,200` -> `1200`, `12.0` -> `12`)."""
    value = normalise_number(raw)
    if value is None:
        return None
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


class GSM8KTask(Task):
    """GSM8K, scored by comparing the last number of the prediction with the gold number."""

    name = "gsm8k"
    config_class = GSM8KConfig
    config: GSM8KConfig

    def load(self, split: Split) -> list[Example]:
        """As the base, except that valid may be cut from train and hub data is downloaded."""
        cfg = self.config
        if cfg.format != "hub" and (split == "test" or cfg.valid is not None):
            return super().load(split)
        if split == "test":
            examples = self._from_hub("test")
        else:
            train = (self._from_hub("train") if cfg.format == "hub"
                     else self.read_file(self._train_path(), "train"))
            if cfg.valid_from_train >= len(train):
                raise DataError(f"valid_from_train ({cfg.valid_from_train}) leaves no train rows "
                                f"out of {len(train)}",
                                fix="lower task.valid_from_train or set task.valid to a file")
            cut = len(train) - cfg.valid_from_train
            examples = train[cut:] if split == "valid" else train[:cut]
        if split in cfg.limit:
            examples = examples[: cfg.limit[split]]
        return examples

    def _train_path(self) -> Path:
        if self.config.train is None:
            raise DataError("task.train is not set and GSM8K cannot be generated",
                            fix="set task.train to a data file")
        return resolve_path(self.config.train)

    def _from_hub(self, split: str) -> list[Example]:
        try:
            import datasets  # optional: only hub users need it
        except ImportError:
            raise DataError("format hub needs the `datasets` package",
                            fix="pip install latentlab[hub], or use format jsonl or aug with files"
                            ) from None
        cfg = self.config
        rows = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=split)
        return [self._parse_jsonl(dict(row), f"{cfg.hub_id}[{split}] row {index}")
                for index, row in enumerate(rows)]

    def read(self, path: Path, split: Split) -> list[Example]:
        if self.config.format == "aug":
            return list(self._read_aug(path))
        return [self._parse_jsonl(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]

    @staticmethod
    def _parse_jsonl(row: dict[str, Any], where: str) -> Example:
        """OpenAI's row: the answer's `<<a=b>>` notes are the steps, `#### N` the answer."""
        require(row, ("question", "answer"), where)
        question, solution = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(solution, str):
            raise DataError(f"{where}: fields 'question' and 'answer' must be strings",
                            fix="repair or delete that row")
        return _example(question, solution, where)

    @staticmethod
    def _read_aug(path: Path) -> Iterable[Example]:
        """iCoT's lines: `question||<<eq>> <<eq>> #### N`."""
        require_file(path, "data file", "check the path in the config", DataError)
        try:
            # Iterating a text file splits on newlines only: questions may contain U+2028.
            with path.open(encoding="utf-8") as handle:
                lines = list(handle)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text (byte {exc.start})",
                            fix="re-encode the file as UTF-8") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            question, separator, solution = line.rstrip("\n").rpartition("||")
            if not separator:
                raise DataError(f"{path}:{lineno} has no '||' between question and solution",
                                fix="each line must read question||<<eq>> ... #### N")
            yield _example(question.strip(), solution, f"{path}:{lineno}")

    def score(self, prediction: str, example: Example) -> bool:
        predicted, gold = normalise_number(prediction), normalise_number(example.answer)
        return predicted is not None and predicted == gold


def _example(question: str, solution: str, where: str) -> Example:
    """Question and a solution text with `<<eq>>` notes and a final `#### N`."""
    reasoning, marker, final = solution.rpartition("####")
    answer = _answer_text(final) if marker else None
    if answer is None:
        raise DataError(f"{where}: the solution has no final '#### N' number",
                        fix="end the solution with #### and the numeric answer")
    steps = tuple(eq.strip() for eq in _EQUATION.findall(reasoning))
    return Example(question=question, steps=steps, answer=answer)
