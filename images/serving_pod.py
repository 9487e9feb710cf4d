"""The serving image's TorchServe container run on this machine as its manifests run it, and called as its
clients call it.

Shared by the replays of ``images/fidelity_serving.py`` (the Deployment, the kserve predictor) and
``images/fidelity_redis.py`` (the ``gke-cpu-redis`` overlay's Deployment), on :mod:`pod_emulation`: the
pod's ``config.properties`` with only paths and ports moved (:func:`serving_config`), the image's CMD and
ENV (:func:`serving_command`, :func:`serving_image_env`), a container's command under Kubernetes' rules
(:func:`predictor_command`), the container's environment (:func:`_pod_env`), the container started until
its probes pass and ``/metrics`` answers (:func:`_serve_deployment`); then a JSON call (:func:`_post`), a
known user of the served archive (:func:`_served_catalogue`) and a passed check recorded (:func:`_passed`).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

from pod_emulation import (
    POD_HOME,
    REPO,
    ServerRun,
    _get,
    container_env,
    dockerfile_instructions,
    free_port,
    pod_mounts,
    pod_path_mover,
)

SERVING_IMAGE = "serving"

# The ConfigMap the Deployment mounts over the image's /home/model-server/config.properties.
SERVING_CONFIG = REPO / "manifests/serving/base/config.properties"

# The state setting of the serving containers (docs/realtime.md; metarec.state.open.STATE_OFF: no state).
STATE_URL_ENV = "METAREC_STATE_URL"


def serving_config(
    home: Path, tmp: Path, ports: dict[str, int], source: Path = SERVING_CONFIG, models: Path | None = None
) -> str:
    """The pod's ``config.properties`` with only what this machine cannot give as a pod has it rewritten.

    Every setting stays as deployed (``load_models=all``, token authorisation off, the management API on a
    Unix socket, request limits...), except: the pod's paths move under ``home`` and ``tmp``
    (:func:`pod_path_mover`), inference and metrics listen on free loopback ports instead of
    ``0.0.0.0:8080/8082``, and gRPC (which 0.12 cannot switch off) gets free ports instead of 7070/7071.

    Args:
        home: Stands in for ``/home/model-server``.
        tmp: Stands in for the pod's ``/tmp`` emptyDir.
        ports: ``inference``, ``metrics``, ``grpc_inference``, ``grpc_management`` port numbers.
        source: The deployed file (the Deployment's ConfigMap, or the kserve overlay's).
        models: Stands in for KServe's ``/mnt/models`` (the kserve overlay's model store).

    Returns:
        The properties text.
    """
    move, lines = pod_path_mover(home, tmp, models), []
    for line in source.read_text().splitlines():
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


def predictor_command(container: dict, move) -> list[str]:
    """What a container runs (Kubernetes' rules: ``command`` replaces the image's ENTRYPOINT, ``args`` its
    CMD), the pod's paths moved by ``move``; the ENTRYPOINT (``tini -g --``) is left out when the container
    keeps it, as the Deployment replay runs the CMD alone: :func:`_stop_group` plays tini's part."""
    image = dict(dockerfile_instructions(SERVING_IMAGE))
    entrypoint, cmd = json.loads(image["ENTRYPOINT"]), json.loads(image["CMD"])
    command = list(container.get("command") or entrypoint)
    args = list(container["args"]) if "args" in container else ([] if "command" in container else cmd)
    if command == entrypoint:
        command = []
    return [move(argument) for argument in command + args]


def _properties(config: Path) -> dict[str, str]:
    """A ``config.properties`` file's settings."""
    lines = config.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def local_ports(config: Path) -> dict[int, int]:
    """The pod's container ports (inference, metrics: from the deployed config) -> free local ports."""
    deployed = _properties(config)
    return {
        int(deployed[f"{name}_address"].rsplit(":", 1)[1]): free_port() for name in ("inference", "metrics")
    }


def _pod_env(
    env: dict[str, str], move, tmp: Path, bin_dir: Path, container: dict, values: dict[str, str] | None = None
) -> dict[str, str]:
    """The container's environment: the image's ENV (paths moved), the container's ``env`` (its literal
    values, or ``values`` when given: the kubelet's resolution, :func:`kubelet_env`), the venv."""
    pod_env = dict(env, **serving_image_env(move), TMPDIR=str(tmp), TEMP=str(tmp))  # TEMP: Java's tmpdir
    pod_env.update(container_env(container) if values is None else values)
    pod_env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    return pod_env


def _serve_deployment(run: ServerRun, source: Path, home: Path, tmp: Path, move) -> dict[int, int]:
    """Starts the Deployment's ``torchserve`` container as ``run`` says, on the ConfigMap's
    ``config.properties`` ``source`` mounted at ``/home/model-server/config.properties`` (moved by ``move``),
    until its probes pass and ``/metrics`` answers; returns the pod's ports -> the local ones."""
    ports = local_ports(source)
    grpc = {name: free_port() for name in ("grpc_inference", "grpc_management")}
    names = {8080: "inference", 8082: "metrics"}
    config = Path(move(POD_HOME + "/config.properties"))  # where the ConfigMap is mounted (subPath)
    config.write_text(serving_config(home, tmp, {names[p]: local for p, local in ports.items()} | grpc,
                                     source=source))  # fmt: skip
    # The server mounts the config and the archive read-only and the logs emptyDir; /tmp is shared.
    pod_mounts(home, run.user, [home / "logs"])
    run.start(serving_command(config))
    socket_path = move(_properties(source)["management_address"]).removeprefix("unix:")
    run.wait_ready(socket_path, ports)
    scraped = f"http://127.0.0.1:{ports[8082]}/metrics"  # the pod's prometheus.io annotations
    if _get(scraped) != 200:
        raise RuntimeError(f"{scraped}: {_get(scraped)}\n{run.tail()}")
    return ports


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


def _passed(results: dict[str, str], check: str, since: float) -> None:
    results[check] = f"ok {time.monotonic() - since:.1f}s"
    print(f"  {check}: ok ({time.monotonic() - since:.1f} s)", flush=True)


def _failed(results: dict[str, str], check: str, error: Exception, secret: str | None = None) -> RuntimeError:
    """Records ``check`` as failed; returns the error to raise, naming the check (``secret`` masked)."""
    results[check] = "failed"
    message = f"serving: {check} failed: {type(error).__name__}: {error}"
    return RuntimeError(message.replace(secret, "***") if secret else message)
