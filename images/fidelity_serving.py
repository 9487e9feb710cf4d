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
one: 4xx). Then the overlay that keeps per-user state, ``manifests/serving/overlays/gke-cpu-redis``
(:func:`fidelity_redis.run_redis`, in ``images/fidelity_redis.py``): its Redis StatefulSet and its serving
Deployment as rendered, the state routes checked in Redis itself, Redis restarted on its data, and the
documented ``metarec state`` commands run with the serving pod's environment. Servers run one after the
other and are stopped as the pod is (SIGTERM to the process group).

Every process runs as the pod's user (:func:`pod_emulation.pod_user`: ``runAsUser``/``runAsGroup``/``fsGroup``
through ``setpriv`` when run as root; the current user otherwise, file modes then standing in), and only the
emptyDir stand-ins a container mounts are writable by it (:func:`pod_emulation.pod_mounts`), so an image that
writes elsewhere, or needs root, fails here as in the pod (how a pod is emulated: ``images/pod_emulation.py``;
the serving container's config, command, environment and calls: ``images/serving_pod.py``). The CMD and
config are run as they are rather than through :mod:`metarec.serve_local`, which writes its own config
(token auth on, ``--models``): that would check ``metarec serve``, not the image.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import yaml
from fidelity_redis import run_redis
from pod_emulation import (
    REPO,
    ServerRun,
    _interpreter_user,
    _reachable,
    free_port,
    make_empty_dir,
    pod_mounts,
    pod_path_mover,
    reset_folder,
)
from serving_pod import (
    SERVING_CONFIG,
    STATE_URL_ENV,
    _failed,
    _passed,
    _pod_env,
    _post,
    _properties,
    _serve_deployment,
    _served_catalogue,
    local_ports,
    predictor_command,
    serving_config,
)

from metarec.state.open import STATE_OFF, keeps_no_state

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

SERVING_DEPLOYMENT = REPO / "manifests/serving/base/deployment.yaml"

# The kserve overlay: its InferenceService and the ConfigMap its predictor mounts at /home/model-server/kserve.
KSERVE_SERVICE = REPO / "manifests/serving/overlays/kserve/inferenceservice.yaml"

KSERVE_CONFIG = REPO / "manifests/serving/overlays/kserve/config.properties"


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
        stateless = keeps_no_state(run.env.get(STATE_URL_ENV, ""))
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
        raise _failed(results, current, error) from error
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
    container = predictor["model"]
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
        raise _failed(results, current, error) from error
    finally:
        if run is not None:
            run.stop()
        reset_folder(tmp)
