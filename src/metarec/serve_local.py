"""Start and stop a local TorchServe on an archive written by :func:`metarec.packaging.build_archive`.

TorchServe keeps global state in the temporary directory: its pid file (``.model_server.pid``,
which ``torchserve --stop`` reads), the unpacked models (``models/<uuid>``) and the worker sockets
(``.ts.sock.<port>``, numbered from 9000 in every instance). Two servers sharing ``/tmp`` would
stop or talk to each other's processes, so every server started here gets a private temporary
directory ``<workdir>/tmp`` (``TMPDIR`` for the launcher, ``TEMP`` for the Java frontend) and runs
with ``<workdir>`` as its working directory (``logs/`` and ``key_file.json`` land there).

Security: the inference, management and metrics APIs listen on 127.0.0.1 only; registering models
through the management API stays off (``enable_model_api=false``). Token authorisation stays on by
default; the keys TorchServe generates are read back from ``key_file.json`` and returned in
:class:`ServerInfo` (send them as ``Authorization: Bearer <key>``). ``token_auth=False`` turns it
off for local demos only (``metarec serve --no-token-auth``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 120
# TorchServe's own files inside the work directory.
PRIVATE_TMP = "tmp"
KEY_FILE = "key_file.json"
# Written once the model is ready, so that other processes (metarec demo-request) can find the server.
SERVER_FILE = "server.json"
PID_FILE = ".model_server.pid"


@dataclass(frozen=True)
class ServerInfo:
    """Where a started TorchServe answers.

    Attributes:
        inference_url: Base URL of the inference API, e.g. ``http://127.0.0.1:8080``.
        management_url: Base URL of the management API.
        metrics_url: Base URL of the metrics API (Prometheus format).
        model_name: Name the model is registered under.
        workdir: Working directory of the server (logs, key file, private temporary directory).
        pid: Process id of the Java frontend.
        inference_token: Bearer key for the inference API; None when token authorisation is off.
        management_token: Bearer key for the management API; None when token authorisation is off.
    """

    inference_url: str
    management_url: str
    metrics_url: str
    model_name: str
    workdir: str
    pid: int
    inference_token: str | None = None
    management_token: str | None = None

    def inference_headers(self) -> dict[str, str]:
        """Returns the HTTP headers an inference call needs (the bearer key when auth is on)."""
        return {"Authorization": f"Bearer {self.inference_token}"} if self.inference_token else {}

    def management_headers(self) -> dict[str, str]:
        """Returns the HTTP headers a management call needs (the bearer key when auth is on)."""
        return {"Authorization": f"Bearer {self.management_token}"} if self.management_token else {}


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def format_properties(properties: dict[str, object]) -> str:
    """Renders a Java ``.properties`` document, one ``key=value`` line per entry.

    Args:
        properties: Keys and values; booleans become ``true``/``false``, dicts become compact JSON.

    Returns:
        The document text, ending with a newline.
    """
    lines = []
    for key, value in properties.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, dict):
            value = json.dumps(value, separators=(",", ":"))
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def _torchserve_env(workdir: Path) -> dict[str, str]:
    """Environment for the launcher: a private temporary directory and this venv first on PATH."""
    private_tmp = workdir / PRIVATE_TMP
    private_tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["TMPDIR"] = str(private_tmp)  # the launcher's pid file
    env["TEMP"] = str(private_tmp)  # the frontend's java.io.tmpdir: unpacked models, worker sockets
    # The workers must import metarec from this interpreter's environment.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _torchserve_executable() -> str:
    """Returns the ``torchserve`` launcher next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "torchserve"
    if beside.is_file():
        return str(beside)
    found = shutil.which("torchserve")
    if not found:
        raise RuntimeError("torchserve is not installed (pip install metarec[serving])")
    return found


def _read_keys(workdir: Path, deadline: float) -> tuple[str, str]:
    """Reads the inference and management keys TorchServe writes into ``key_file.json``."""
    key_path = workdir / KEY_FILE
    while time.monotonic() < deadline:
        try:
            keys = json.loads(key_path.read_text())
            return keys["inference"]["key"], keys["management"]["key"]
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.2)
    raise TimeoutError(f"TorchServe wrote no usable {key_path}")


