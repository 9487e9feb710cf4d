"""Serving security in every config the project writes and in the KServe overlays (issue 13).

* One renderer (metarec.torchserve_config) writes every config.properties: the checked-in files are
  up to date, the rendered ConfigMaps hold them, and each one closes the code-loading surface.
* The KServe overlay has its NetworkPolicy, PodDisruptionBudget and probes like the base; the
  kserve-istio overlay adds mesh authentication (checked structurally: Istio kinds have no schema).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from metarec import torchserve_config
from metarec.packaging import config_properties
from metarec.serving_settings import ServingSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT / "manifests"


def render(kustomization: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def parse_properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def surface_problems(properties: dict[str, str]) -> list[str]:
    """What a TorchServe config leaves open of the code-loading / management surface."""
    expected = {
        "allowed_urls": torchserve_config.NOTHING_MATCHES,
        "enable_model_api": "false",
        "use_native_io": "true",
        "decode_input_request": "false",
        "install_py_dep_per_model": "false",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_address": "127.0.0.1",
    }
    problems = [
        f"{key}={properties.get(key)!r}" for key, value in expected.items() if properties.get(key) != value
    ]
    if not properties.get("management_address", "").startswith("unix:"):
        problems.append(f"management_address={properties.get('management_address')!r} is not a Unix socket")
    store = properties.get("workflow_store", "")
    if not store or store == properties.get("model_store"):
        problems.append("workflow_store must be its own (empty) folder, not the model store")
    return problems


def test_checked_in_configs_are_rendered_by_the_one_renderer():
    assert torchserve_config.main(["--root", str(REPO_ROOT)]) == 0
    for path, text in torchserve_config.render_targets().items():
        assert (REPO_ROOT / path).read_text() == text


@pytest.mark.parametrize(
    ("kustomization", "name"),
    [
        ("serving/overlays/gke-cpu", "manifests/serving/base/config.properties"),
        ("serving/overlays/kserve", "manifests/serving/overlays/kserve/config.properties"),
    ],
)
def test_rendered_config_maps_hold_the_generated_properties(kustomization, name):
    maps = [
        obj
        for obj in render(kustomization)
        if obj["kind"] == "ConfigMap" and "config.properties" in obj["data"]
    ]
    assert len(maps) == 1
    assert maps[0]["data"]["config.properties"] == (REPO_ROOT / name).read_text()


def test_every_written_config_closes_the_surface():
    configs = {path: parse_properties(text) for path, text in torchserve_config.render_targets().items()}
    for token_auth in (True, False):
        archive = config_properties(ServingSettings(token_auth=token_auth), "metarec")
        configs[f"archive token_auth={token_auth}"] = parse_properties(
            torchserve_config.format_properties(archive)
        )
    for where, properties in configs.items():
        assert surface_problems(properties) == [], where
    weakened = dict(configs["images/serving/config.properties"], allowed_urls="file://.*|http(s)?://.*")
    weakened.pop("workflow_store")
    assert len(surface_problems(weakened)) == 2


def test_the_handler_limit_sits_below_torchserve_s_request_limit():
    properties = parse_properties(
        torchserve_config.format_properties(config_properties(ServingSettings(), "m"))
    )
    assert int(properties["max_request_size"]) > ServingSettings().max_body_bytes


def _predictor(objects):
    isvc = next(obj for obj in objects if obj["kind"] == "InferenceService")
    return isvc, isvc["spec"]["predictor"]


def test_kserve_overlay_has_network_policy_pdb_and_probes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = render("serving/overlays/kserve")
    isvc, predictor = _predictor(objects)
    pod_labels = {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"], **predictor["labels"]}
    policy = next(obj for obj in objects if obj["kind"] == "NetworkPolicy")
    pdb = next(obj for obj in objects if obj["kind"] == "PodDisruptionBudget")
    for obj in (policy, pdb):
        kubernetes_validate.validate(obj, "1.33", strict=True)
        assert obj["metadata"]["namespace"] == isvc["metadata"]["namespace"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == {8080, 8082}
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < predictor["minReplicas"]
    container = predictor["model"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"][:3] == ["python", "-m", "metarec.ready_probe"], probe
    # Liveness needs /ping, and the probe the management API, without a token: tokens are off there.
    config_map = next(obj for obj in objects if obj["kind"] == "ConfigMap")
    assert parse_properties(config_map["data"]["config.properties"])["disable_token_authorization"] == "true"


# Endpoint controllers and kube-proxy / the mesh take a few seconds to drop a terminating pod.
ENDPOINT_DROP_S = 5


def _drain(pod_spec: dict, container: dict) -> tuple[int, int]:
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep", sleep
    return int(sleep[1]), int(pod_spec.get("terminationGracePeriodSeconds", 30))


@pytest.mark.parametrize("kustomization", ["serving/overlays/gke-cpu", "serving/overlays/kserve"])
def test_draining_outlasts_the_longest_request(kustomization):
    """SIGTERM (tini -g: frontend and workers) resets every request still running, so the preStop sleep
    must cover the endpoints dropping the pod plus the longest request TorchServe lets run (its
    responseTimeout; the Redis time-outs, 5 s, fall inside it), and the grace period the sleep plus the
    frontend's shutdown. A 5 s sleep reset any request still running after 5 s on every rollout."""
    objects = render(kustomization)
    config_map = next(
        obj for obj in objects if obj["kind"] == "ConfigMap" and "config" in obj["metadata"]["name"]
    )
    properties = parse_properties(config_map["data"]["config.properties"])
    # The archive's model-config.yaml sets responseTimeout (metarec.packaging.model_config_yaml), which
    # wins over the server-wide default_response_timeout.
    response_timeout = ServingSettings().response_timeout_s
    assert int(properties.get("default_response_timeout", 0)) <= response_timeout
    if kustomization.endswith("kserve"):
        pod = _predictor(objects)[1]
        container = pod["model"]
    else:
        pod = next(obj for obj in objects if obj["kind"] == "Deployment")["spec"]["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "torchserve")
    sleep, grace = _drain(pod, container)
    assert sleep >= ENDPOINT_DROP_S + response_timeout, (sleep, response_timeout)
    assert grace >= sleep + 20, (grace, sleep)


def authorization_problems(policy: dict, pod_labels: dict) -> list[str]:
    """What an Istio AuthorizationPolicy lacks to authenticate inference on our pods."""
    problems = []
    spec = policy.get("spec") or {}
    if not (spec.get("selector", {}).get("matchLabels", {}).items() <= pod_labels.items()):
        problems.append("selector does not match the serving pods")
    if spec.get("action", "ALLOW") != "ALLOW":
        problems.append("not an ALLOW policy (anything unmatched must be denied)")
    for rule in spec.get("rules") or []:
        operations = [to.get("operation", {}) for to in rule.get("to") or [{}]]
        reaches_inference = any(
            "POST" in op.get("methods", ["POST"]) and "8080" in op.get("ports", ["8080"]) for op in operations
        )
        identified = any(
            source.get("source", {}).get("principals") or source.get("source", {}).get("requestPrincipals")
            for source in rule.get("from") or []
        )
        if reaches_inference and not identified:
            problems.append("a rule lets unidentified callers POST to the inference port")
    return problems


# Source attributes Istio reads from the peer's mTLS certificate: a plaintext caller has none of them.
MTLS_ONLY_SOURCES = frozenset({"principals", "namespaces", "notPrincipals", "notNamespaces"})


def plaintext_port_problems(policy: dict, peer: dict) -> list[str]:
    """Rules on a port the PeerAuthentication leaves PERMISSIVE (plaintext callers, e.g. Managed
    Prometheus without a sidecar) that only an mTLS caller can match."""
    permissive = {
        port
        for port, setting in (peer["spec"].get("portLevelMtls") or {}).items()
        if setting["mode"] != "STRICT"
    }
    problems = []
    for rule in policy["spec"].get("rules") or []:
        ports = {port for to in rule.get("to") or [] for port in to.get("operation", {}).get("ports", [])}
        sources = {key for source in rule.get("from") or [] for key in source.get("source", {})}
        for port in sorted(ports & permissive):
            if sources & MTLS_ONLY_SOURCES:
                problems.append(
                    f"port {port} is plaintext but its rule needs {sorted(sources & MTLS_ONLY_SOURCES)}"
                )
    return problems


def test_istio_option_authenticates_inference():
    objects = render("serving/overlays/kserve-istio")
    _, predictor = _predictor(objects)
    kinds = sorted(obj["kind"] for obj in objects)
    assert {"AuthorizationPolicy", "PeerAuthentication", "NetworkPolicy", "InferenceService"} <= set(kinds)
    policy = next(obj for obj in objects if obj["kind"] == "AuthorizationPolicy")
    peer = next(obj for obj in objects if obj["kind"] == "PeerAuthentication")
    assert policy["apiVersion"] == peer["apiVersion"] == "security.istio.io/v1"
    assert policy["metadata"]["namespace"] == peer["metadata"]["namespace"] == "metarec"
    assert authorization_problems(policy, predictor["labels"]) == []
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    # Metrics scrapes come in plaintext: a namespace rule there answered every scrape 403.
    assert peer["spec"]["portLevelMtls"]["8082"]["mode"] == "PERMISSIVE"
    assert plaintext_port_problems(policy, peer) == []
    assert any("8082" in to["operation"]["ports"] for rule in policy["spec"]["rules"] for to in rule["to"])
    namespaced = copy.deepcopy(policy)
    namespaced["spec"]["rules"][-1]["from"] = [{"source": {"namespaces": ["gmp-system"]}}]
    assert plaintext_port_problems(namespaced, peer) == [
        "port 8082 is plaintext but its rule needs ['namespaces']"
    ]
    assert peer["spec"]["selector"]["matchLabels"].items() <= predictor["labels"].items()
    open_policy = copy.deepcopy(policy)
    open_policy["spec"]["rules"][0].pop("from")
    assert authorization_problems(open_policy, predictor["labels"]) == [
        "a rule lets unidentified callers POST to the inference port"
    ]
    # The same component fits the Deployment variant: its pods carry the same name label.
    base_pod = next(obj for obj in render("serving/base") if obj["kind"] == "Deployment")["spec"]["template"]
    assert authorization_problems(policy, base_pod["metadata"]["labels"]) == []
