"""The Redis overlay's replay in the serving phase of ``images/fidelity.py`` (:func:`run_redis`, run by
``fidelity_serving.run_serving``): per-user state in the StatefulSet of ``manifests/state/redis``.

The overlay that keeps per-user state, ``manifests/serving/overlays/gke-cpu-redis``, rendered with
``kubectl kustomize`` (:func:`render`): the Redis StatefulSet's command and env (``manifests/state/redis``)
on the rendered ConfigMap's ``redis.conf`` (``/data``, the claim, and its mounts moved to private folders, a
free loopback port instead of ``0.0.0.0:6379``, the password a made-up value of the Secret
manifests/README.md has operators create), as its user, until its probes pass; then the rendered
Deployment's ``torchserve`` with its env resolved as the kubelet does (``$(VAR)`` to the variables defined
before it, the Secret's value) and only the Redis Service's address moved; feedback for a known user
(stored), a plain recommend reading it back, adapt for a new user_id (stored), forget (deleted), each
checked in Redis itself (the keys and their time to live, the archive's ``state_ttl_s``); Redis stopped as
the kubelet stops it (SIGTERM) and started again on the same data (the feedback must still be served, by
the same TorchServe); and the on-call ``metarec state prune`` and ``forget`` as the docs give them for a
serving pod, run with that pod's environment. The pods are emulated by ``images/pod_emulation.py``, the
serving container started and called by ``images/serving_pod.py``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from pod_emulation import (
    POD_HOME,
    REPO,
    ServerRun,
    _interpreter_user,
    _reachable,
    _stop_group,
    free_port,
    kubelet_env,
    kubelet_expand,
    make_empty_dir,
    paths_mover,
    pod_mounts,
    pod_path_mover,
    pod_user,
    reset_folder,
)
from serving_pod import (
    STATE_URL_ENV,
    _failed,
    _passed,
    _pod_env,
    _post,
    _serve_deployment,
    _served_catalogue,
)

# The Secret manifests/README.md has operators create before applying the overlay (`kubectl create secret
# generic metarec-redis-auth --from-literal=password="$(openssl rand -hex 32)"`); the replay makes its value.
REDIS_SECRET = ("metarec-redis-auth", "password")

REDIS_OVERLAY = REPO / "manifests/serving/overlays/gke-cpu-redis"

# The documents that give the on-call `metarec state` commands for a serving pod.
STATE_COMMAND_DOCS = (REPO / "docs/realtime.md", REPO / "manifests/README.md")

# A user's keys in Redis (metarec.state.redis_store.RedisStateStore._keys, default prefix).
REDIS_KEYS = ("metarec:{{{user}}}:ratings", "metarec:{{{user}}}:meta")


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
        raise _failed(results, current, error, secret=password) from error
    finally:
        if client is not None:
            client.close()
        if run is not None:
            run.stop()
        if redis_run is not None:
            redis_run.stop()
        reset_folder(tmp)
