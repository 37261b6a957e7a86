"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentlab.tasks.base import resolve_path


@pytest.fixture
def shared_data() -> Path:
    """The reference data (`$LATENTLAB_SHARED/data`, by default `../shared/data`)."""
    path = resolve_path("${LATENTLAB_SHARED}/data")
    if not path.is_dir():
        pytest.skip("reference data ../shared/data not found; set LATENTLAB_SHARED")
    return path