def _get_json(url: str, headers: dict[str, str], timeout_s: float = 5.0):
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def model_workers(info: ServerInfo) -> list[dict]:
    """Returns the worker descriptions of the served model (management ``GET /models/<name>``).

    Args:
        info: The running server.

    Returns:
        One dict per worker (``id``, ``startTime``, ``status``, ``pid``, ...).
    """
    described = _get_json(f"{info.management_url}/models/{info.model_name}", info.management_headers())
    return described[0].get("workers", [])


def _log_tail(workdir: Path, n_chars: int = 3000) -> str:
    log = workdir / "logs" / "ts_log.log"
    return log.read_text(errors="replace")[-n_chars:] if log.is_file() else "(no logs/ts_log.log)"


def _frontend_pid(workdir: Path) -> int | None:
    pid_path = workdir / PRIVATE_TMP / PID_FILE
    try:
        return int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def start_server(
    archive_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    inference_port: int = 8080,
    management_port: int = 8081,
    metrics_port: int = 8082,
    model_name: str = "metarec",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    token_auth: bool = True,
    extra_properties: dict[str, object] | None = None,
) -> ServerInfo:
    """Starts TorchServe on ``archive_dir/model-store/<model_name>.mar`` and waits until it is ready.

    Args:
        archive_dir: Directory written by ``build_archive`` (``model-store/<model_name>.mar``).
        workdir: Working directory for the server (created); logs, keys and its private temporary
            directory go there. Use one directory per server.
        inference_port: Port of the inference API on 127.0.0.1 (0 = pick a free one).
        management_port: Port of the management API on 127.0.0.1 (0 = pick a free one).
        metrics_port: Port of the metrics API on 127.0.0.1 (0 = pick a free one).
        model_name: Name of the archive and of the registered model.
        timeout_s: How long to wait for a READY worker before giving up.
        token_auth: Keep TorchServe's token authorisation on (default); False disables it, for
            local demos only.
        extra_properties: More ``config.properties`` entries (e.g. ``default_workers_per_model``).

    Returns:
        ServerInfo with the URLs, the frontend pid and the bearer keys (None when auth is off).

    Raises:
        FileNotFoundError: The archive is missing.
        RuntimeError: TorchServe exited or did not become ready in time (the server is stopped and
            the error holds the end of its log).
    """
    archive_dir = Path(archive_dir).resolve()
    workdir = Path(workdir).resolve()
    model_store = archive_dir / "model-store"
    mar_name = f"{model_name}.mar"
    if not (model_store / mar_name).is_file():
        raise FileNotFoundError(f"no archive {model_store / mar_name}")
    workdir.mkdir(parents=True, exist_ok=True)
    # A server left running in this workdir would hold its pid file and ports: stop it first.
    stop_server(workdir)

    ports = {
        "inference": inference_port or free_port(),
        "management": management_port or free_port(),
        "metrics": metrics_port or free_port(),
        # gRPC cannot be switched off in 0.12: give it free loopback ports so servers never collide.
        "grpc_inference": free_port(),
        "grpc_management": free_port(),
    }
    properties: dict[str, object] = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": ports["grpc_inference"],
        "grpc_management_port": ports["grpc_management"],
        "metrics_mode": "prometheus",
        "enable_model_api": False,
        "disable_token_authorization": not token_auth,
        "model_store": str(model_store),
    }
    properties.update(extra_properties or {})
    config_path = workdir / "config.properties"
    config_path.write_text(format_properties(properties))

    command = [
        _torchserve_executable(),
        "--start",
        "--ncs",
        "--model-store",
        str(model_store),
        "--models",
        f"{model_name}={mar_name}",
        "--ts-config",
        str(config_path),
    ]
    if not token_auth:
        command.append("--disable-token-auth")
    env = _torchserve_env(workdir)
    with open(workdir / "launcher.log", "wb") as launcher_log:
        subprocess.run(
            command, cwd=workdir, env=env, stdout=launcher_log, stderr=subprocess.STDOUT, check=True
        )

    deadline = time.monotonic() + timeout_s
    try:
        pid = None
        while pid is None and time.monotonic() < deadline:
            pid = _frontend_pid(workdir)
            time.sleep(0.1)
        if pid is None:
            raise RuntimeError("torchserve wrote no pid file")
        inference_token = management_token = None
        if token_auth:
            inference_token, management_token = _read_keys(workdir, deadline)
        info = ServerInfo(
            inference_url=f"http://127.0.0.1:{ports['inference']}",
            management_url=f"http://127.0.0.1:{ports['management']}",
            metrics_url=f"http://127.0.0.1:{ports['metrics']}",
            model_name=model_name,
            workdir=str(workdir),
            pid=pid,
            inference_token=inference_token,
            management_token=management_token,
        )
        while time.monotonic() < deadline:
            if not _process_alive(pid):
                raise RuntimeError("TorchServe exited during start-up")
            try:
                if any(worker.get("status") == "READY" for worker in model_workers(info)):
                    _write_server_file(info, archive_dir)
                    return info
            except (urllib.error.URLError, OSError, ValueError, IndexError):
                pass  # not listening yet, or the model is still registering
            time.sleep(0.5)
        raise RuntimeError(f"model {model_name!r} had no READY worker after {timeout_s} s")
    except Exception as error:
        stop_server(workdir)
        raise RuntimeError(
            f"TorchServe did not start: {error}\n--- ts_log.log ---\n{_log_tail(workdir)}"
        ) from error


