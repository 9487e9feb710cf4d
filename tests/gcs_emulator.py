"""A real GCS emulator (``gcp-storage-emulator``) for tests, on 127.0.0.1 and a free port.

Bind the fixtures in a test module (``gcs_bucket = gcs_emulator_module.gcs_bucket``, see test_storage.py);
they can move to ``tests/conftest.py`` unchanged if more suites need them. Tests skip with a reason when the
emulator is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_START_TIMEOUT_S = 20.0


@dataclass
class EmulatorServer:
    """A running emulator.

    Attributes:
        url: ``http://127.0.0.1:PORT``, the value for ``STORAGE_EMULATOR_HOST``.
        process: The emulator process.
        data_dir: Where object bytes live on disk, or None for an in-memory emulator.
    """

    url: str
    process: subprocess.Popen
    data_dir: Path | None

    def object_path(self, bucket: str, name: str) -> Path:
        """Returns the file holding an object's bytes (disk-backed emulator only).

        Args:
            bucket: Bucket name.
            name: Object name.

        Returns:
            The path inside the emulator's storage folder.
        """
        if self.data_dir is None:
            raise ValueError("an in-memory emulator keeps no files")
        return self.data_dir / ".cloudstorage" / bucket / name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_emulator(data_dir: Path | None = None) -> EmulatorServer:
    """Starts an emulator and waits until it accepts connections.

    Args:
        data_dir: Folder for on-disk storage (lets a test tamper with object bytes); None for
            ``--in-memory``.

    Returns:
        The running server; stop it with :func:`stop_emulator`.
    """
    executable = shutil.which("gcp-storage-emulator") or str(
        Path(sys.executable).parent / "gcp-storage-emulator"
    )
    if not Path(executable).exists():
        pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    port = _free_port()
    command = [executable, "start", "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    env = dict(os.environ)
    if data_dir is None:
        command.append("--in-memory")
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        env["STORAGE_BASE"] = str(data_dir)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=data_dir or None
    )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"emulator exited: {process.stderr.read().decode(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return EmulatorServer(f"http://127.0.0.1:{port}", process, data_dir)
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"emulator did not listen on 127.0.0.1:{port} within {_START_TIMEOUT_S} s")


def stop_emulator(server: EmulatorServer) -> None:
    """Stops an emulator started by :func:`start_emulator`.

    Args:
        server: The server to stop.
    """
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    if server.process.stderr:
        server.process.stderr.close()


def use_emulator(url: str | None) -> str | None:
    """Points the storage client at ``url`` (None: unset); returns the previous value."""
    from metarec.storage.gcs import _cached_client

    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    if url is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = url
    _cached_client.cache_clear()
    return previous


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[EmulatorServer]:
    """An in-memory emulator shared by the session (stopped at its end). It does not change the
    environment: use ``gcs_bucket``, which points ``STORAGE_EMULATOR_HOST`` at it for one test only."""
    server = start_emulator()
    try:
        yield server
    finally:
        stop_emulator(server)


@pytest.fixture
def gcs_bucket(gcs_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty bucket on the session emulator, with ``STORAGE_EMULATOR_HOST`` pointing at it for
    the duration of the test; returns the bucket name."""
    from metarec import storage
    from metarec.storage.gcs import _cached_client

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    _cached_client.cache_clear()
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.get_client().create_bucket(name)
    yield name
    _cached_client.cache_clear()
