"""The serving phase of ``images/fidelity.py``: the serving image's content, run as its pods run it.

After the chain (:func:`run_serving`, checks :data:`SERVING`): a second venv from
``images/serving.extras`` (``fidelity.build_venv``, in ``<workdir>/serving``) runs the Deployment's
fetch-model init container command (``manifests/serving/base/deployment.yaml``) on the version
deploy_model rolled out, from the emulator; then the image's CMD (``torchserve --start --foreground --ncs
--ts-config ...``) with the image's ENV and the container's env on the ConfigMap the pod mounts
(``manifests/serving/base/config.properties``), ports moved to free loopback ones and the pod's
``/home/model-server`` and ``/tmp`` to local folders; the startup, readiness and liveness probes must
pass and ``/metrics`` answer 200; recommend (a known user), adapt (a new user), feedback and forget must
answer as the pod does (feedback and forget 404 without a state store). Then the kserve overlay's
predictor (``manifests/serving/overlays/kserve``): the same version copied to a read-only ``/mnt/models``
stand-in (KServe's storage initializer), the predictor's command and args on the overlay's
config.properties, its probes, and ``POST /v1/models/metarec:predict`` with a KServe v1 body (and a bad
one: 4xx). Then the overlay that keeps per-user state, ``manifests/serving/overlays/gke-cpu-redis``,
rendered with ``kubectl kustomize`` (:func:`run_redis`): the Redis StatefulSet's command and env
(``manifests/state/redis``) on the rendered ConfigMap's ``redis.conf`` (``/data``, the claim, and its
mounts moved to private folders, a free loopback port instead of ``0.0.0.0:6379``, the password a
made-up value of the Secret manifests/README.md has operators create), as its user, until its probes
pass; then the rendered Deployment's ``torchserve`` with its env resolved as the kubelet does
(``$(VAR)`` to the variables defined before it, the Secret's value) and only the Redis Service's
address moved; feedback for a known user (stored), a plain recommend reading it back, adapt for a new
user_id (stored), forget (deleted), each checked in Redis itself (the keys and their time to live, the
archive's ``state_ttl_s``); Redis stopped as the kubelet stops it (SIGTERM) and started again on the same
data (the feedback must still be served, by the same TorchServe); and the on-call ``metarec state prune``
and ``forget`` as the docs give them for a serving pod, run with that pod's environment. Servers run one
after the other and are stopped as the pod is (SIGTERM to the process group).

Every process runs as the pod's user (:func:`pod_user`: ``runAsUser``/``runAsGroup``/``fsGroup`` through
``setpriv`` when run as root; the current user otherwise, file modes then standing in), and only the
emptyDir stand-ins a container mounts are writable by it (:func:`pod_mounts`), so an image that writes
elsewhere, or needs root, fails here as in the pod. The CMD and config are run as they are rather than
through :mod:`metarec.serve_local`, which writes its own config (token auth on, ``--models``): that would
check ``metarec serve``, not the image.
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
from typing import NamedTuple

import yaml

REPO = Path(__file__).resolve().parents[1]
# The serving phase (run_serving, after the options): check -> what it shows.
SERVING = {
    "serving-venv": "the serving image's install spec (images/serving.extras) in a clean venv, pip check",
    "fetch-model": "the Deployment's fetch-model init container command, as the pod's user, on the deployed version",
    "torchserve-ready": "the image's CMD on the pod's config.properties, as the pod's user, until the probes pass",
    "recommend": "POST /predictions/metarec for a known user: 200, personalised items",
    "adapt": "POST /predictions/metarec/1.0/adapt for a new user with 3 ratings (named if a store): 200, items",
    "feedback": "POST /predictions/metarec/1.0/feedback for the known user: as the pod's METAREC_STATE_URL says",
    "forget": "POST /predictions/metarec/1.0/forget for the new user: as the pod's METAREC_STATE_URL says",
    "kserve-ready": "the kserve overlay's predictor command on its config.properties and /mnt/models, as its user",
    "kserve-predict": "POST /v1/models/metarec:predict with KServe v1 instances: 200, one prediction each",
    "kserve-refuse": "POST /v1/models/metarec:predict with a bad KServe v1 body: 4xx error body",
    "redis-server": "the gke-cpu-redis overlay's Redis StatefulSet command on its rendered redis.conf, as its user",
    "redis-serving-ready": "the overlay's torchserve with its rendered env ($(VAR) expanded) on that Redis",
    "redis-feedback": "feedback for the known user: stored, its keys in Redis with the archive's state_ttl_s",
    "redis-recommend": "plain recommend for that user reads the feedback back (state_version 1)",
    "redis-adapt": "adapt for a new user_id: stored in Redis with the retention, next recommend personalised",
    "redis-forget": "forget for that new user: deleted, its keys gone from Redis, the erasure's audit line "
    "in the container's output (what kubectl logs shows)",
    "redis-restart": "Redis stopped as the kubelet stops it, restarted on the same data: the feedback is served",
    "redis-state-cli": "the documented `metarec state prune` / `forget` for a serving pod, with the pod's env",
}
SERVING_IMAGE = "serving"
SERVING_DEPLOYMENT = REPO / "manifests/serving/base/deployment.yaml"
# The ConfigMap the Deployment mounts over the image's /home/model-server/config.properties.
SERVING_CONFIG = REPO / "manifests/serving/base/config.properties"
# The kserve overlay: its InferenceService and the ConfigMap its predictor mounts at /home/model-server/kserve.
KSERVE_SERVICE = REPO / "manifests/serving/overlays/kserve/inferenceservice.yaml"
KSERVE_CONFIG = REPO / "manifests/serving/overlays/kserve/config.properties"
# The pod's paths that are not the image's own: its home (archive, logs, config), its /tmp emptyDir and
# KServe's model folder (its storage initializer's emptyDir).
POD_HOME, POD_TMP, POD_MODELS = "/home/model-server", "/tmp", "/mnt/models"
# The state setting of the serving containers (docs/realtime.md): "none" = feedback and forget answer 404.
STATE_URL_ENV, STATE_OFF = "METAREC_STATE_URL", "none"


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


def pod_path_mover(home: Path, tmp: Path, models: Path | None = None):
    """Returns a function moving the pod's paths (``/home/model-server``, ``/tmp``, ``/mnt/models`` when
    ``models`` is given; also behind ``unix:`` or in a ``--option=path`` argument) under ``home``, ``tmp``
    and ``models``; any other text is returned unchanged."""
    return paths_mover(
        [(POD_HOME, home), (POD_TMP, tmp)] + ([(POD_MODELS, models)] if models is not None else [])
    )


def paths_mover(places: list[tuple[str, Path]]):
    """Returns a function moving each pod path of ``places`` (``(pod path, local folder)`` pairs; also behind
    ``unix:`` or in a ``--option=path`` argument) and what lies under it to its local folder; any other
    text is returned unchanged."""

    def move(value: str) -> str:
        if value.startswith("--") and "=" in value:
            option, _, argument = value.partition("=")
            return f"{option}={move(argument)}"
        scheme = "unix:" if value.startswith("unix:") else ""
        path = value[len(scheme) :]
        for pod, local in places:
            if path == pod or path.startswith(pod + "/"):
                return scheme + str(local) + path[len(pod) :]
        return value

    return move


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


def container_env(container: dict) -> dict[str, str]:
    """The container's literal ``env`` values (``valueFrom`` ones, MODEL_URI, are substituted by the replay)."""
    return {entry["name"]: str(entry["value"]) for entry in container.get("env", []) if "value" in entry}