def _write_server_file(info: ServerInfo, archive_dir: Path) -> None:
    """Records where the server answers; the bearer keys stay in TorchServe's own key file."""
    described = {key: value for key, value in asdict(info).items() if not key.endswith("_token")}
    described["archive_dir"] = str(archive_dir)
    described["token_auth"] = info.inference_token is not None
    (Path(info.workdir) / SERVER_FILE).write_text(json.dumps(described, indent=2) + "\n")


def read_server_info(workdir: str | os.PathLike) -> tuple[ServerInfo, Path]:
    """Describes the server that :func:`start_server` started in ``workdir``.

    Args:
        workdir: The working directory given to :func:`start_server`.

    Returns:
        ``(info, archive_dir)``: the server's URLs and keys, and the archive it serves.

    Raises:
        FileNotFoundError: No server was started there (or it was stopped).
    """
    workdir = Path(workdir).resolve()
    described_path = workdir / SERVER_FILE
    if not described_path.is_file():
        raise FileNotFoundError(f"no TorchServe started in {workdir} (no {SERVER_FILE}): run `metarec serve`")
    described = json.loads(described_path.read_text())
    archive_dir = Path(described.pop("archive_dir"))
    tokens: tuple[str | None, str | None] = (None, None)
    if described.pop("token_auth"):
        tokens = _read_keys(workdir, time.monotonic() + 5)
    info = ServerInfo(**described, inference_token=tokens[0], management_token=tokens[1])
    return info, archive_dir


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def stop_server(workdir: str | os.PathLike, timeout_s: float = 30.0) -> bool:
    """Stops the TorchServe started in ``workdir`` and removes its private temporary files.

    Args:
        workdir: The working directory given to :func:`start_server`.
        timeout_s: How long to wait for the frontend and its workers to exit before killing them.

    Returns:
        True when a running server was stopped, False when none was running there.
    """
    workdir = Path(workdir).resolve()
    pid = _frontend_pid(workdir)
    if pid is None or not _process_alive(pid):
        shutil.rmtree(workdir / PRIVATE_TMP, ignore_errors=True)
        return False
    worker_pids = _child_pids(pid)
    # `torchserve --stop` with our TMPDIR reads our private pid file, never another server's.
    subprocess.run(
        [_torchserve_executable(), "--stop"],
        cwd=workdir,
        env=_torchserve_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    deadline = time.monotonic() + timeout_s
    for process_id in [pid, *worker_pids]:
        while _process_alive(process_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _process_alive(process_id):
            try:
                os.kill(process_id, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(workdir / PRIVATE_TMP, ignore_errors=True)
    (workdir / SERVER_FILE).unlink(missing_ok=True)
    return True


def _child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (TorchServe's Python workers), read from /proc."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, PermissionError):
        return []
    return [int(child) for child in children]
