"""User-facing errors: each names the problem and the fix.

The CLI prints them as one line, without a traceback. File-system failures (`OSError`) are user
errors too: `PathError.from_os_error` words them, so no call site has to.
"""

from __future__ import annotations

import errno
from pathlib import Path


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


# errno -> (what is wrong with the path, how to fix it)
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOENT: ("{path} does not exist", "check the path"),
    errno.EEXIST: ("{path} exists and is not a directory",
                   "move that file away or choose another path"),
    errno.ENOTDIR: ("a part of {path} is a file, not a directory", "choose another path"),
    errno.EISDIR: ("{path} is a directory, not a file", "give the path of a file"),
    errno.EACCES: ("no permission to access {path}", "check the permissions of the path"),
    errno.EPERM: ("no permission to access {path}", "check the permissions of the path"),
    errno.EROFS: ("{path} is on a read-only file system", "choose a writable path"),
    errno.ENOSPC: ("no space left on the device holding {path}",
                   "free disk space, then run again (a training run: add --resume)"),
}


class PathError(LatentlabError):
    """A path that cannot be read or written as needed."""

    @classmethod
    def from_os_error(cls, exc: OSError) -> PathError:
        if exc.errno in _OS_ERRORS and exc.filename is not None:
            problem, fix = _OS_ERRORS[exc.errno]
            return cls(problem.format(path=exc.filename), fix)
        where = f" ({exc.filename})" if exc.filename is not None else ""
        return cls(f"{exc.strerror or exc}{where}", "check the paths the command uses")


def require_file(path: Path, what: str, fix: str,
                 error: type[LatentlabError] = PathError) -> None:
    """Raise `error` unless `path` is an existing file; `what` names its role ("data file")."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file", fix)
    if not path.is_file():
        raise error(f"{what} {path} does not exist", fix)


def not_utf8(path: Path, exc: UnicodeDecodeError, what: str,
             error: type[LatentlabError]) -> LatentlabError:
    """The error for a file that is not UTF-8 text; `what` names its role ("config file")."""
    return error(f"{what} {path} is not UTF-8 text (byte {exc.start})",
                 "re-encode the file as UTF-8")
