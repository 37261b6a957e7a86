"""Paths in configs: `~`, environment variables and the reference-data folder."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """Expand `~` and `$VARS`; `$LATENTLAB_SHARED` defaults to `../shared` (the reference data)."""
    env = dict(os.environ)
    env.setdefault("LATENTLAB_SHARED", str(Path("..", "shared").resolve()))
    text = str(path)
    for key in sorted(env, key=len, reverse=True):
        text = text.replace("${" + key + "}", env[key]).replace("$" + key, env[key])
    return Path(text).expanduser()
