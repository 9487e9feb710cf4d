"""The serving phase of ``images/fidelity.py`` runs what the pod runs, moved only where it must be.

Its modules under ``images/``: ``fidelity_serving.py`` (the Deployment and kserve replays),
``fidelity_redis.py`` (the Redis overlay's), ``serving_pod.py`` (the serving container) and
``pod_emulation.py`` (the pod's user, mounts, paths, env and process).

Fast checks of how it derives the pod's command, config and environment from the image and manifests
(``make fidelity`` runs them for real): a rewrite that dropped a deployed setting, left a pod path or a
``0.0.0.0`` listener, or ran another command than the image's CMD would check something else than the pod.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# images/ on the path as images/fidelity.py puts it: its modules import one another by name.
sys.path.insert(0, str(REPO_ROOT / "images"))

import fidelity_redis  # noqa: E402
import fidelity_serving  # noqa: E402
import pod_emulation  # noqa: E402
import serving_pod  # noqa: E402


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_config_is_the_pods_with_only_paths_and_ports_moved(tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "t"
    ports = {"inference": 40001, "metrics": 40002, "grpc_inference": 40003, "grpc_management": 40004}
    text = serving_pod.serving_config(home, tmp, ports)
    config = _properties(text)
    deployed = _properties(serving_pod.SERVING_CONFIG.read_text())
    assert config["inference_address"] == "http://127.0.0.1:40001"
    assert config["metrics_address"] == "http://127.0.0.1:40002"
    assert (config["grpc_inference_port"], config["grpc_management_port"]) == ("40003", "40004")
    assert config["management_address"] == f"unix:{tmp}/metarec-management.sock"
    assert config["model_store"] == f"{home}/archive/model-store"
    moved = {"inference_address", "metrics_address", "management_address", "model_store", "workflow_store"}
    # Every other deployed setting (load_models, token auth, limits, ...) is kept as it is.
    assert {k: v for k, v in config.items() if k in deployed and k not in moved} == {
        k: v for k, v in deployed.items() if k not in moved
    }
    assert set(deployed) <= set(config)
    assert "0.0.0.0" not in text and "/home/model-server" not in text
    assert "unix:/tmp/metarec-management.sock" not in text  # the pod's socket path, shared by every server


def test_model_store_is_where_fetch_model_downloads(tmp_path):
    """The config's model store is inside the init container's download target, as in the pod."""
    pod = yaml.safe_load(fidelity_serving.SERVING_DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-model"]
    move = pod_emulation.pod_path_mover(tmp_path / "home", tmp_path / "t")
    target = move(fetch["command"][fetch["command"].index("$(MODEL_URI)") + 1])
    config = _properties(serving_pod.serving_config(tmp_path / "home", tmp_path / "t", dict.fromkeys(
        ("inference", "metrics", "grpc_inference", "grpc_management"), 1)))  # fmt: skip
    assert config["model_store"] == f"{target}/model-store"


def test_command_is_the_images_cmd(tmp_path):
    config = tmp_path / "config.properties"
    command = serving_pod.serving_command(config)
    assert command == ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(config)]


def test_pod_paths_move_and_nothing_else(tmp_path):
    move = pod_emulation.pod_path_mover(tmp_path / "h", tmp_path / "t")
    assert move("/home/model-server/logs") == f"{tmp_path}/h/logs"
    assert move("/tmp") == f"{tmp_path}/t"
    assert move("unix:/tmp/x.sock") == f"unix:{tmp_path}/t/x.sock"
    assert move("/tmpfoo") == "/tmpfoo" and move("/home/model-serverx") == "/home/model-serverx"
    env = serving_pod.serving_image_env(move)
    assert env["LOG_LOCATION"] == f"{tmp_path}/h/logs" and env["HOME"] == f"{tmp_path}/h"
    assert env["XDG_CACHE_HOME"] == f"{tmp_path}/t/.cache" and env["PYTHONUNBUFFERED"] == "1"


def test_a_worker_import_error_is_fatal_at_once(tmp_path):
    """A handler that cannot import in the image ends the wait in seconds, naming the module."""
    (tmp_path / "model_log.log").write_text(
        "INFO W-9000-metarec_1.0-stdout MODEL_LOG - loading\n"
        "INFO W-9000-metarec_1.0-stdout MODEL_LOG - ModuleNotFoundError: No module named 'redis'\n"
        "INFO W-9000 Backend worker process died.\n"
    )
    assert "No module named 'redis'" in pod_emulation._fatal_line(tmp_path)
    (tmp_path / "model_log.log").write_text(
        "INFO W-9000-metarec_1.0-stdout MODEL_LOG - MetaRec model loaded\n"
    )
    assert pod_emulation._fatal_line(tmp_path) is None


# ------------------------------------------------------------------ the pod's user and what it may write


def _pod_and_container(path: Path, kind: str) -> tuple[dict, dict]:
    document = yaml.safe_load(path.read_text())
    if kind == "deployment":
        pod = document["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "torchserve"]
        return pod, container
    return document["spec"]["predictor"], document["spec"]["predictor"]["model"]


@pytest.mark.parametrize("kind", ["deployment", "kserve"])
def test_root_drops_to_the_pods_user_with_fsgroup_and_no_privileges(kind):
    """Run as root (as on the build machines), every pod process gets the manifests' runAsUser/runAsGroup,
    fsGroup as its only supplementary group, no new privileges and no capabilities."""
    path = fidelity_serving.SERVING_DEPLOYMENT if kind == "deployment" else fidelity_serving.KSERVE_SERVICE
    pod, container = _pod_and_container(path, kind)
    user = pod_emulation.pod_user(pod, container, euid=0)
    assert (user.uid, user.gid, user.groups) == (10001, 10001, (10001,))
    assert user.prefix == ("setpriv", "--reuid=10001", "--regid=10001", "--groups=10001", "--no-new-privs",
                           "--bounding-set=-all")  # fmt: skip
    kept = pod_emulation.pod_user(pod, container, euid=0, read_search=True)
    assert (
        "--ambient-caps=+dac_read_search" in kept.prefix
        and "--bounding-set=-all,+dac_read_search" in kept.prefix
    )
    assert "CAP_DAC_READ_SEARCH" in kept.note


def test_not_root_runs_as_the_current_user_and_says_so():
    pod, container = _pod_and_container(fidelity_serving.SERVING_DEPLOYMENT, "deployment")
    user = pod_emulation.pod_user(pod, container, euid=4242)
    assert user.prefix == () and user.uid == 4242
    assert "not the pod's uid 10001" in user.note


def test_a_manifest_without_the_pods_user_is_refused():
    with pytest.raises(ValueError, match="runAsUser"):
        pod_emulation.pod_user({"securityContext": {"runAsNonRoot": True}}, {"name": "torchserve"}, euid=0)


@pytest.fixture
def sandbox():
    """A folder every user may enter (pytest's tmp_path is under a root-only /tmp/pytest-of-root)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="podserve-test-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o700)
    shutil.rmtree(folder)


def test_only_the_containers_empty_dirs_are_writable_by_the_pods_user(sandbox):
    """The init container may write the archive and /tmp emptyDirs; the server only logs and /tmp: not its
    home (read-only root filesystem), the fetched archive (mounted read-only) or its config. The kernel
    decides (``test -w`` run as the pod's user), so running as root no longer writes everywhere."""
    pod, container = _pod_and_container(fidelity_serving.SERVING_DEPLOYMENT, "deployment")
    user = pod_emulation.pod_user(pod, container)
    home, tmp = sandbox / "home", sandbox / "tmp"
    (home / "archive").mkdir(parents=True)
    (home / "logs").mkdir()
    tmp.mkdir()
    pod_emulation.pod_mounts(home, user, [home / "archive"])
    pod_emulation.make_empty_dir(tmp, user)
    assert {p.name for p in (home, home / "archive", home / "logs", tmp) if user.can_write(p)} == {
        "archive",
        "tmp",
    }
    # What the init container writes (as the pod's user), then the server's view.
    assert user.run(["mkdir", str(home / "archive" / "model-store")]).returncode == 0
    assert user.run(["touch", str(home / "archive" / "model-store" / "metarec.mar")]).returncode == 0
    (home / "config.properties").write_text("load_models=all\n")
    pod_emulation.pod_mounts(home, user, [home / "logs"])
    paths = [home, home / "archive", home / "archive" / "model-store", home / "archive" / "model-store" /
             "metarec.mar", home / "config.properties", home / "logs", tmp]  # fmt: skip
    assert {str(p.relative_to(sandbox)) for p in paths if user.can_write(p)} == {"home/logs", "tmp"}
    assert user.run(["cat", str(home / "archive" / "model-store" / "metarec.mar")]).returncode == 0
    if user.prefix:  # root: what fsGroup gives, not a world-writable folder
        mode = (home / "logs").stat()
        assert (mode.st_uid, mode.st_gid, oct(mode.st_mode & 0o7777)) == (0, 10001, "0o2770")


def test_the_kserve_predictor_runs_the_images_server_on_the_overlays_paths(tmp_path):
    """The predictor's command/args are the image's (tini left to the replay) with /mnt/models and its
    config mount moved, and the overlay's config keeps every deployed setting but paths and ports."""
    predictor = yaml.safe_load(fidelity_serving.KSERVE_SERVICE.read_text())["spec"]["predictor"]
    home, tmp, models = tmp_path / "h", tmp_path / "t", tmp_path / "m"
    move = pod_emulation.pod_path_mover(home, tmp, models)
    command = serving_pod.predictor_command(predictor["model"], move)
    assert command == ["torchserve", "--start", "--foreground", "--ncs", f"--model-store={models}/model-store",
                       f"--ts-config={home}/kserve/config.properties"]  # fmt: skip
    ports = {"inference": 1, "metrics": 2, "grpc_inference": 3, "grpc_management": 4}
    config = _properties(
        serving_pod.serving_config(home, tmp, ports, source=fidelity_serving.KSERVE_CONFIG, models=models)
    )
    assert config["model_store"] == f"{models}/model-store"
    assert config["management_address"] == f"unix:{tmp}/metarec-management.sock"
    assert pod_emulation.container_env(predictor["model"]) == {"METAREC_STATE_URL": "none"}
    # Kubernetes' rules: a container without command/args runs the image's ENTRYPOINT + CMD.
    assert serving_pod.predictor_command({}, move)[:3] == ["torchserve", "--start", "--foreground"]


# ------------------------------------------------------------------ the Redis overlay (gke-cpu-redis)


@pytest.fixture(scope="module")
def redis_overlay():
    """The overlay rendered as the replay renders it (``kubectl kustomize``)."""
    import shutil

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render the overlay")
    documents = fidelity_redis.render(fidelity_redis.REDIS_OVERLAY)
    statefulset = fidelity_redis.rendered(documents, "StatefulSet")
    deployment = fidelity_redis.rendered(documents, "Deployment")
    return documents, statefulset, deployment


def test_dollar_references_expand_as_the_kubelet_expands_them():
    values = {"A": "x", "B": ""}
    expand = pod_emulation.kubelet_expand
    assert expand("redis://:$(A)@$(B)h:1/0", values) == "redis://:x@h:1/0"
    assert expand("$(UNKNOWN)-$(A)", values) == "$(UNKNOWN)-x"  # an unknown name stays as written
    assert expand("$$(A) $$ $$$(A)", values) == "$(A) $ $x"  # $$ is one literal $
    assert expand("$A $ a$ $(A", values) == "$A $ a$ $(A"  # no reference: kept
    assert expand("$()", values) == "$()"


def test_env_values_see_only_the_variables_defined_before_them():
    """A ``$(VAR)`` expands to a variable defined earlier in the list, never to a later one (the pod then
    gets the text ``$(VAR)``); valueFrom values come from the cluster and are not expanded."""
    container = {"name": "c", "env": [
        {"name": "URL_EARLY", "value": "redis://:$(PW)@$(HOST)/0"},
        {"name": "HOST", "value": "h"},
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}},
        {"name": "URL", "value": "redis://:$(PW)@$(HOST)/0"},
        {"name": "HOST", "value": "again-$(HOST)"},
        {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k", "optional": True}}},
    ]}  # fmt: skip
    env = pod_emulation.kubelet_env(container, {("secretKeyRef", "s", "password"): "$(HOST)"})
    assert env == {"URL_EARLY": "redis://:$(PW)@$(HOST)/0", "HOST": "again-h", "PW": "$(HOST)",
                   "URL": "redis://:$(HOST)@h/0"}  # fmt: skip
    with pytest.raises(LookupError, match="secretKeyRef s/password"):
        pod_emulation.kubelet_env(container, {})


