"""Start and stop a local TorchServe on an archive written by :func:`metarec.packaging.build_archive`.

TorchServe keeps global state in the temporary directory: its pid file (``.model_server.pid``,
which ``torchserve --stop`` reads), the unpacked models (``models/<uuid>``) and the worker sockets
(``.ts.sock.<port>``, numbered from 9000 in every instance). Two servers sharing ``/tmp`` would
stop or talk to each other's processes, so every server started here gets a private temporary
directory ``<workdir>/tmp`` (``TMPDIR`` for the launcher, ``TEMP`` for the Java frontend) and runs
with ``<workdir>`` as its working directory (``logs/`` and ``key_file.json`` land there).

Security (config from :mod:`metarec.torchserve_config`): inference and metrics listen on
127.0.0.1, the REST management API on a Unix socket in the private temporary directory (mode 0700:
only this user reaches it), model and workflow registration are off. Token authorisation stays on by
default; the keys TorchServe generates are read back from ``key_file.json`` and returned in
:class:`ServerInfo` (send them as ``Authorization: Bearer <key>``). ``token_auth=False`` turns it off
for every API (one switch in TorchServe 0.12) for local demos only (``metarec serve --no-token-auth``).

Before starting, the archive is checked (zip integrity, manifest, the SHA-256 packaging recorded);
while starting, TorchServe's logs are watched so that a failure (corrupt archive, handler import
error, port in use) is reported with TorchServe's own error line within seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from metarec.ready_probe import unix_request
from metarec.torchserve_config import format_properties, server_properties

DEFAULT_TIMEOUT_S = 120
# TorchServe's own files inside the work directory.
PRIVATE_TMP = "tmp"
KEY_FILE = "key_file.json"
# Written once the model is ready, so that other processes (metarec demo-request) can find the server.
SERVER_FILE = "server.json"
PID_FILE = ".model_server.pid"
MANAGEMENT_SOCKET = "management.sock"
# A Unix socket path longer than this does not fit sockaddr_un.
MAX_SOCKET_PATH = 107
# Lines of TorchServe's logs that mean the start has failed: the cause (reported first when logged)
# and the generic consequence.
FATAL_CAUSES = re.compile(
    r"(Address already in use|BindException|ZipException|ModuleNotFoundError|ImportError|SyntaxError|"
    r"ModelNotFoundException|InvalidModelException|Invalid model archive)"
)
FATAL_EFFECTS = re.compile(r"(Backend worker process died|Failed to load model|Load model failed)")


class ArchiveError(ValueError):
    """The archive is missing, not a readable zip, lacks its manifest or fails its recorded checksum."""


@dataclass(frozen=True)
class ServerInfo:
    """Where a started TorchServe answers.

    Attributes:
        inference_url: Base URL of the inference API, e.g. ``http://127.0.0.1:8080``.
        management_socket: Unix socket of the REST management API (:func:`management_request`).
        metrics_url: Base URL of the metrics API (Prometheus format).
        model_name: Name the model is registered under.
        workdir: Working directory of the server (logs, key file, private temporary directory).
        pid: Process id of the Java frontend.
        inference_token: Bearer key for the inference API; None when token authorisation is off.
        management_token: Bearer key for the management API; None when token authorisation is off.
    """

    inference_url: str
    management_socket: str
    metrics_url: str
    model_name: str
    workdir: str
    pid: int
    inference_token: str | None = None
    management_token: str | None = None

    def inference_headers(self) -> dict[str, str]:
        """Returns the HTTP headers an inference call needs (the bearer key when auth is on)."""
        return {"Authorization": f"Bearer {self.inference_token}"} if self.inference_token else {}


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def _read_keys(workdir: Path, deadline: float, pid: int | None = None) -> tuple[str, str]:
    """Reads the inference and management keys TorchServe writes into ``key_file.json``."""
    key_path = workdir / KEY_FILE
    while time.monotonic() < deadline and (pid is None or _process_alive(pid)):
        try:
            keys = json.loads(key_path.read_text())
            return keys["inference"]["key"], keys["management"]["key"]
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.2)
    raise RuntimeError(f"TorchServe wrote no usable {key_path}")


def management_request(
    info: ServerInfo, method: str, path: str, token: str | None = "default", timeout_s: float = 10.0
) -> tuple[int, bytes]:
    """Calls the REST management API over its Unix socket.

    Args:
        info: The running server.
        method: HTTP method.
        path: Path and query, e.g. ``/models/metarec``.
        token: Bearer key to send: ``"default"`` = the server's management key (none when auth is
            off), None = no key, else that key.
        timeout_s: Socket time-out.

    Returns:
        ``(status, body)``.

    Raises:
        OSError: The socket is absent or refuses the connection.
    """
    key = info.management_token if token == "default" else token
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return unix_request(info.management_socket, method, path, timeout_s, headers)


def model_workers(info: ServerInfo) -> list[dict]:
    """Returns the worker descriptions of the served model (management ``GET /models/<name>``).

    Args:
        info: The running server.

    Returns:
        One dict per worker (``id``, ``startTime``, ``status``, ``pid``, ...).

    Raises:
        RuntimeError: The management API answered an error.
    """
    status, body = management_request(info, "GET", f"/models/{info.model_name}")
    if status != 200:
        raise RuntimeError(f"GET /models/{info.model_name} answered {status}: {body[:200]!r}")
    return json.loads(body)[0].get("workers", [])


def check_archive(archive_dir: str | os.PathLike, model_name: str) -> Path:
    """Checks an archive before TorchServe sees it: readable zip, manifest, recorded checksum.

    Args:
        archive_dir: Directory written by ``build_archive``.
        model_name: Archive name (``model-store/<model_name>.mar``).

    Returns:
        Path of the archive.

    Raises:
        ArchiveError: What is wrong, naming the file.
    """
    archive = Path(archive_dir) / "model-store" / f"{model_name}.mar"
    if not archive.is_file():
        raise ArchiveError(f"no archive {archive}")
    try:
        with zipfile.ZipFile(archive) as mar:
            broken = mar.testzip()
            names = set(mar.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ArchiveError(f"{archive} is not a readable zip archive: {error}") from error
    if broken is not None:
        raise ArchiveError(f"{archive}: member {broken!r} fails its CRC check")
    if "MAR-INF/MANIFEST.json" not in names:
        raise ArchiveError(f"{archive} has no MAR-INF/MANIFEST.json: not a TorchServe archive")
    recorded = Path(archive_dir) / "config" / f"{model_name}.mar.sha256"
    if recorded.is_file():
        expected = recorded.read_text().split()[0]
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != expected:
            raise ArchiveError(
                f"{archive}: SHA-256 {digest[:12]}... differs from {expected[:12]}... recorded in {recorded}"
            )
    return archive


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _fatal_log_line(workdir: Path) -> str | None:
    """TorchServe's line saying why the start failed (the cause if logged), from its logs in ``workdir``."""
    return fatal_log_line(
        [workdir / name for name in ("logs/model_log.log", "logs/ts_log.log", "launcher.log")]
    )


