"""Plain-text pretraining: a streamed corpus cut into fixed-length token windows.

Documents come from local files (plain, `.xz`, `.gz` or `.bz2`; a line starting `<|doc|>`
opens a new document, otherwise a file is one document) or, for users who are online, from a
hub dataset streamed with `datasets`. Each document goes to train, valid or test by a stable
hash of its first line, so the splits never share a document and every run agrees. Windows are
read only as far as the split needs (`n_train` / `n_valid` / `n_test` windows of `seq_len`
tokens), so a large corpus is never loaded whole.

The text task has no answers to score: methods are judged by perplexity
(`latentlab.recipes.pretraining`).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from pydantic import Field

from latentlab.errors import DataError
from latentlab.paths import resolve_path
from latentlab.tasks.base import Example, Split, Task, TaskConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DOC_MARKER = "<|doc|>"
_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


class TextConfig(TaskConfig):
    name: Literal["text"] = "text"
    files: list[str] = Field(
        default_factory=lambda: ["${LATENTLAB_SHARED}/data/text/*.txt.xz"],
        description="glob patterns of text files (plain, .xz, .gz, .bz2)")
    hub_id: str | None = Field(None, description="a hub dataset streamed instead of files, "
                               "e.g. HuggingFaceFW/fineweb-edu (needs latentlab[hub], network)")
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    seq_len: int = Field(256, ge=8, description="tokens per training window")
    heldout_fraction: float = Field(0.02, gt=0, lt=0.5, description="share of documents "
                                    "held out, half for valid and half for test")


class TextTask(Task):
    name = "text"
    config_class = TextConfig
    kind = "text"
    config: TextConfig

    def documents(self, split: Split) -> Iterator[str]:
        """The documents of a split, streamed."""
        source = self._hub_documents() if self.config.hub_id else self._file_documents()
        for document in source:
            if self.split_of(document) == split:
                yield document

    def split_of(self, document: str) -> Split:
        head = document.split("\n", 1)[0].encode("utf-8", "replace")
        bucket = zlib.crc32(head) % 10_000 / 10_000
        held = self.config.heldout_fraction
        return "valid" if bucket < held / 2 else "test" if bucket < held else "train"

    def windows(self, split: Split, tokenizer: PreTrainedTokenizerBase,
                n: int | None = None) -> list[list[int]]:
        """`n` (default: the split's size) windows of `seq_len` tokens; documents are joined
        with EOS, as in GPT-2's pretraining."""
        n = n if n is not None else self.config.size(split)
        length, buffer, out = self.config.seq_len, [], []
        for document in self.documents(split):
            buffer += [*tokenizer(document, add_special_tokens=False)["input_ids"],
                       tokenizer.eos_token_id]
            while len(buffer) >= length and len(out) < n:
                out.append(buffer[:length])
                buffer = buffer[length:]
            if len(out) == n:
                return out
        if not out:
            raise DataError(f"the text corpus has no {split} document long enough for one "
                            f"window of {length} tokens", fix="add text files or lower "
                            "task.seq_len / raise task.heldout_fraction")
        return out

    def _file_documents(self) -> Iterator[str]:
        paths = sorted({p for pattern in self.config.files
                        for p in glob.glob(str(resolve_path(pattern)))})
        if not paths:
            raise DataError(f"no text file matches {self.config.files}",
                            fix="set task.files to existing files (or set LATENTLAB_SHARED)")
        for path in paths:
            yield from read_documents(Path(path))

    def _hub_documents(self) -> Iterator[str]:
        try:
            from datasets import load_dataset
        except ImportError:
            raise DataError("streaming a hub dataset needs the `datasets` package",
                            fix="pip install 'latentlab[hub]'") from None
        stream = load_dataset(self.config.hub_id, self.config.hub_config,
                              split=self.config.hub_split, streaming=True)
        for row in stream:
            yield row[self.config.text_field]

    def read(self, path: Path, split: Split) -> list[Example]:
        raise DataError("the text task has no question/answer examples",
                        fix="evaluate a text run by perplexity: `latentlab eval RUN_DIR`")

    def score(self, prediction: str, example: Example) -> bool:
        raise DataError("the text task is scored by perplexity, not by answers",
                        fix="use a reasoning task (countdown, prosqa, gsm8k) for accuracy")


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one file: split at lines starting with `<|doc|>`, else the whole file."""
    opener = _OPENERS.get(path.suffix, open)
    try:
        handle: IO[str]
        with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
            lines: list[str] = []
            for line in handle:
                if line.startswith(DOC_MARKER) and lines:
                    yield "".join(lines)
                    lines = []
                lines.append(line)
            if lines:
                yield "".join(lines)
    except (UnicodeDecodeError, lzma.LZMAError, OSError, EOFError) as exc:
        raise DataError(f"cannot read text file {path} ({exc})",
                        fix="check that it is UTF-8 text, plain or .xz/.gz/.bz2") from None
