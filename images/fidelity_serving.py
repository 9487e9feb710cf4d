"""The serving phase of ``images/fidelity.py``: the serving image's content, run as its pod runs it.

After the chain (:func:`run_serving`, checks :data:`SERVING`): a second venv from
``images/serving.extras`` (``fidelity.build_venv``, in ``<workdir>/serving``) runs the Deployment's
fetch-model init container command (``manifests/serving/base/deployment.yaml``) on the version
deploy_model rolled out, from the emulator; then the image's CMD (``torchserve --start --foreground --ncs
--ts-config ...``) with the image's ENV on the ConfigMap the pod mounts
(``manifests/serving/base/config.properties``), ports moved to free loopback ones and the pod's
``/home/model-server`` and ``/tmp`` to local folders; the startup probe's command must exit 0, ``/ping``
and ``/metrics`` answer 200, and recommend (a known user), adapt (a new user), feedback and forget must
answer 200 with their fields. The server is stopped as the pod is (SIGTERM to its process group). The CMD
and config are run as they are rather than through :mod:`metarec.serve_local`, which writes its own config
(token auth on, ``--models``): that would check ``metarec serve``, not the image.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# The serving phase (run_serving, after the options): check -> what it shows.
SERVING = {
    "serving-venv": "the serving image's install spec (images/serving.extras) in a clean venv, pip check",
    "fetch-model": "the Deployment's fetch-model init container command on the deployed gs:// version",
    "torchserve-ready": "the image's CMD on the pod's config.properties until the startup probe exits 0",
    "recommend": "POST /predictions/metarec for a known user: 200, personalised items",
    "adapt": "POST /predictions/metarec/1.0/adapt for a new user with 3 ratings: 200, items, steps",
    "feedback": "POST /predictions/metarec/1.0/feedback for the known user: 200, stored, new items",
    "forget": "POST /predictions/metarec/1.0/forget for the new user: 200, deleted",
}
SERVING_IMAGE = "serving"
SERVING_DEPLOYMENT = REPO / "manifests/serving/base/deployment.yaml"
# The ConfigMap the Deployment mounts over the image's /home/model-server/config.properties.
SERVING_CONFIG = REPO / "manifests/serving/base/config.properties"
# The pod's paths that are not the image's own: its home (archive, logs, config) and its /tmp emptyDir.
POD_HOME, POD_TMP = "/home/model-server", "/tmp"


def free_port() -> int:
    """:func:`metarec.serve_local.free_port`, imported when called (this script imports metarec lazily)."""
    from metarec.serve_local import free_port as metarec_free_port

    return metarec_free_port()


def dockerfile_instructions(image: str) -> list[tuple[str, str]]:
    """Returns the ``(INSTRUCTION, arguments)`` pairs of ``images/<image>.Dockerfile``, continuation lines
    joined, comments dropped."""
    instructions, current = [], ""
    for raw in (REPO / "images" / f"{image}.Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        keyword, _, arguments = current.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def pod_path_mover(home: Path, tmp: Path):
    """Returns a function moving the pod's paths (``/home/model-server``, ``/tmp``, also behind ``unix:``)
    under ``home`` and ``tmp``; any other text is returned unchanged."""

    def move(value: str) -> str:
        scheme = "unix:" if value.startswith("unix:") else ""
        path = value[len(scheme) :]
        for pod, local in ((POD_HOME, home), (POD_TMP, tmp)):
            if path == pod or path.startswith(pod + "/"):
                return scheme + str(local) + path[len(pod) :]
        return value

    return move


def serving_config(home: Path, tmp: Path, ports: dict[str, int]) -> str:
    """The pod's ``config.properties`` with only what this machine cannot give as a pod has it rewritten.

    Every setting stays as deployed (``load_models=all``, token authorisation off, the management API on a
    Unix socket, request limits...), except: the pod's paths move under ``home`` and ``tmp``
    (:func:`pod_path_mover`), inference and metrics listen on free loopback ports instead of
    ``0.0.0.0:8080/8082``, and gRPC (which 0.12 cannot switch off) gets free ports instead of 7070/7071.

    Args:
        home: Stands in for ``/home/model-server``.
        tmp: Stands in for the pod's ``/tmp`` emptyDir.
        ports: ``inference``, ``metrics``, ``grpc_inference``, ``grpc_management`` port numbers.

    Returns:
        The properties text.
    """
    move, lines = pod_path_mover(home, tmp), []
    for line in SERVING_CONFIG.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            if key in ("inference_address", "metrics_address"):
                value = f"http://127.0.0.1:{ports[key.split('_')[0]]}"
            line = f"{key}={move(value)}"
        lines.append(line)
    lines += [
        f"grpc_inference_port={ports['grpc_inference']}",
        f"grpc_management_port={ports['grpc_management']}",
    ]
    return "\n".join(lines) + "\n"


def serving_command(config: Path) -> list[str]:
    """The serving image's CMD, its ``--ts-config`` pointing at ``config`` (what the ConfigMap mount does)."""
    cmd = next(json.loads(arguments) for keyword, arguments in dockerfile_instructions(SERVING_IMAGE)
               if keyword == "CMD")  # fmt: skip
    cmd[cmd.index("--ts-config") + 1] = str(config)
    return cmd