def fatal_log_line(logs: list[Path]) -> str | None:
    """The first line of TorchServe's ``logs`` saying why a start failed: a cause (:data:`FATAL_CAUSES`)
    before an effect (:data:`FATAL_EFFECTS`); None when neither is logged (missing files are skipped)."""
    lines = []
    for path in logs:
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    for pattern in (FATAL_CAUSES, FATAL_EFFECTS):
        for line in lines:
            if pattern.search(line):
                return line.strip()[:500]
    return None


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
    metrics_port: int = 8082,
    *,
    model_name: str = "metarec",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    token_auth: bool = True,
    extra_properties: dict[str, object] | None = None,
    environment: dict[str, str] | None = None,
) -> ServerInfo:
    """Starts TorchServe on ``archive_dir/model-store/<model_name>.mar`` and waits until it is ready.

    Args:
        archive_dir: Directory written by ``build_archive`` (``model-store/<model_name>.mar``).
        workdir: Working directory for the server (created); logs, keys and its private temporary
            directory (with the management socket) go there. Use one directory per server.
        inference_port: Port of the inference API on 127.0.0.1 (0 = pick a free one).
        metrics_port: Port of the metrics API on 127.0.0.1 (0 = pick a free one).
        model_name: Name of the archive and of the registered model.
        timeout_s: How long to wait for every worker to be READY before giving up.
        token_auth: Keep TorchServe's token authorisation on (default); False disables it for
            every API, for local demos only.
        extra_properties: More ``config.properties`` entries (e.g. ``default_workers_per_model``).
        environment: More environment variables for the server and its workers (e.g.
            ``METAREC_STATE_URL``, where the workers keep the per-user state), over this process's own.

    Returns:
        ServerInfo with the URLs, the frontend pid and the bearer keys (None when auth is off).

    Raises:
        ArchiveError: The archive is missing, corrupt or fails its recorded checksum.
        RuntimeError: A port is in use, TorchServe logged a fatal error, exited, or was not ready in
            time (the server is stopped; the message holds TorchServe's error line and its log tail).
    """
    archive_dir = Path(archive_dir).resolve()
    workdir = Path(workdir).resolve()
    model_store = archive_dir / "model-store"
    mar_name = f"{model_name}.mar"
    check_archive(archive_dir, model_name)
    workdir.mkdir(parents=True, exist_ok=True)
    # A server left running in this workdir would hold its pid file and ports: stop it first.
    stop_server(workdir)
    busy = [port for port in (inference_port, metrics_port) if port and _port_in_use(port)]
    if busy:
        raise RuntimeError(f"port(s) {busy} on 127.0.0.1 already in use: pick others (0 = any free port)")
    private_tmp = workdir / PRIVATE_TMP
    private_tmp.mkdir(mode=0o700, exist_ok=True)
    private_tmp.chmod(0o700)
    management_socket = private_tmp / MANAGEMENT_SOCKET
    if len(str(management_socket)) > MAX_SOCKET_PATH:
        raise ValueError(f"workdir path too long for a Unix socket ({management_socket}): use a shorter one")

    ports = {
        "inference": inference_port or free_port(),
        "metrics": metrics_port or free_port(),
        # gRPC cannot be switched off in 0.12: give it free loopback ports so servers never collide.
        "grpc_inference": free_port(),
        "grpc_management": free_port(),
    }
    properties = server_properties(
        inference_address=f"http://127.0.0.1:{ports['inference']}",
        metrics_address=f"http://127.0.0.1:{ports['metrics']}",
        management_socket=str(management_socket),
        model_store=str(model_store),
        workflow_store=str(private_tmp / "no-workflows"),
        token_auth=token_auth,
        extra={
            "grpc_inference_port": ports["grpc_inference"],
            "grpc_management_port": ports["grpc_management"],
            **(extra_properties or {}),
        },
    )
    config_path = workdir / "config.properties"
    config_path.write_text(format_properties(properties))
    for log in (workdir / "logs").glob("*.log"):
        log.unlink()  # the fatal-line scan must only see this start
    (workdir / KEY_FILE).unlink(missing_ok=True)  # keys of an earlier start would be stale

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
    env = {**_torchserve_env(workdir), **(environment or {})}
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
            inference_token, management_token = _read_keys(workdir, deadline, pid)
        info = ServerInfo(
            inference_url=f"http://127.0.0.1:{ports['inference']}",
            management_socket=str(management_socket),
            metrics_url=f"http://127.0.0.1:{ports['metrics']}",
            model_name=model_name,
            workdir=str(workdir),
            pid=pid,
            inference_token=inference_token,
            management_token=management_token,
        )
        while time.monotonic() < deadline:
            fatal = _fatal_log_line(workdir)
            if fatal and not FATAL_CAUSES.search(fatal):
                time.sleep(1.0)  # the cause is usually logged just before or after the effect
                fatal = _fatal_log_line(workdir)
            if fatal:
                raise RuntimeError(f"TorchServe failed: {fatal}")
            if not _process_alive(pid):
                raise RuntimeError("TorchServe exited during start-up")
            try:
                # Every worker, not the first: callers snapshot the workers (pids) right after start,
                # and a request routed to a worker still loading waits for it.
                workers = model_workers(info)
                if workers and all(worker.get("status") == "READY" for worker in workers):
                    _write_server_file(info, archive_dir)
                    return info
            except (OSError, ValueError, IndexError, RuntimeError):
                pass  # not listening yet, or the model is still registering
            time.sleep(0.3)
        raise RuntimeError(f"model {model_name!r} had workers not READY after {timeout_s} s")
    except KeyboardInterrupt:
        stop_server(workdir)  # Ctrl-C during start-up: leave no frontend or worker holding the ports
        raise
    except Exception as error:
        stop_server(workdir)
        raise RuntimeError(f"{error}\n--- ts_log.log ---\n{_log_tail(workdir)}") from error


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
