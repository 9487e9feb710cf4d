"""A pod's container run on this machine as the kubelet runs it, for the serving phase of ``images/fidelity.py``.

No container can start here, so what a container sees in its pod is emulated: its image's instructions
(:func:`dockerfile_instructions`); its user (:func:`pod_user`: ``runAsUser``/``runAsGroup``/``fsGroup``
through ``setpriv`` when run as root; the current user otherwise, file modes then standing in); its mounts
(:func:`pod_mounts`: only the emptyDir stand-ins it mounts writable by that user, :func:`make_empty_dir`);
its paths moved to local folders (:func:`pod_path_mover`, :func:`paths_mover`); its ``env`` as the kubelet
resolves it (:func:`kubelet_env`, ``$(VAR)`` as :func:`kubelet_expand`); and its process
(:class:`ServerRun`: started in its own process group, its probes, stopped as the pod is with SIGTERM to
the group, :func:`_stop_group`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]

# The pod's paths that are not the image's own: its home (archive, logs, config), its /tmp emptyDir and
# KServe's model folder (its storage initializer's emptyDir).
POD_HOME, POD_TMP, POD_MODELS = "/home/model-server", "/tmp", "/mnt/models"


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


def container_env(container: dict) -> dict[str, str]:
    """The container's literal ``env`` values (``valueFrom`` ones, MODEL_URI, are substituted by the replay)."""
    return {entry["name"]: str(entry["value"]) for entry in container.get("env", []) if "value" in entry}


class PodUser(NamedTuple):
    """Who the replay runs the pod's processes as.

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


def _reachable(user: PodUser, folder: Path) -> None:
    """Fails at once, saying why, when the pod's user cannot enter ``folder`` (a parent only root may
    search), rather than letting every command fail with a permission error."""
    if user.run(["test", "-x", str(folder)]).returncode != 0:
        raise RuntimeError(f"{folder} cannot be entered by uid {user.uid}: use a --workdir whose parent "
                           "folders others may search (e.g. under /tmp or the checkout)")  # fmt: skip


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
