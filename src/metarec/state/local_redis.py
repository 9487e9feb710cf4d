"""A throwaway ``redis-server`` on a free loopback port (tests, benchmarks, local trials).

It keeps nothing on disk (no RDB snapshots, no append-only file) and is stopped by its own pid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(workdir: str | Path, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """Starts ``redis-server`` on 127.0.0.1 and waits until it answers PING.

    Args:
        workdir: Folder for its log (created).
        port: The port (default: a free one); e.g. the port of a stopped server, to restart it.

    Returns:
        ``(url, process)``; stop the process with :func:`stop_redis`.

    Raises:
        FileNotFoundError: ``redis-server`` is not installed (``apt-get install -y redis-server``).
        RuntimeError: it exited or did not answer in time.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port() if port is None else int(port)
    command = [executable, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--logfile", str(workdir / "redis.log")]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(process, port, workdir / "redis.log")
    except RuntimeError:
        stop_redis(process)
        raise
    return f"redis://127.0.0.1:{port}/0", process


def wait_for_redis(process: subprocess.Popen, port: int, log: Path) -> None:
    """Waits until a starting ``redis-server`` answers on 127.0.0.1 (a PONG, or a NOAUTH refusal from one
    that requires a password).

    Args:
        process: the server.
        port: its port.
        log: its log file, named in the error.

    Raises:
        RuntimeError: it exited or did not answer within ``START_TIMEOUT_S``.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer on port {port} within {START_TIMEOUT_S}s; see {log}")


def stop_redis(process: subprocess.Popen) -> None:
    """Stops a server started by :func:`start_redis`."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