class PodUser(NamedTuple):
    """Who the replay runs the pod's processes as (a NamedTuple: the tests load this file by path, where
    a dataclass cannot find its module).

    Attributes:
        uid: User id the processes get.
        gid: Group id the processes get.
        groups: Supplementary groups (the pod's ``fsGroup``): what owns the emptyDir stand-ins.
        prefix: Command prefix switching to them (``setpriv ...``; empty when run as that user already).
        note: One line saying who that is, for the log.
    """

    uid: int
    gid: int
    groups: tuple[int, ...]
    prefix: tuple[str, ...]
    note: str

    def run(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Runs ``command`` as this user (``subprocess.run`` keywords pass through)."""
        return subprocess.run([*self.prefix, *command], **kwargs)

    def can_write(self, path: Path) -> bool:
        """Whether this user may write ``path`` (``test -w`` run as the user, so the kernel decides)."""
        return self.run(["test", "-w", str(path)]).returncode == 0


def pod_user(pod: dict, container: dict, euid: int | None = None, read_search: bool = False) -> PodUser:
    """The pod's user for ``container``, from the pod's and the container's ``securityContext``.

    Run as root, the processes drop to ``runAsUser``/``runAsGroup`` with the pod's ``fsGroup`` (and
    ``supplementalGroups``) as their only supplementary groups, as the kubelet starts them; no new privileges
    when the container forbids escalation, no capabilities when it drops ``ALL``. Run as another user (a
    CI runner without root), nothing can switch users: the processes run as that user, and the file modes
    of the read-only stand-ins still apply to it.

    Args:
        pod: The pod spec (``spec.template.spec`` of a Deployment, ``spec.predictor`` of an InferenceService).
        container: The container (its ``securityContext`` overrides the pod's).
        euid: The effective uid this runs as (default: the process's).
        read_search: Keep ``CAP_DAC_READ_SEARCH`` (reads and folder searches anywhere; writes still follow
            the file modes) for an interpreter the user cannot otherwise reach (this machine's Python
            lives under ``/root``).

    Raises:
        ValueError: The securityContext names no ``runAsUser`` or ``runAsGroup``.
    """
    euid = os.geteuid() if euid is None else euid
    pod_context = pod.get("securityContext") or {}
    context = {**pod_context, **(container.get("securityContext") or {})}
    if "runAsUser" not in context or "runAsGroup" not in context:
        raise ValueError(f"no runAsUser/runAsGroup in the securityContext of {container.get('name')}")
    uid, gid = int(context["runAsUser"]), int(context["runAsGroup"])
    if euid != 0:
        return PodUser(euid, os.getegid(), tuple(os.getgroups()), (),
                       f"as the current user (uid {euid}), not the pod's uid {uid}: not root, so no switch; "
                       "file modes keep the read-only mounts read-only")  # fmt: skip
    groups = tuple(sorted({int(g) for g in [pod_context.get("fsGroup"), *pod_context.get("supplementalGroups", [])]
                           if g is not None}))  # fmt: skip
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    prefix.append(f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups")
    if context.get("allowPrivilegeEscalation") is False:
        prefix.append("--no-new-privs")
    bounding = "-all" if "ALL" in (context.get("capabilities") or {}).get("drop", []) else ""
    if read_search:
        prefix += ["--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search"]
        bounding = f"{bounding},+dac_read_search" if bounding else ""
    if bounding:
        prefix.append(f"--bounding-set={bounding}")
    note = f"as uid {uid}, gid {gid}, groups {list(groups)} (the pod's securityContext, through setpriv)"
    if read_search:
        note += (
            "; reads unrestricted (CAP_DAC_READ_SEARCH: the venv's interpreter is under a root-only folder)"
        )
    return PodUser(uid, gid, groups, tuple(prefix), note)


def make_empty_dir(folder: Path, user: PodUser) -> None:
    """Makes ``folder`` an emptyDir stand-in the pod's user can write: as the kubelet does with ``fsGroup``,
    it belongs to that group (setgid: what is created in it too), not to the user, and others get nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    if user.prefix:
        os.chown(folder, 0, user.groups[0] if user.groups else user.gid)
        folder.chmod(0o2770)
    else:
        _set_writable(folder, True)


def pod_mounts(root: Path, user: PodUser, writable: list[Path]) -> None:
    """Lays out one container's view of ``root`` (the pod's home): nothing under it writable by the pod's
    user (the read-only root filesystem and the read-only mounts; what the user wrote there before, the
    fetched archive, is given to root, its group keeping read access) except the emptyDir stand-ins
    ``writable`` this container mounts."""
    if user.prefix:
        owner_group = user.groups[0] if user.groups else user.gid
        for path in [root, *root.rglob("*")]:
            if not path.is_symlink():
                os.chown(path, 0, owner_group)
    _set_writable(root, False)
    for folder in writable:
        make_empty_dir(folder, user)


def reset_folder(folder: Path) -> None:
    """Removes ``folder`` (made writable first: removing needs that when not run as root)."""
    _set_writable(folder, True)
    shutil.rmtree(folder, ignore_errors=True)


def _interpreter_user(pod: dict, container: dict, python: Path) -> PodUser:
    """:func:`pod_user`, keeping read access anywhere only when the user cannot otherwise run the venv's
    interpreter as it is (a user that cannot reach its home runs another Python from /usr, or none)."""
    user = pod_user(pod, container)
    if not user.prefix:
        return user
    ask = [str(python), "-c", "import os, sys; print(sys.version, os.__file__)"]
    mine = subprocess.run(ask, capture_output=True, text=True).stdout
    theirs = user.run(ask, capture_output=True, text=True).stdout
    return user if theirs == mine else pod_user(pod, container, read_search=True)


class ServerRun:
    """One TorchServe started as a container starts it, its probes, and its log tail for errors."""

    def __init__(self, container: dict, user: PodUser, env: dict[str, str], home: Path, log: Path):
        self.container, self.user, self.env, self.home, self.log = container, user, env, home, log
        self.process: subprocess.Popen | None = None

    def tail(self) -> str:
        """The end of TorchServe's logs and of its output."""
        logs = [self.home / "logs" / "model_log.log", self.home / "logs" / "ts_log.log", self.log]
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-2000:]}"
                         for log in logs if log.is_file())  # fmt: skip

    def start(self, command: list[str]) -> None:
        """Starts ``command`` as the pod's user in its own process group (the container's)."""
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([*self.user.prefix, *command], cwd=self.home, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def probe(self, probe: dict, socket_path: str, ports: dict[int, int]) -> tuple[bool, str]:
        """Runs one of the container's probes: its ``exec`` command as the pod's user (the readiness probe's
        socket moved as the config moved it), or its ``httpGet`` path on the moved port."""
        if "exec" in probe:
            command = list(probe["exec"]["command"])
            if "metarec.ready_probe" in command:
                command += ["--socket", socket_path]
            done = self.user.run(command, cwd=self.home, env=self.env, capture_output=True, text=True)
            return done.returncode == 0, (done.stdout + done.stderr).strip()[-500:]
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in self.container.get("ports", []) if p["name"] == port)
        url = f"http://127.0.0.1:{ports[int(port)]}{probe['httpGet']['path']}"
        status = _get(url)
        return status == 200, f"{url}: {status}"

    def wait_ready(self, socket_path: str, ports: dict[int, int]) -> None:
        """The startup probe until it passes (as the kubelet: within periodSeconds x failureThreshold), then
        the readiness and liveness probes once.

        Raises:
            RuntimeError: The server exited, its log names a fatal error, or a probe failed in time.
        """
        startup = self.container["startupProbe"]
        budget, started = startup["periodSeconds"] * startup["failureThreshold"], time.monotonic()
        while True:
            ready, said = self.probe(startup, socket_path, ports)
            if ready:
                break
            fatal = _fatal_line(self.home / "logs")
            if fatal is None and self.process.poll() is not None:
                fatal = f"torchserve exited {self.process.poll()}"
            if fatal is None and time.monotonic() - started > budget:
                fatal = f"not ready after the startup probe's {budget} s"
            if fatal:
                raise RuntimeError(f"{fatal}; startup probe: {said}\n{self.tail()}")
            time.sleep(0.5)
        for name in ("readinessProbe", "livenessProbe"):
            if name in self.container:
                ready, said = self.probe(self.container[name], socket_path, ports)
                if not ready:
                    raise RuntimeError(f"{name} failed: {said}\n{self.tail()}")

    def stop(self) -> None:
        """Stops the server as the pod is stopped (SIGTERM to its process group)."""
        if self.process is not None:
            _stop_group(self.process)