def test_the_overlays_state_url_names_the_secret_and_moves_to_the_local_redis(redis_overlay):
    """The rendered Deployment's METAREC_STATE_URL expands (kustomize keeps the variables before it) to the
    Secret's password at the Redis Service; only the Service's address moves to the local server."""
    documents, statefulset, deployment = redis_overlay
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "torchserve"]
    env = pod_emulation.kubelet_env(server, {("secretKeyRef", *fidelity_redis.REDIS_SECRET): "pw"})
    assert env["METAREC_STATE_URL"] == "redis://:pw@metarec-redis:6379/0"
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    addresses = fidelity_redis.service_addresses(
        documents, statefulset["spec"]["template"]["metadata"]["labels"], redis
    )
    assert addresses[("metarec-redis", 6379)] == 6379
    assert addresses[("metarec-redis.metarec.svc.cluster.local", 6379)] == 6379
    move = fidelity_redis.move_url
    assert move(env["METAREC_STATE_URL"], addresses, {6379: 4242}) == "redis://:pw@127.0.0.1:4242/0"
    # Another host or port than the Service's is not moved: it fails here as in the pod.
    assert (
        move("redis://:pw@metarec-rediss:6379/0", addresses, {6379: 4242})
        == "redis://:pw@metarec-rediss:6379/0"
    )
    assert (
        move("redis://:pw@metarec-redis:6380/0", addresses, {6379: 4242})
        == "redis://:pw@metarec-redis:6380/0"
    )