def serving_image_env(move) -> dict[str, str]:
    """The serving image's ``ENV`` settings (LOG_LOCATION, HOME, caches...), their paths moved by ``move``."""
    env = {}
    for keyword, arguments in dockerfile_instructions(SERVING_IMAGE):
        if keyword == "ENV":
            for token in shlex.split(arguments):
                key, _, value = token.partition("=")
                env[key] = move(value)
    return env


def _post(url: str, body: dict) -> tuple[int, dict]:
    """POSTs JSON; returns ``(status, decoded body)`` (errors included; ``{"raw": text}`` if not JSON)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, {"raw": text[:500]}


def _served_catalogue(mar: Path) -> tuple[str, list[str], list[str]]:
    """A known user of the archive (most ratings in its history), the items they rated and every item."""
    import io
    import zipfile

    import pandas as pd

    with zipfile.ZipFile(mar) as archive:
        history = pd.read_parquet(io.BytesIO(archive.read("history.parquet")))
        items = pd.read_parquet(io.BytesIO(archive.read("items.parquet")))
    user = str(history["user_id"].value_counts().index[0])
    rated = sorted(history.loc[history["user_id"] == user, "item_id"].astype(str))
    return user, rated, [str(item) for item in items["item_id"]]


def _set_writable(folder: Path, writable: bool) -> None:
    """Makes ``folder`` and everything under it (not) writable, as the pod's read-only mounts."""
    if not folder.exists():
        return
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | 0o200 if writable else mode & ~0o222)


def _stop_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the server's process group (as the image's ``tini -g``), SIGKILL to what outlives it."""
    import signal

    def gone() -> bool:
        process.poll()  # reaps the launcher; the orphaned frontend and workers are reaped by init
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if gone():
            break
        os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait_s
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.2)
    process.wait(timeout=10)


def _fatal_line(logs: Path) -> str | None:
    """The first line of TorchServe's logs saying the model cannot load (as :mod:`metarec.serve_local`
    watches them), so that a broken image fails in seconds instead of the startup probe's 3 minutes."""
    from metarec.serve_local import fatal_log_line

    return fatal_log_line([logs / "model_log.log", logs / "ts_log.log"])


