"""Fixtures shared by the tests beside each component (``components/<name>/tests/``).

The helpers the repository's tests use (real GCS emulator, fake Kubernetes API server, stand-in KFP
components) live in ``tests/``; this puts that folder on the import path for the component tests too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402,F401 - fixtures re-exported


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout."""
    return REPO_ROOT


@pytest.fixture()
def local_runner(tmp_path):
    """kfp.local in this environment (no venv per task); yields the pipeline root.

    kfp.local's per-task print and logging swaps, interleaved by a ParallelFor's threads, can leave an
    indenting ``print`` behind (it prefixed a later test's captured output): put them back after the test,
    as ``metarec run-local`` does after a run.
    """
    from kfp import local

    from metarec.pipelines.local_run import restore_print_and_logging

    root = tmp_path / "pipeline_root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        workspace_root=str(tmp_path / "ws"),
    )
    with restore_print_and_logging():
        yield root


@pytest.fixture()
def kube(tmp_path, monkeypatch):
    """A fake Kubernetes API server with ``KUBECONFIG`` pointing at it; yields the ``FakeKube``."""
    from fake_kube import FakeKube

    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield fake