def test_the_secret_is_the_one_the_readme_has_operators_create():
    name, key = fidelity_redis.REDIS_SECRET
    readme = " ".join((REPO_ROOT / "manifests" / "README.md").read_text().split())
    assert f"create secret generic {name} --from-literal={key}=" in readme


def test_redis_runs_the_statefulsets_command_on_its_config_moved(redis_overlay, tmp_path):
    documents, statefulset, _ = redis_overlay
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = pod_emulation.kubelet_env(container, {("secretKeyRef", *fidelity_redis.REDIS_SECRET): "pw"})
    move = pod_emulation.paths_mover([("/etc/redis", tmp_path / "config"), ("/data", tmp_path / "data")])
    assert fidelity_redis.redis_command(container, env, move, 4242) == [
        "redis-server", f"{tmp_path}/config/redis.conf", "--requirepass", "pw"]  # fmt: skip
    # A --port/--bind argument would override the config's: moved too.
    moved = fidelity_redis.redis_command(
        {"command": ["redis-server", "--port", "6379", "--bind", "0.0.0.0"]}, {}, move, 1
    )
    assert moved == ["redis-server", "--port", "1", "--bind", "127.0.0.1"]
    deployed = fidelity_redis.mounted_config(pod, container, documents, "/etc/redis/redis.conf")
    assert deployed == (REPO_ROOT / "manifests/state/redis/redis.conf").read_text()
    config = fidelity_redis.redis_config(deployed, move, 4242)
    changed = [(a, b) for a, b in zip(deployed.splitlines(), config.splitlines(), strict=True) if a != b]
    assert changed == [("bind 0.0.0.0", "bind 127.0.0.1"), ("port 6379", "port 4242"),
                       ("dir /data", f"dir {tmp_path}/data")]  # fmt: skip
    # Without bind/port lines Redis would listen on 6379 everywhere: they are added.
    assert fidelity_redis.redis_config("appendonly yes\n", move, 7).splitlines() == [
        "appendonly yes", "bind 127.0.0.1", "port 7"]  # fmt: skip


