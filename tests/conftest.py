"""Shared fixtures: locations of the optional real data set and the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ML100K_DIR = Path(os.environ.get("METAREC_ML100K_DIR", REPO_ROOT.parent / "shared" / "data" / "ml-100k"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """MovieLens-100K, read in place (its licence forbids copying it into the repository)."""
    if not (ML100K_DIR / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {ML100K_DIR} (set METAREC_ML100K_DIR to run this test)")
    return ML100K_DIR
