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