def test_the_serving_config_is_the_configmap_the_container_mounts(redis_overlay):
    documents, _, deployment = redis_overlay
    pod = deployment["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "torchserve"]
    text = fidelity_redis.mounted_config(pod, server, documents, "/home/model-server/config.properties")
    assert "load_models=all" in text and "inference_address=http://0.0.0.0:8080" in text
    with pytest.raises(LookupError, match="not a ConfigMap"):
        fidelity_redis.mounted_config(pod, server, documents, "/home/model-server/logs/x")
    with pytest.raises(LookupError, match="no volume mount"):
        fidelity_redis.mounted_config(pod, server, documents, "/etc/passwd")


def test_the_redis_probe_asks_the_moved_port():
    probe = {"exec": {"command": ["sh", "-c", 'REDISCLI_AUTH="$P" redis-cli ping | grep -q PONG']}}
    assert fidelity_redis.redis_probe_command(probe, 4242) == [
        "sh", "-c", 'REDISCLI_AUTH="$P" redis-cli -p 4242 ping | grep -q PONG']  # fmt: skip
    assert fidelity_redis.redis_probe_command({"exec": {"command": ["/usr/bin/redis-cli-x"]}}, 1) == [
        "/usr/bin/redis-cli-x"
    ]


def test_the_documented_pod_commands_exec_into_the_overlays_serving_container(redis_overlay):
    """docs/realtime.md and manifests/README.md give `metarec state prune` and `forget` for a serving pod;
    the replay runs them with the pod's env, after checking they name the Deployment the overlay makes."""
    _, _, deployment = redis_overlay
    commands = fidelity_redis._pod_state_commands(deployment, "torchserve")
    assert commands["prune"] == ["metarec", "state", "prune", "--ttl-days", "90"]
    assert commands["forget"] == ["metarec", "state", "forget", "USER_ID"]
    text = "`kubectl -n other exec deploy/metarec-serving -c torchserve --\n metarec state forget X`"
    assert fidelity_redis.pod_exec_commands(text) == [
        ({"namespace": "other", "target": "deploy/metarec-serving", "container": "torchserve"},
         ["metarec", "state", "forget", "X"])]  # fmt: skip


def test_the_replay_reads_the_keys_the_store_writes():
    pytest.importorskip("redis")
    from metarec.state.redis_store import RedisStateStore

    store = RedisStateStore("redis://127.0.0.1:1/0")  # no connection is made
    assert list(store._keys("u{1}")) == fidelity_redis.redis_keys("u{1}")