def local_ports(config: Path) -> dict[int, int]:
    """The pod's container ports (inference, metrics: from the deployed config) -> free local ports."""
    deployed = _properties(config)
    return {
        int(deployed[f"{name}_address"].rsplit(":", 1)[1]): free_port() for name in ("inference", "metrics")
    }


def run_serving(workdir: Path, env: dict[str, str], model_uri: str, results: dict[str, str]) -> None:
    """Runs the serving image's content the way its pods do, then calls every route: the Deployment
    (``manifests/serving/base``) and then, one after the other, the kserve overlay's predictor.

    Deployment (:func:`run_deployment`): in the venv of ``fidelity.build_venv`` for the serving image
    (``workdir/serving/venv``), the fetch-model init container's command downloads ``model_uri`` from the
    emulator into the archive emptyDir; the image's CMD runs with the image's ENV and the container's
    ``env``, on the ConfigMap's ``config.properties`` (:func:`serving_config`); the startup probe's command
    must pass, then readiness and liveness (``/ping``) and the metrics scrape; then recommend (a known
    user), adapt (a new user), feedback and forget over HTTP (feedback and forget answer 404 when the
    container's ``METAREC_STATE_URL`` is ``none``, as the pod does).

    KServe (:func:`run_kserve`): the deployed version copied to the ``/mnt/models`` stand-in (the storage
    initializer), then the predictor container's command and args on the overlay's ``config.properties``,
    its probes, and the KServe v1 route ``POST /v1/models/metarec:predict``.

    Redis (:func:`run_redis`): the ``gke-cpu-redis`` overlay as rendered, its Redis StatefulSet and its
    serving Deployment on the same archive; the state routes checked in Redis, Redis restarted on its
    data, and the documented ``metarec state`` commands run with the serving pod's environment.

    Every process (init command, server, probe commands) runs as the pod's user (:func:`pod_user`), and
    that user can write only the emptyDir stand-ins the container mounts (:func:`pod_mounts`):
    ``/home/model-server`` is ``workdir/serving/home`` (``kserve-home``), ``/tmp`` a fresh private folder
    (short: the management socket's path must fit a Unix socket address). Servers are stopped like the
    pod's (SIGTERM to the process group).

    Args:
        workdir: The fidelity work directory (``serving/venv`` built there); its folders must be
            searchable by the pod's user.
        env: The chain's environment (``STORAGE_EMULATOR_HOST`` set).
        model_uri: The deployed version (the pod's ``MODEL_URI``, the InferenceService's ``storageUri``).
        results: Filled with ``check -> "ok <s>s" | "failed"`` for the checks of :data:`SERVING`.

    Raises:
        RuntimeError: A check failed (what answered, the server's log tail).
    """
    failures = []
    try:
        run_deployment(workdir, env, model_uri, results)
    except RuntimeError as error:
        failures.append(str(error))
    archive = workdir / "serving" / "home" / "archive"
    if (archive / "model-store" / "metarec.mar").is_file():  # the replays are independent once fetched
        started = time.monotonic()
        try:
            run_kserve(workdir, env, archive, results)
        except RuntimeError as error:
            failures.append(str(error))
        print(f"  kserve replay: {time.monotonic() - started:.1f} s", flush=True)
        started = time.monotonic()
        try:
            run_redis(workdir, env, archive, results)
        except RuntimeError as error:
            failures.append(str(error))
        print(f"  redis replay: {time.monotonic() - started:.1f} s", flush=True)
    if failures:
        raise RuntimeError("\n".join(failures))


def _passed(results: dict[str, str], check: str, since: float) -> None:
    results[check] = f"ok {time.monotonic() - since:.1f}s"
    print(f"  {check}: ok ({time.monotonic() - since:.1f} s)", flush=True)


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


def _reachable(user: PodUser, folder: Path) -> None:
    """Fails at once, saying why, when the pod's user cannot enter ``folder`` (a parent only root may
    search), rather than letting every command fail with a permission error."""
    if user.run(["test", "-x", str(folder)]).returncode != 0:
        raise RuntimeError(f"{folder} cannot be entered by uid {user.uid}: use a --workdir whose parent "
                           "folders others may search (e.g. under /tmp or the checkout)")  # fmt: skip