def _get(url: str) -> int:
    """GETs ``url``; returns the status (0 when nothing answered)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def run_serving(workdir: Path, env: dict[str, str], model_uri: str, results: dict[str, str]) -> None:
    """Runs the serving image's content the way the Deployment's pod does, then calls every route.

    In the venv of :func:`build_venv` for the serving image (``workdir/serving/venv``): the fetch-model
    init container's command (``manifests/serving/base/deployment.yaml``) downloads ``model_uri`` from the
    emulator; the image's CMD (``torchserve --start --foreground --ncs --ts-config ...``) runs with the
    image's ENV, on the ConfigMap's ``config.properties`` (:func:`serving_config`), in the pod's working
    directory, with the archive and the working directory read-only as mounted there (file modes: no
    effect when run as root); the startup probe's command must exit 0; then recommend (a known user),
    adapt (a new user), feedback and forget over HTTP.

    The image's own files stand in for a pod's through :func:`pod_path_mover`: ``/home/model-server`` is
    ``workdir/serving/home`` and ``/tmp`` a fresh private folder (short: the management socket's path must
    fit a Unix socket address). The server is stopped like the pod's (SIGTERM to its process group).

    Args:
        workdir: The fidelity work directory (``serving/venv`` built there).
        env: The chain's environment (``STORAGE_EMULATOR_HOST`` set).
        model_uri: The deployed version (the pod's ``MODEL_URI``).
        results: Filled with ``check -> "ok <s>s" | "failed"`` for the checks of :data:`SERVING`.

    Raises:
        RuntimeError: A check failed (what answered, the server's log tail).
    """
    bin_dir = workdir / "serving" / "venv" / "bin"
    home = workdir / "serving" / "home"
    _set_writable(home, True)
    shutil.rmtree(home, ignore_errors=True)
    (home / "logs").mkdir(parents=True)  # the pod's logs emptyDir
    tmp = Path(tempfile.mkdtemp(prefix="metarec-pod-"))
    move = pod_path_mover(home, tmp)
    pod_env = dict(env, **serving_image_env(move), TMPDIR=str(tmp), TEMP=str(tmp))  # TEMP: Java's tmpdir
    pod_env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    pod = yaml.safe_load(SERVING_DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-model"]
    (server,) = [c for c in pod["containers"] if c["name"] == "torchserve"]
    current = "fetch-model"

    def tail() -> str:
        logs = [home / "logs" / "model_log.log", home / "logs" / "ts_log.log", home / "torchserve.log"]
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-2000:]}"
                         for log in logs if log.is_file())  # fmt: skip

    def passed(check: str, since: float) -> None:
        results[check] = f"ok {time.monotonic() - since:.1f}s"
        print(f"  {check}: ok ({time.monotonic() - since:.1f} s)", flush=True)

    process = None
    try:
        started = time.monotonic()
        command = [move(argument.replace("$(MODEL_URI)", model_uri)) for argument in fetch["command"]]
        done = subprocess.run(command, cwd=home, env=pod_env, capture_output=True, text=True)
        mar = home / "archive" / "model-store" / "metarec.mar"
        if done.returncode != 0 or not mar.is_file():
            raise RuntimeError(
                f"exited {done.returncode}, {mar.name} present: {mar.is_file()}\n{done.stderr[-3000:]}"
            )
        passed(current, started)

        current, started = "torchserve-ready", time.monotonic()
        config = workdir / "serving" / "config.properties"
        ports = {name: free_port() for name in ("inference", "metrics", "grpc_inference", "grpc_management")}
        config.write_text(serving_config(home, tmp, ports))
        _set_writable(home / "archive", False)  # mounted readOnly
        _set_writable(home, False)  # readOnlyRootFilesystem (logs/ stays an emptyDir)
        _set_writable(home / "logs", True)
        with open(workdir / "serving" / "torchserve.log", "wb") as log:
            process = subprocess.Popen(serving_command(config), cwd=home, env=pod_env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        socket_path = move("/tmp/metarec-management.sock")
        probe = [*server["startupProbe"]["exec"]["command"], "--socket", socket_path]
        budget = server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"]
        while True:
            done = subprocess.run(probe, cwd=home, env=pod_env, capture_output=True, text=True)
            if done.returncode == 0:
                break
            fatal = _fatal_line(home / "logs")
            if fatal is None and process.poll() is not None:
                fatal = f"torchserve exited {process.poll()}"
            if fatal is None and time.monotonic() - started > budget:
                fatal = f"not ready after the startup probe's {budget} s"
            if fatal:
                raise RuntimeError(f"{fatal}; probe: {done.stderr.strip()[-500:]}\n{tail()}")
            time.sleep(0.5)
        liveness = f"http://127.0.0.1:{ports['inference']}{server['livenessProbe']['httpGet']['path']}"
        scraped = f"http://127.0.0.1:{ports['metrics']}/metrics"  # the pod's prometheus.io annotations
        if (_get(liveness), _get(scraped)) != (200, 200):
            raise RuntimeError(f"{liveness}: {_get(liveness)}, {scraped}: {_get(scraped)}\n{tail()}")
        passed(current, started)

        url = f"http://127.0.0.1:{ports['inference']}/predictions/metarec"
        user, rated, catalogue = _served_catalogue(mar)
        unrated = [item for item in catalogue if item not in rated]
        current, started = "recommend", time.monotonic()
        status, answer = _post(url, {"user_id": user, "k": 3})
        if status != 200 or answer.get("personalised") is not True or len(answer.get("items", [])) != 3:
            raise RuntimeError(f"{status} {answer}")
        if set(rated) & {entry["item_id"] for entry in answer["items"]}:
            raise RuntimeError(f"rated items recommended back: {answer}")
        passed(current, started)

        current, started = "adapt", time.monotonic()
        support = [
            {"item_id": item, "rating": rating} for item, rating in zip(catalogue[:3], (5, 1, 4), strict=True)
        ]
        status, answer = _post(f"{url}/1.0/adapt", {"user_id": "fidelity-new", "support": support, "k": 3})
        returned = {entry["item_id"] for entry in answer.get("items", [])}
        if status != 200 or answer.get("support_size") != 3 or not isinstance(answer.get("steps"), int) \
                or len(returned) != 3 or returned & set(catalogue[:3]):  # fmt: skip
            raise RuntimeError(f"{status} {answer}")
        passed(current, started)

        current, started = "feedback", time.monotonic()
        body = {"user_id": user, "ratings": [{"item_id": unrated[0], "rating": 5}], "k": 3}
        status, answer = _post(f"{url}/1.0/feedback", body)
        if status != 200 or answer.get("stored") is not True or answer.get("state_version") != 1 \
                or answer.get("support_size") != len(rated) + 1 or len(answer.get("items", [])) != 3:  # fmt: skip
            raise RuntimeError(f"{status} {answer}")
        passed(current, started)

        current, started = "forget", time.monotonic()
        status, answer = _post(f"{url}/1.0/forget", {"user_id": "fidelity-new"})
        if status != 200 or answer.get("deleted") is not True or answer.get("user_id") != "fidelity-new":
            raise RuntimeError(f"{status} {answer}")
        passed(current, started)
    except Exception as error:  # noqa: BLE001 - whatever broke (a missing executable too) fails the check
        results[current] = "failed"
        raise RuntimeError(f"serving: {current} failed: {type(error).__name__}: {error}") from error
    finally:
        if process is not None:
            _stop_group(process)
        _set_writable(home, True)
        shutil.rmtree(tmp, ignore_errors=True)
