"""The Redis state-store manifests: render, validate strictly, hardened, reachable only from serving pods,
and the serving pods pointed at it by configuration (the gke-cpu-redis overlay), not by editing the base."""

from __future__ import annotations

import copy

import pytest
from test_manifests import KUBERNETES_VERSIONS, MANIFESTS, hardening_problems, pod_specs, render

OVERLAY = "serving/overlays/gke-cpu-redis"
STORE = "state/redis"


def _one(kind: str, kustomization: str, name: str | None = None) -> dict:
    found = [o for o in render(kustomization) if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kustomization}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_validates_strictly(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = render(OVERLAY)
    assert {"StatefulSet", "Deployment", "NetworkPolicy", "Service"} <= {o["kind"] for o in objects}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_redis_pod_is_hardened_and_persists_to_its_claim():
    statefulset = _one("StatefulSet", OVERLAY, "metarec-redis")
    [(where, spec)] = pod_specs(statefulset)
    claims = [claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]]
    assert claims == ["data"]
    # The baseline wants every writable mount to be an emptyDir; the data claim is the one exception.
    container = spec["containers"][0]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    unclaimed = copy.deepcopy(spec)
    unclaimed["containers"][0]["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "data"]
    assert hardening_problems(unclaimed, where) == []
    weakened = copy.deepcopy(unclaimed)
    weakened["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert hardening_problems(weakened, where)
    assert spec["securityContext"]["runAsUser"] != 0


def _selected(selector: dict) -> set[str]:
    """Names of the overlay's workloads whose pods ``selector`` selects. An empty selector selects every
    pod of the namespace, so a subset test of its labels alone passed with ``matchLabels: {}``."""
    assert set(selector) == {"matchLabels"} and selector["matchLabels"], selector
    workloads = [o for o in render(OVERLAY) if o["kind"] in ("StatefulSet", "Deployment")]
    return {
        o["metadata"]["name"]
        for o in workloads
        if selector["matchLabels"].items() <= o["spec"]["template"]["metadata"]["labels"].items()
    }


def test_only_serving_pods_reach_redis():
    policy = _one("NetworkPolicy", OVERLAY, "metarec-redis")
    redis_pods = _one("StatefulSet", OVERLAY)["spec"]["template"]["metadata"]["labels"]
    serving_pods = _one("Deployment", OVERLAY)["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and spec["egress"] == []
    assert spec["podSelector"]["matchLabels"].items() <= redis_pods.items()
    assert _selected(spec["podSelector"]) == {"metarec-redis"}  # the policy holds for Redis alone
    [rule] = spec["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    [source] = rule["from"]
    assert set(source) == {"podSelector"}  # no namespaceSelector: this namespace only
    assert source["podSelector"]["matchLabels"].items() <= serving_pods.items()
    assert _selected(source["podSelector"]) == {"metarec-serving"}


def test_serving_pods_may_reach_redis_only_with_the_component():
    def redis_egress(kustomization: str) -> list[dict]:
        policy = _one("NetworkPolicy", kustomization, "metarec-serving")
        return [
            rule for rule in policy["spec"]["egress"] if {"port": 6379, "protocol": "TCP"} in rule["ports"]
        ]

    assert redis_egress("serving/overlays/gke-cpu") == []
    [rule] = redis_egress(OVERLAY)
    redis_pods = _one("StatefulSet", OVERLAY)["spec"]["template"]["metadata"]["labels"]
    assert rule["to"][0]["podSelector"]["matchLabels"].items() <= redis_pods.items()
    assert _selected(rule["to"][0]["podSelector"]) == {"metarec-redis"}


def test_serving_pods_are_pointed_at_the_redis_service():
    container = _one("Deployment", OVERLAY)["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    service = _one("Service", OVERLAY, "metarec-redis")
    redis = _one("StatefulSet", OVERLAY)["spec"]["template"]["spec"]["containers"][0]
    assert env["METAREC_STATE_HOST"]["value"] == service["metadata"]["name"]
    assert (
        service["spec"]["selector"].items()
        <= _one("StatefulSet", OVERLAY)["spec"]["template"]["metadata"]["labels"].items()
    )
    port = service["spec"]["ports"][0]["port"]
    url = env["METAREC_STATE_URL"]["value"]
    assert url == f"redis://:$(METAREC_REDIS_PASSWORD)@$(METAREC_STATE_HOST):{port}/0"
    # $(VAR) only expands variables defined earlier in the list.
    names = [item["name"] for item in container["env"]]
    assert names.index("METAREC_STATE_URL") > max(
        names.index("METAREC_STATE_HOST"), names.index("METAREC_REDIS_PASSWORD")
    )
    secret = env["METAREC_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    redis_secret = {i["name"]: i for i in redis["env"]}["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret == redis_secret
    # The base keeps no per-user state (one SQLite file per replica would not be shared); this overlay
    # replaces that setting.
    base = _one("Deployment", "serving/base")["spec"]["template"]["spec"]["containers"][0]
    assert {item["name"]: item.get("value") for item in base["env"]}["METAREC_STATE_URL"] == "none"


def test_redis_config_persists_and_never_evicts():
    config = dict(
        line.split(None, 1)
        for line in (MANIFESTS / STORE / "redis.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith("rename-command")
    )
    assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "noeviction"
    limit = _one("StatefulSet", STORE)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"
    ]
    assert limit.endswith("Gi") and int(config["maxmemory"].removesuffix("mb")) < int(limit[:-2]) * 1024


# Commands the deployed redis.conf must refuse: ones that wipe data or persistence, turn auth off,
# stop the server, replicate or copy the data set elsewhere, watch every command, block on all keys.
REFUSED_COMMANDS = [
    ["FLUSHALL"], ["FLUSHDB"], ["SWAPDB", "0", "1"], ["CONFIG", "GET", "requirepass"], ["DEBUG", "SLEEP", "0"],
    ["MODULE", "LIST"], ["FUNCTION", "LIST"], ["ACL", "SETUSER", "default", "nopass"], ["SHUTDOWN", "NOSAVE"],
    ["REPLICAOF", "127.0.0.1", "1"], ["SLAVEOF", "127.0.0.1", "1"], ["SYNC"], ["PSYNC", "?", "-1"],
    ["MIGRATE", "127.0.0.1", "1", "k", "0", "1"], ["MONITOR"], ["KEYS", "*"],
]  # fmt: skip


def test_deployed_redis_config_refuses_dangerous_commands_and_serves_the_store(tmp_path):
    """The manifest's redis.conf on a real redis-server (port, bind and dir moved, as the pod's password):
    each dangerous command is refused, and everything the store, the probe and the runbook run works."""
    import shutil
    import subprocess

    redis = pytest.importorskip("redis")
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed")
    from metarec.state import Rating
    from metarec.state.local_redis import _free_port, wait_for_redis
    from metarec.state.redis_store import RedisStateStore

    port, password = _free_port(), "0123456789abcdef"
    deployed = (MANIFESTS / STORE / "redis.conf").read_text()
    assert "\ndir /data\n" in deployed
    config = tmp_path / "redis.conf"  # the pod's /data does not exist here; the rest is the manifest's
    config.write_text(deployed.replace("\ndir /data\n", f"\ndir {tmp_path}\n"))
    command = [executable, str(config), "--bind", "127.0.0.1", "--port", str(port),
               "--dir", str(tmp_path), "--requirepass", password, "--logfile", str(tmp_path / "redis.log")]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(process, port, tmp_path / "redis.log")
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        assert client.ping()
        for refused in REFUSED_COMMANDS:
            with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
                client.execute_command(*refused)
        # Everything the app runs: the store's scripts (SCRIPT LOAD after a SCRIPT FLUSH), reads, pruning,
        # erasure; the runbook's INFO and MEMORY USAGE.
        store = RedisStateStore(f"redis://:{password}@127.0.0.1:{port}/0", window=5, ttl_s=3600)
        client.script_flush()
        stored = store.append("u1", [Rating("7", 4.0, 1.0)])
        assert store.put_state("u1", b"blob", stored.version, stored.incarnation)
        assert [r.item_id for r in store.get("u1").ratings] == ["7"]
        assert client.memory_usage("metarec:{u1}:meta") > 0 and "used_memory" in client.info("memory")
        assert store.prune() == 0  # SCAN and the retention script ran (both keys already expire)
        assert store.delete("u1") and store.get("u1") is None
        store.close()
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
