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


@pytest.fixture(scope="module", autouse=True)
def state_store_outside_the_repository(tmp_path_factory):
    """Handlers built in-process (and TorchServe started by tests) keep their per-user state store in a
    temporary directory, not in the working directory the tests run from (the repository); one per
    test module, so that one module's users (feedback, new users) never show up in another's answers."""
    previous = os.environ.get("METAREC_STATE_URL")
    os.environ["METAREC_STATE_URL"] = f"sqlite:///{tmp_path_factory.mktemp('state') / 'metarec-state.sqlite'}"
    yield
    if previous is None:
        os.environ.pop("METAREC_STATE_URL", None)
    else:
        os.environ["METAREC_STATE_URL"] = previous