def run_deployment(workdir: Path, env: dict[str, str], model_uri: str, results: dict[str, str]) -> Path:
    """The Deployment's pod (see :func:`run_serving`); returns the fetched archive folder."""
    bin_dir = workdir / "serving" / "venv" / "bin"
    home = workdir / "serving" / "home"
    reset_folder(home)
    (home / "archive").mkdir(parents=True)  # the archive emptyDir
    (home / "logs").mkdir()  # the image's folder, the server's logs emptyDir
    tmp = Path(tempfile.mkdtemp(prefix="metarec-pod-"))
    move = pod_path_mover(home, tmp)
    pod = yaml.safe_load(SERVING_DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-model"]
    (server,) = [c for c in pod["containers"] if c["name"] == "torchserve"]
    current = "fetch-model"
    run = None
    try:
        started = time.monotonic()
        user = _interpreter_user(pod, fetch, bin_dir / "python")
        print(f"  serving pods run {user.note}", flush=True)
        _reachable(user, bin_dir)
        _reachable(user, home)
        # The init container mounts the archive and /tmp emptyDirs; the rest is the read-only root filesystem.
        pod_mounts(home, user, [home / "archive"])
        make_empty_dir(tmp, user)
        command = [move(argument.replace("$(MODEL_URI)", model_uri)) for argument in fetch["command"]]
        fetch_env = _pod_env(env, move, tmp, bin_dir, fetch)
        done = user.run(command, cwd=home, env=fetch_env, capture_output=True, text=True)
        mar = home / "archive" / "model-store" / "metarec.mar"
        if done.returncode != 0 or not mar.is_file():
            raise RuntimeError(
                f"exited {done.returncode}, {mar.name} present: {mar.is_file()}\n{done.stderr[-3000:]}"
            )
        _passed(results, current, started)

        current, started = "torchserve-ready", time.monotonic()
        user = _interpreter_user(pod, server, bin_dir / "python")
        run = ServerRun(server, user, _pod_env(env, move, tmp, bin_dir, server), home,
                        workdir / "serving" / "torchserve.log")  # fmt: skip
        ports = _serve_deployment(run, SERVING_CONFIG, home, tmp, move)
        _passed(results, current, started)

        url = f"http://127.0.0.1:{ports[8080]}/predictions/metarec"
        user_id, rated, catalogue = _served_catalogue(mar)
        unrated = [item for item in catalogue if item not in rated]
        current, started = "recommend", time.monotonic()
        status, answer = _post(url, {"user_id": user_id, "k": 3})
        if status != 200 or answer.get("personalised") is not True or len(answer.get("items", [])) != 3:
            raise RuntimeError(f"{status} {answer}")
        if set(rated) & {entry["item_id"] for entry in answer["items"]}:
            raise RuntimeError(f"rated items recommended back: {answer}")
        _passed(results, current, started)

        # The pod keeps per-user state only when its container names a store (docs/realtime.md).
        stateless = run.env.get(STATE_URL_ENV, "").strip().lower() == STATE_OFF
        current, started = "adapt", time.monotonic()
        support = [
            {"item_id": item, "rating": rating} for item, rating in zip(catalogue[:3], (5, 1, 4), strict=True)
        ]
        # Without a store a new user_id is refused (404: nothing could keep them); the pod adapts anonymously.
        named = {} if stateless else {"user_id": "fidelity-new"}
        status, answer = _post(f"{url}/1.0/adapt", {**named, "support": support, "k": 3})
        returned = {entry["item_id"] for entry in answer.get("items", [])}
        if status != 200 or answer.get("support_size") != 3 or not isinstance(answer.get("steps"), int) \
                or len(returned) != 3 or returned & set(catalogue[:3]):  # fmt: skip
            raise RuntimeError(f"{status} {answer}")
        _passed(results, current, started)

        current, started = "feedback", time.monotonic()
        body = {"user_id": user_id, "ratings": [{"item_id": unrated[0], "rating": 5}], "k": 3}
        status, answer = _post(f"{url}/1.0/feedback", body)
        if stateless:
            if status != 404 or "needs a state store" not in answer.get("message", ""):
                raise RuntimeError(f"{STATE_URL_ENV}={STATE_OFF}, expected 404: {status} {answer}")
        elif status != 200 or answer.get("stored") is not True or answer.get("state_version") != 1 \
                or answer.get("support_size") != len(rated) + 1 or len(answer.get("items", [])) != 3:  # fmt: skip
            raise RuntimeError(f"{status} {answer}")
        _passed(results, current, started)

        current, started = "forget", time.monotonic()
        status, answer = _post(f"{url}/1.0/forget", {"user_id": "fidelity-new"})
        if stateless:
            if status != 404 or "needs a state store" not in answer.get("message", ""):
                raise RuntimeError(f"{STATE_URL_ENV}={STATE_OFF}, expected 404: {status} {answer}")
        elif status != 200 or answer.get("deleted") is not True or answer.get("user_id") != "fidelity-new":
            raise RuntimeError(f"{status} {answer}")
        _passed(results, current, started)
    except Exception as error:  # noqa: BLE001 - whatever broke (a missing executable too) fails the check
        results[current] = "failed"
        raise RuntimeError(f"serving: {current} failed: {type(error).__name__}: {error}") from error
    finally:
        if run is not None:
            run.stop()
        reset_folder(tmp)
    return home / "archive"


def kserve_instances(mar: Path) -> list[dict]:
    """A KServe v1 body's instances: two recommend requests for a known user of the archive (two ``k``, so
    that each prediction is seen to answer its own instance)."""
    user_id, _rated, _catalogue = _served_catalogue(mar)
    return [{"user_id": user_id, "k": 3}, {"user_id": user_id, "k": 2}]


def run_kserve(workdir: Path, env: dict[str, str], archive: Path, results: dict[str, str]) -> None:
    """The kserve overlay's predictor (see :func:`run_serving`), on the archive the Deployment fetched."""
    bin_dir = workdir / "serving" / "venv" / "bin"
    home, models = workdir / "serving" / "kserve-home", workdir / "serving" / "kserve-models"
    reset_folder(home)
    reset_folder(models)
    tmp = Path(tempfile.mkdtemp(prefix="metarec-kfs-"))
    move = pod_path_mover(home, tmp, models)
    predictor = yaml.safe_load(KSERVE_SERVICE.read_text())["spec"]["predictor"]
    container = predictor["pytorch"]
    current, run = "kserve-ready", None
    try:
        started = time.monotonic()
        user = _interpreter_user(predictor, container, bin_dir / "python")
        # KServe's storage initializer: storageUri (the version deploy_model set, which fetch-model
        # downloaded) copied to /mnt/models, mounted read-only in the predictor.
        shutil.copytree(archive, models)
        command = predictor_command(container, move)
        config = Path(next(a for a in command if a.startswith("--ts-config=")).partition("=")[2])
        config.parent.mkdir(parents=True)  # the config volume's mount (/home/model-server/kserve)
        (home / "logs").mkdir()
        ports = local_ports(KSERVE_CONFIG)
        names = {8080: "inference", 8082: "metrics"}
        grpc = {name: free_port() for name in ("grpc_inference", "grpc_management")}
        config.write_text(serving_config(home, tmp, {names[p]: local for p, local in ports.items()} | grpc,
                                         source=KSERVE_CONFIG, models=models))  # fmt: skip
        pod_mounts(models, user, [])
        pod_mounts(home, user, [home / "logs"])
        make_empty_dir(tmp, user)
        run = ServerRun(container, user, _pod_env(env, move, tmp, bin_dir, container), home,
                        workdir / "serving" / "kserve.log")  # fmt: skip
        run.start(command)
        socket_path = move(_properties(KSERVE_CONFIG)["management_address"]).removeprefix("unix:")
        run.wait_ready(socket_path, ports)
        _passed(results, current, started)

        url = f"http://127.0.0.1:{ports[8080]}/v1/models/metarec:predict"
        instances = kserve_instances(models / "model-store" / "metarec.mar")
        current, started = "kserve-predict", time.monotonic()
        status, answer = _post(url, {"instances": instances})
        predictions = answer.get("predictions") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(predictions, list) or len(predictions) != len(instances) \
                or [len(p.get("items", [])) for p in predictions] != [i["k"] for i in instances]:  # fmt: skip
            raise RuntimeError(f"{status} {answer}")
        _passed(results, current, started)

        current, started = "kserve-refuse", time.monotonic()
        status, answer = _post(url, {"instances": instances, "parameters": {}})
        if not 400 <= status < 500 or answer.get("type") != "RequestError":
            raise RuntimeError(f"a body with a field besides 'instances' answered {status} {answer}")
        _passed(results, current, started)
    except Exception as error:  # noqa: BLE001 - whatever broke (a missing executable too) fails the check
        results[current] = "failed"
        raise RuntimeError(f"serving: {current} failed: {type(error).__name__}: {error}") from error
    finally:
        if run is not None:
            run.stop()
        reset_folder(tmp)


def _properties(config: Path) -> dict[str, str]:
    """A ``config.properties`` file's settings."""
    lines = config.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


# ---------------------------------------------------------------------------------------------------
# The Redis overlay: per-user state in the StatefulSet of manifests/state/redis


def render(kustomization: Path) -> list[dict]:
    """Renders a kustomization with ``kubectl kustomize`` (offline), as ``kubectl apply -k`` would apply it.

    Raises:
        RuntimeError: kubectl is missing or the render failed.
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl (with kustomize) is not installed: cannot render the overlay")
    done = subprocess.run(
        [kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization} failed:\n{done.stderr[-3000:]}")
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def rendered(documents: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of ``kind`` (and ``name``) in a render.

    Raises:
        LookupError: None or several.
    """
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    if len(found) != 1:
        raise LookupError(f"{len(found)} {kind} objects{f' named {name}' if name else ''} in the render")
    return found[0]


def kubelet_expand(text: str, values: dict[str, str]) -> str:
    """Expands ``$(VAR)`` references in ``text`` as the kubelet does (``third_party/forked/golang/expansion``).

    ``$(VAR)`` becomes ``values[VAR]`` when defined and stays as written otherwise; ``$$`` is a literal
    ``$`` (so ``$$(VAR)`` is the text ``$(VAR)``); a ``$`` not followed by ``(`` or ``$``, a trailing ``$``
    and an unclosed ``$(`` are left as they are.
    """
    out, i = [], 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
            continue
        following = text[i + 1]
        end = text.find(")", i + 2) if following == "(" else -1
        if following == "$":
            out.append("$")
        elif end != -1:
            name = text[i + 2 : end]
            out.append(values[name] if name in values else f"$({name})")
            i = end + 1
            continue
        else:  # "$x" or an unclosed "$(": both characters kept
            out.append(text[i : i + 2])
        i += 2
    return "".join(out)


def kubelet_env(container: dict, supplied: dict[tuple[str, str, str], str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it from its ``env`` list.

    In list order: a ``value`` is expanded (:func:`kubelet_expand`) with the variables defined *before* it
    in the list (a reference to a later or unknown one stays as written: the pod then sees ``$(NAME)``);
    a ``valueFrom`` takes its value from ``supplied`` and is never expanded. A later entry of the same
    name replaces an earlier one. (``enableServiceLinks`` off: no Service variables to expand with.)

    Args:
        container: The container spec.
        supplied: The values the cluster would give, by ``(source, name, key)``: ``("secretKeyRef",
            secret, key)``, ``("configMapKeyRef", configmap, key)``, ``("fieldRef", fieldPath, "")``.

    Raises:
        LookupError: A non-optional ``valueFrom`` the replay does not supply (the pod would not start:
            ``CreateContainerConfigError``), or an ``envFrom`` (not replayed).
    """
    if container.get("envFrom"):
        raise LookupError(f"{container.get('name')}: envFrom is not replayed")
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            ((source, reference),) = entry["valueFrom"].items()
            key = (source, reference.get("name") or reference.get("fieldPath", ""), reference.get("key", ""))
            if key not in supplied:
                if reference.get("optional"):
                    continue
                raise LookupError(f"{entry['name']}: {source} {key[1]}/{key[2]} does not exist "
                                  f"(the replay supplies {sorted(supplied)})")  # fmt: skip
            env[entry["name"]] = supplied[key]
        else:
            env[entry["name"]] = kubelet_expand(str(entry.get("value", "")), env)
    return env


def mounted_config(pod: dict, container: dict, documents: list[dict], path: str) -> str:
    """The text of the file ``path`` inside ``container`` when a ConfigMap volume provides it (mounted whole
    or through ``subPath``; ``items`` renames honoured), from the rendered ConfigMap the volume names.

    Raises:
        LookupError: No mount holds ``path``, or it is not a ConfigMap key of the render.
    """
    for mount in container.get("volumeMounts", []):
        where = mount["mountPath"].rstrip("/")
        if mount.get("subPath"):
            if path != where:
                continue
            relative = mount["subPath"]
        elif path.startswith(where + "/"):
            relative = path[len(where) + 1 :]
        else:
            continue
        (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mount["name"]]
        if "configMap" not in volume:
            raise LookupError(f"{path} is on volume {volume['name']}, not a ConfigMap")
        source = volume["configMap"]
        items = {item["path"]: item["key"] for item in source.get("items", [])}
        key = items.get(relative) if items else relative
        data = rendered(documents, "ConfigMap", source["name"]).get("data", {})
        if key not in data:
            raise LookupError(f"{path}: ConfigMap {source['name']} has no key {key!r}")
        return data[key]
    raise LookupError(f"no volume mount of {container.get('name')} holds {path}")


def redis_config(text: str, move, port: int) -> str:
    """The StatefulSet's ``redis.conf`` with only what this machine cannot give as the pod has it rewritten:
    ``bind`` to loopback and ``port`` to ``port`` (set when absent: Redis would take 6379 on every
    interface), path arguments under the pod's mounts moved by ``move``. Every other line is kept as
    written, so a directive this redis-server refuses fails here as in the pod."""
    lines, seen = [], set()
    for line in text.splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            directive = words[0].lower()
            seen.add(directive)
            if directive == "bind":
                line = "bind 127.0.0.1"
            elif directive == "port":
                line = f"port {port}"
            elif any(move(word) != word for word in words[1:]):
                line = " ".join([words[0], *(move(word) for word in words[1:])])
        lines.append(line)
    lines += [line for directive, line in (("bind", "bind 127.0.0.1"), ("port", f"port {port}"))
              if directive not in seen]  # fmt: skip
    return "\n".join(lines) + "\n"


def redis_command(container: dict, env: dict[str, str], move, port: int) -> list[str]:
    """The Redis container's ``command`` + ``args``, ``$(VAR)`` expanded with its whole environment (the
    kubelet's rule for commands), the pod's paths moved by ``move``; a ``--port``/``--bind`` argument (it
    would override the config's) moved to ``port``/loopback.

    Raises:
        ValueError: No ``command``: the redis image's entrypoint script is not replayed.
    """
    if not container.get("command"):
        raise ValueError(f"{container.get('name')}: no command (the image's entrypoint is not replayed)")
    command = [move(kubelet_expand(a, env)) for a in [*container["command"], *container.get("args", [])]]
    for option, value in (("--port", str(port)), ("--bind", "127.0.0.1")):
        if option in command[:-1]:
            command[command.index(option) + 1] = value
    return command


def redis_probe_command(probe: dict, port: int) -> list[str]:
    """A Redis probe's ``exec`` command, its ``redis-cli`` (which asks 127.0.0.1:6379) given ``-p port``."""
    import re

    cli = re.compile(r"(?<![\w./-])redis-cli(?![\w.-])")
    return [cli.sub(f"redis-cli -p {port}", argument) for argument in probe["exec"]["command"]]


def service_addresses(documents: list[dict], pod_labels: dict[str, str], container: dict) -> dict:
    """Where clients reach a pod through the render's Services: ``(host, port) -> container port`` for
    each Service selecting ``pod_labels`` (its name, also namespace-qualified, as cluster DNS answers it;
    a headless Service's name leads to the pod's own ports)."""
    named = {p.get("name"): int(p["containerPort"]) for p in container.get("ports", [])}
    addresses = {}
    for service in (d for d in documents if d["kind"] == "Service"):
        selector = service["spec"].get("selector") or {}
        if not selector or any(pod_labels.get(key) != value for key, value in selector.items()):
            continue
        name, namespace = service["metadata"]["name"], service["metadata"].get("namespace", "default")
        hosts = [
            name,
            f"{name}.{namespace}",
            f"{name}.{namespace}.svc",
            f"{name}.{namespace}.svc.cluster.local",
        ]
        if service["spec"].get("clusterIP") == "None":
            pairs = [(port, port) for port in named.values()]
        else:
            pairs = []
            for entry in service["spec"]["ports"]:
                target = entry.get("targetPort", entry["port"])
                pairs.append((int(entry["port"]), named[target] if isinstance(target, str) else int(target)))
        addresses.update({(host, port): target for host in hosts for port, target in pairs})
    return addresses


def move_url(url: str, addresses: dict, local: dict[int, int]) -> str:
    """``url`` with a host and port of ``addresses`` (:func:`service_addresses`) moved to
    ``127.0.0.1:local[container port]``; a URL naming anything else is returned unchanged (it then fails
    here as it would in the pod). The credentials and the path are kept."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    target = addresses.get((parts.hostname, parts.port or 6379))
    if target is None or target not in local:
        return url
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{local[target]}" if credentials else f"127.0.0.1:{local[target]}"
    return urlunsplit(parts._replace(netloc=netloc))


def pod_exec_commands(text: str) -> list[tuple[dict[str, str], list[str]]]:
    """The ``kubectl ... exec TARGET [-c CONTAINER] -- metarec state ...`` commands a document gives (in
    backticks, maybe across lines): ``({"namespace", "target", "container"}, command run in the pod)``."""
    import re

    commands = []
    for span in re.findall(r"`(kubectl\s[^`]*?\sexec\s[^`]*?\s--\s+metarec\s+state\s[^`]*)`", text):
        words = shlex.split(" ".join(span.split()))
        kubectl, command = words[: words.index("--")], words[words.index("--") + 1 :]
        where = {"namespace": "default", "container": ""}
        rest = kubectl[1:]
        while rest:
            word = rest.pop(0)
            if word in ("-n", "--namespace", "-c", "--container"):
                where["namespace" if word in ("-n", "--namespace") else "container"] = rest.pop(0)
            elif word != "exec" and not word.startswith("-"):
                where["target"] = word
        commands.append((where, command))
    return commands


# The Secret manifests/README.md has operators create before applying the overlay (`kubectl create secret
# generic metarec-redis-auth --from-literal=password="$(openssl rand -hex 32)"`); the replay makes its value.
REDIS_SECRET = ("metarec-redis-auth", "password")
REDIS_OVERLAY = REPO / "manifests/serving/overlays/gke-cpu-redis"
# The documents that give the on-call `metarec state` commands for a serving pod.
STATE_COMMAND_DOCS = (REPO / "docs/realtime.md", REPO / "manifests/README.md")
# A user's keys in Redis (metarec.state.redis_store.RedisStateStore._keys, default prefix).
REDIS_KEYS = ("metarec:{{{user}}}:ratings", "metarec:{{{user}}}:meta")


def redis_keys(user_id: str) -> list[str]:
    """The Redis keys the serving store keeps ``user_id`` under."""
    return [pattern.format(user=user_id) for pattern in REDIS_KEYS]


def _served_retention(mar: Path) -> int:
    """The archive's retention: ``state_ttl_s`` of its ``model-config.yaml`` ``handler:`` section, read as
    the handler reads it (:class:`metarec.serving_settings.RequestLimits`)."""
    import zipfile

    from metarec.serving_settings import RequestLimits

    with zipfile.ZipFile(mar) as archive:
        config = yaml.safe_load(archive.read("model-config.yaml")) or {}
    return RequestLimits.from_dict(config.get("handler") or {}).state_ttl_s


def _retained(client, user_id: str, ttl_s: int) -> None:
    """Both of the user's keys exist in Redis and expire within the retention (a write set it just now).

    Raises:
        RuntimeError: A key is missing or has another time to live.
    """
    ttls = [client.pttl(key) for key in redis_keys(user_id)]
    if not all(ttl_s * 1000 - 120_000 < ttl <= ttl_s * 1000 for ttl in ttls):
        raise RuntimeError(f"keys {redis_keys(user_id)}: PTTL {ttls} ms, the retention is {ttl_s} s "
                           "(-2: no key, -1: no time to live)")  # fmt: skip


def _start_redis(run: ServerRun, command: list[str], port: int, budget_s: float = 30.0) -> None:
    """Starts the Redis container's command and waits for its readiness probe (``redis-cli ping`` with the
    password, as the pod's user, pointed at ``port``; it fails while the append-only file loads), then
    its liveness probe (a TCP connect).

    Raises:
        RuntimeError: redis-server exited, or the probe did not pass within ``budget_s``.
    """
    import socket

    run.start(command)
    probe, deadline = redis_probe_command(run.container["readinessProbe"], port), time.monotonic() + budget_s
    while True:
        done = run.user.run(probe, cwd=run.home, env=run.env, capture_output=True, text=True)
        if done.returncode == 0:
            break
        if run.process.poll() is not None:
            raise RuntimeError(f"redis-server exited {run.process.returncode}\n{run.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"readiness probe failing after {budget_s} s: {done.stdout}{done.stderr}\n{run.tail()}"
            )
        time.sleep(0.1)
    with socket.create_connection(
        ("127.0.0.1", port), timeout=run.container["livenessProbe"]["timeoutSeconds"]
    ):
        pass


def _pod_state_commands(deployment: dict, container: str) -> dict[str, list[str]]:
    """The documented ``metarec state`` commands for a serving pod (:data:`STATE_COMMAND_DOCS`), by action.

    Raises:
        RuntimeError: A command execs into another namespace, workload or container than the rendered
            Deployment's (the command would fail on call), or an action is not documented.
    """
    name, namespace = deployment["metadata"]["name"], deployment["metadata"].get("namespace", "default")
    targets = {f"{kind}/{name}" for kind in ("deploy", "deployment", "deployments", "deployment.apps")}
    by_action: dict[str, list[str]] = {}
    for document in STATE_COMMAND_DOCS:
        for where, command in pod_exec_commands(document.read_text()):
            if (where["namespace"], where.get("target") in targets, where["container"]) != (
                namespace,
                True,
                container,
            ):
                raise RuntimeError(f"{document.name}: `{' '.join(command)}` execs into {where}, the overlay "
                                   f"deploys {namespace}/deploy/{name} -c {container}")  # fmt: skip
            by_action.setdefault(command[2], command)
    missing = {"prune", "forget"} - set(by_action)
    if missing:
        raise RuntimeError(f"no serving-pod command for `metarec state {sorted(missing)}` in the docs")
    return by_action


def run_redis(workdir: Path, env: dict[str, str], archive: Path, results: dict[str, str]) -> None:
    """The ``gke-cpu-redis`` overlay (``kubectl kustomize``): its Redis StatefulSet and its serving Deployment
    (see :func:`run_serving`), on the archive the Deployment fetched."""
    import secrets

    bin_dir = workdir / "serving" / "venv" / "bin"
    sandbox = workdir / "serving" / "redis"
    reset_folder(sandbox)
    home, root = sandbox / "home", sandbox / "redis"  # the serving pod's /home/model-server, Redis's mounts
    tmp = Path(tempfile.mkdtemp(prefix="metarec-rds-"))  # the serving pod's /tmp
    current, redis_run, run, client = "redis-server", None, None, None
    password = secrets.token_hex(32)  # as manifests/README.md has operators make it: openssl rand -hex 32
    try:
        started = time.monotonic()
        documents = render(REDIS_OVERLAY)
        statefulset = rendered(documents, "StatefulSet")
        redis_pod = statefulset["spec"]["template"]["spec"]
        (redis_container,) = redis_pod["containers"]
        supplied = {("secretKeyRef", *REDIS_SECRET): password}
        redis_env = {"PATH": os.environ["PATH"], **kubelet_env(redis_container, supplied)}
        port = free_port()
        redis_user = pod_user(redis_pod, redis_container)
        # Each mount a folder: the ConfigMap (read-only), the claim (/data) and the emptyDir (writable).
        mounts = {m["mountPath"]: root / m["name"] for m in redis_container["volumeMounts"]}
        move_redis = paths_mover(list(mounts.items()))
        for folder in mounts.values():
            folder.mkdir(parents=True)
        pod_command = redis_command(redis_container, redis_env, lambda value: value, port)
        if len(pod_command) < 2 or pod_command[1].startswith("-"):
            raise RuntimeError(f"the Redis container names no config file: {pod_command}")
        config_text = mounted_config(redis_pod, redis_container, documents, pod_command[1])
        Path(move_redis(pod_command[1])).write_text(redis_config(config_text, move_redis, port))
        writable = [mounts[m["mountPath"]] for m in redis_container["volumeMounts"] if not m.get("readOnly")]
        pod_mounts(root, redis_user, writable)
        # A new pod gets new emptyDirs; only the claim (a volumeClaimTemplate, no pod volume) outlives it.
        volumes = {volume["name"]: volume for volume in redis_pod.get("volumes", [])}
        ephemeral = [mounts[m["mountPath"]] for m in redis_container["volumeMounts"]
                     if "emptyDir" in volumes.get(m["name"], {})]  # fmt: skip
        data = Path(move_redis("/data"))  # the redis image's WORKDIR
        _reachable(redis_user, data)
        command = redis_command(redis_container, redis_env, move_redis, port)
        redis_log = sandbox / "redis-server.log"
        redis_run = ServerRun(redis_container, redis_user, redis_env, data, redis_log)
        _start_redis(redis_run, command, port)
        print(f"  redis runs {redis_user.note}", flush=True)
        _passed(results, current, started)

        current, started = "redis-serving-ready", time.monotonic()
        deployment = rendered(documents, "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        (server,) = [c for c in pod["containers"] if c["name"] == "torchserve"]
        values = kubelet_env(server, supplied)
        state_url = values.get(STATE_URL_ENV, "")
        if "$(" in state_url or not state_url.startswith("redis"):
            raise RuntimeError(f"the pod's {STATE_URL_ENV} is {state_url.replace(password, '***')!r}")
        # Cluster DNS and the Service's port: only the address moves, the credentials and db stay.
        addresses = service_addresses(documents, statefulset["spec"]["template"]["metadata"]["labels"],
                                      redis_container)  # fmt: skip
        local = {int(p["containerPort"]): port for p in redis_container["ports"]}
        values[STATE_URL_ENV] = move_url(state_url, addresses, local)
        home.mkdir(parents=True)
        shutil.copytree(archive, home / "archive")  # what fetch-model downloads (the same init container)
        (home / "logs").mkdir()
        source = sandbox / "config.properties"  # the rendered ConfigMap the container mounts
        source.write_text(mounted_config(pod, server, documents, POD_HOME + "/config.properties"))
        user = _interpreter_user(pod, server, bin_dir / "python")
        _reachable(user, home)
        make_empty_dir(tmp, user)
        move = pod_path_mover(home, tmp)
        pod_env = _pod_env(env, move, tmp, bin_dir, server, values)
        run = ServerRun(server, user, pod_env, home, sandbox / "torchserve.log")
        ports = _serve_deployment(run, source, home, tmp, move)
        _passed(results, current, started)

        import redis

        client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)
        url = f"http://127.0.0.1:{ports[8080]}/predictions/metarec"
        mar = home / "archive" / "model-store" / "metarec.mar"
        user_id, rated, catalogue = _served_catalogue(mar)
        unrated = [item for item in catalogue if item not in rated]
        ttl_s, new_user = _served_retention(mar), "fidelity-new"
        current, started = "redis-feedback", time.monotonic()
        body = {"user_id": user_id, "ratings": [{"item_id": unrated[0], "rating": 5}], "k": 3}
        status, answer = _post(f"{url}/1.0/feedback", body)
        if status != 200 or answer.get("stored") is not True or answer.get("state_version") != 1 \
                or answer.get("support_size") != len(rated) + 1:  # fmt: skip
            raise RuntimeError(f"{status} {answer}")
        _retained(client, user_id, ttl_s)
        _passed(results, current, started)

        current, started = "redis-recommend", time.monotonic()  # the feedback is read back from Redis

        def recommend(who: str, version: int | None, support: int, personalised: bool = True) -> None:
            status, answer = _post(url, {"user_id": who, "k": 3})
            items = {entry["item_id"] for entry in answer.get("items", [])}
            if status != 200 or answer.get("personalised") is not personalised or len(items) != 3 \
                    or answer.get("state_version") != version or answer.get("support_size") != support:  # fmt: skip
                raise RuntimeError(f"recommend {who}: {status} {answer}")
            if who == user_id and version and unrated[0] in items:
                raise RuntimeError(f"the item {who} rated by feedback was recommended back: {answer}")

        recommend(user_id, 1, len(rated) + 1)
        _passed(results, current, started)

        current, started = "redis-adapt", time.monotonic()
        support = [{"item_id": item, "rating": r} for item, r in zip(catalogue[:3], (5, 1, 4), strict=True)]
        status, answer = _post(f"{url}/1.0/adapt", {"user_id": new_user, "support": support, "k": 3})
        if status != 200 or answer.get("stored") is not True or answer.get("support_size") != 3 \
                or not isinstance(answer.get("state_version"), int):  # fmt: skip
            raise RuntimeError(f"{status} {answer}")
        _retained(client, new_user, ttl_s)
        recommend(new_user, answer.get("state_version"), 3)
        _passed(results, current, started)

        current, started = "redis-forget", time.monotonic()
        status, answer = _post(f"{url}/1.0/forget", {"user_id": new_user})
        if status != 200 or answer.get("deleted") is not True or client.exists(*redis_keys(new_user)):
            raise RuntimeError(f"{status} {answer}, keys left: {client.exists(*redis_keys(new_user))}")
        # docs/realtime.md#erasure: the audit trail is this line in `kubectl logs` (the container's output,
        # not only TorchServe's log files in the emptyDir that goes with the pod). Workers' lines reach the
        # frontend's output asynchronously: wait a little.
        audit, deadline = f"realtime user={new_user} route=forget deleted=True", time.monotonic() + 10
        while audit not in run.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {audit!r} in the container's output\n{run.tail()}")
            time.sleep(0.2)
        _passed(results, current, started)

        # The kubelet stops the pod (SIGTERM, SIGKILL after the grace period) and its replacement mounts
        # the same claim: what the append-only file kept must be served again, with no serving restart.
        current, started = "redis-restart", time.monotonic()
        kept = client.lrange(redis_keys(user_id)[0], 0, -1)
        _stop_group(redis_run.process, float(redis_pod.get("terminationGracePeriodSeconds", 30)))
        if redis_run.process.returncode != 0:
            raise RuntimeError(
                f"redis-server exited {redis_run.process.returncode} on SIGTERM\n{redis_run.tail()}"
            )
        redis_log.rename(sandbox / "redis-server.1.log")
        for folder in ephemeral:
            reset_folder(folder)
            make_empty_dir(folder, redis_user)
        redis_run = ServerRun(redis_container, redis_user, redis_env, data, redis_log)
        _start_redis(redis_run, command, port)
        if not kept or client.lrange(redis_keys(user_id)[0], 0, -1) != kept:
            raise RuntimeError(f"{user_id}'s ratings after the restart: {client.lrange(redis_keys(user_id)[0], 0, -1)}"
                               f", before: {kept}\n{redis_run.tail()}")  # fmt: skip
        recommend(user_id, 1, len(rated) + 1)
        _passed(results, current, started)

        # On call: the documented `kubectl exec deploy/... -c torchserve -- metarec state ...`, run with the
        # container's environment (its METAREC_STATE_URL, password included) as its user.
        current, started = "redis-state-cli", time.monotonic()
        commands = _pod_state_commands(deployment, server["name"])
        prune = commands["prune"]
        if float(prune[prune.index("--ttl-days") + 1]) * 86400 != ttl_s:
            raise RuntimeError(
                f"the documented `{' '.join(prune)}` is not the archive's retention ({ttl_s} s)"
            )
        client.persist(redis_keys(user_id)[0])  # as written before the retention was on
        client.persist(redis_keys(user_id)[1])
        done = user.run(prune, cwd=home, env=pod_env, capture_output=True, text=True)
        if done.returncode != 0 or "gave 1 user(s)" not in done.stdout:
            raise RuntimeError(f"`{' '.join(prune)}` exited {done.returncode}: {done.stdout}{done.stderr}")
        _retained(client, user_id, ttl_s)
        forget = [user_id if word == "USER_ID" else word for word in commands["forget"]]
        done = user.run(forget, cwd=home, env=pod_env, capture_output=True, text=True)
        if (
            done.returncode != 0
            or done.stdout.strip() != f"{user_id}\tdeleted"
            or client.exists(*redis_keys(user_id))
        ):
            raise RuntimeError(f"`{' '.join(forget)}` exited {done.returncode}: {done.stdout}{done.stderr}")
        recommend(user_id, 0, len(rated))  # the archive's history again (docs/realtime.md#erasure)
        _passed(results, current, started)
    except Exception as error:  # noqa: BLE001 - whatever broke (a missing executable too) fails the check
        results[current] = "failed"
        message = f"serving: {current} failed: {type(error).__name__}: {error}"
        raise RuntimeError(message.replace(password, "***")) from error
    finally:
        if client is not None:
            client.close()
        if run is not None:
            run.stop()
        if redis_run is not None:
            redis_run.stop()
        reset_folder(tmp)
