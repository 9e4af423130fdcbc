"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MLIPUQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path inside ../shared/data; skip the calling test with a reason if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared data set {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded random generator (reproducible tests)."""
    return np.random.default_rng(12345)
