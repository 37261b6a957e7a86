"""User-facing errors: each names the problem and the fix.

The CLI prints them as one line, without a traceback.
"""

from __future__ import annotations


class LatentlabError(Exception):
    """An error the user can fix. `str(err)` is the one-line message the CLI prints."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}." if fix else f"{problem}.")


class ConfigError(LatentlabError):
    """A malformed or impossible configuration."""


class DataError(LatentlabError):
    """A missing, unreadable or malformed data file or row."""


class ModelError(LatentlabError):
    """A backbone, tokenizer or checkpoint that cannot be used as asked."""


class RunError(LatentlabError):
    """A run directory in the wrong state (exists without --resume, nothing to resume, ...)."""


class NumericalError(LatentlabError):
    """A non-finite loss or gradient."""
