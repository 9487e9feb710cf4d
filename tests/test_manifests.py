"""Kubernetes manifests: every kustomization renders, validates against Kubernetes 1.29-1.33, and every
pod template in every rendered overlay is hardened. Custom resources (InferenceService, PyTorchJob) have
no bundled schema, so the fields we rely on are checked structurally here.

The checkers are plain functions fed with deliberately weakened objects too, so each check is shown to fail.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT / "manifests"
KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
EXPECTED_KUSTOMIZATIONS = {
    "serving/identity",
    "serving/base",
    "serving/overlays/gke-cpu",
    "serving/overlays/gke-gpu",
    "serving/overlays/kserve",
    "training",
    "training-example",
    "pipeline-rbac",
    "monitoring",
    "katib",
}
CUSTOM_KINDS = {
    "Experiment",
    "InferenceService",
    "ServingRuntime",
    "PyTorchJob",
    "PodMonitoring",
    "AuthorizationPolicy",
    "PeerAuthentication",
}
MANAGEMENT_PORT = 8081


def _kustomizations() -> list[str]:
    return sorted(str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml"))


# Every serving overlay is something a user applies: found, not listed, so that a new overlay (or one
# listed nowhere, as gke-cpu-redis and kserve-istio were) cannot escape the hardening check.
DEPLOYABLE = [k for k in _kustomizations() if k.startswith("serving/overlays/")] + [
    "training-example",
    "katib",
]


@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    """Renders one kustomization with ``kubectl kustomize`` (offline).

    Args:
        kustomization: Folder relative to ``manifests/``.

    Returns:
        The rendered objects.
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render the manifests")
    result = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _objects(kind: str, kustomization: str) -> list[dict]:
    return [obj for obj in render(kustomization) if obj["kind"] == kind]


# ----------------------------------------------------------------------------------------------
# Checkers (used on the real manifests and on weakened copies)


def _is_true(value) -> bool:
    return value is True


def hardening_problems(pod_spec: dict, where: str) -> list[str]:
    """Lists what a pod spec lacks of the project's hardening baseline.

    Baseline: pod and every container (init containers included) run as non-root with the RuntimeDefault
    seccomp profile; every container has a read-only root filesystem, no privilege escalation, all
    capabilities dropped and none added, CPU/memory requests and limits, and an emptyDir on /tmp; every
    writable mount is an emptyDir; no host namespaces or hostPath volumes.

    Args:
        pod_spec: A PodSpec (``template.spec`` of a workload, or the equivalent of a custom resource).
        where: Name for the messages (e.g. ``"gke-cpu Deployment/metarec-serving"``).

    Returns:
        One message per problem; empty when the spec meets the baseline.
    """
    problems = []
    pod_context = pod_spec.get("securityContext") or {}
    if not _is_true(pod_context.get("runAsNonRoot")):
        problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if (pod_context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod securityContext.seccompProfile is not RuntimeDefault")
    if pod_context.get("runAsUser") == 0:
        problems.append(f"{where}: pod runs as UID 0")
    for host_field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host_field):
            problems.append(f"{where}: {host_field} is set")
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes") or []}
    for name, volume in volumes.items():
        if "hostPath" in volume:
            problems.append(f"{where}: volume {name} is a hostPath")
    containers = [("init container", c) for c in pod_spec.get("initContainers") or []]
    containers += [("container", c) for c in pod_spec.get("containers") or []]
    if not any(kind == "container" for kind, _ in containers):
        problems.append(f"{where}: no containers")
    for kind, container in containers:
        label = f"{where} {kind} {container.get('name')}"
        context = container.get("securityContext") or {}
        if not _is_true(context.get("runAsNonRoot")):
            problems.append(f"{label}: securityContext.runAsNonRoot is not true")
        if context.get("runAsUser") == 0:
            problems.append(f"{label}: runs as UID 0")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{label}: allowPrivilegeEscalation is not false")
        if not _is_true(context.get("readOnlyRootFilesystem")):
            problems.append(f"{label}: readOnlyRootFilesystem is not true")
        if _is_true(context.get("privileged")):
            problems.append(f"{label}: privileged")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{label}: capabilities.drop does not contain ALL")
        if capabilities.get("add"):
            problems.append(f"{label}: capabilities.add {capabilities['add']}")
        if (context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{label}: seccompProfile is not RuntimeDefault")
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(section) or {})
            if missing:
                problems.append(f"{label}: resources.{section} lacks {sorted(missing)}")
        mounts = container.get("volumeMounts") or []
        tmp_mounts = [m for m in mounts if m.get("mountPath") == "/tmp"]
        if not tmp_mounts or "emptyDir" not in volumes.get(tmp_mounts[0]["name"], {}):
            problems.append(f"{label}: no emptyDir mounted on /tmp (the root filesystem is read-only)")
        for mount in mounts:
            volume = volumes.get(mount["name"])
            if volume is None:
                problems.append(f"{label}: mount {mount['mountPath']} names missing volume {mount['name']}")
            elif not mount.get("readOnly") and "emptyDir" not in volume:
                problems.append(f"{label}: writable mount {mount['mountPath']} is not an emptyDir")
    return problems


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """Finds every pod template in a rendered object.

    Args:
        obj: A rendered Kubernetes object (built-in workload, PyTorchJob, InferenceService or Katib
            Experiment).

    Returns:
        ``(name, pod_spec)`` pairs; for an InferenceService, the predictor's pod fields with the
        framework container as its only container (that is how KServe builds the pod).
    """
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    spec = obj.get("spec") or {}
    if obj["kind"] == "InferenceService":
        predictor = dict(spec["predictor"])
        framework = next(k for k in ("pytorch", "model") if k in predictor)
        container = dict(predictor.pop(framework), name="kserve-container")
        for key in ("modelFormat", "runtime", "protocolVersion", "storageUri"):  # KServe's, not the pod's
            container.pop(key, None)
        return [(f"{name} predictor", {**predictor, "containers": [container]})]
    if obj["kind"] == "PyTorchJob":
        return [(f"{name} {role}", r["template"]["spec"]) for role, r in spec["pytorchReplicaSpecs"].items()]
    if obj["kind"] == "Experiment":
        return [(f"{name} trial", spec["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"])]
    if obj["kind"] == "CronJob":
        return [(name, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if "template" in spec and "spec" in (spec["template"] or {}):
        return [(name, spec["template"]["spec"])]
    if obj["kind"] == "Pod":
        return [(name, spec)]
    return []


def management_port_exposures(service: dict) -> list[str]:
    """Lists the ports of a Service that reach TorchServe's management API.

    Args:
        service: A rendered Service.

    Returns:
        Port descriptions; empty when the management API is not exposed.
    """
    exposed = []
    for port in service["spec"].get("ports") or []:
        if (
            MANAGEMENT_PORT in (port.get("port"), port.get("targetPort"))
            or port.get("targetPort") == "management"
        ):
            exposed.append(f"{service['metadata']['name']}:{port.get('port')}->{port.get('targetPort')}")
    return exposed


def _properties(text: str) -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


# ----------------------------------------------------------------------------------------------
# Rendering and schema validation


def test_every_kustomization_is_known_and_renders():
    found = set(_kustomizations())
    assert EXPECTED_KUSTOMIZATIONS <= found, f"missing: {EXPECTED_KUSTOMIZATIONS - found}"
    for kustomization in sorted(found):
        assert render(kustomization), f"{kustomization} rendered nothing"


def test_kustomizations_use_labels_not_common_labels():
    for path in MANIFESTS.rglob("kustomization.yaml"):
        document = yaml.safe_load(path.read_text())
        assert "commonLabels" not in document, f"{path}: commonLabels is deprecated, use labels"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_strictly(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for kustomization in _kustomizations():
        for obj in render(kustomization):
            if obj["kind"] in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(
                    f"{kustomization} {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {err}"
                )
            checked += 1
    assert checked >= 15


def test_strict_validation_rejects_an_unknown_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(_objects("Deployment", "serving/base")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = []  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33", strict=True)


# ----------------------------------------------------------------------------------------------
# Hardening


def _without_claim_mounts(obj: dict, spec: dict) -> dict:
    """The pod spec without the mounts of the object's persistent volume claims (a StatefulSet's data:
    the one kind of writable mount the baseline allows besides an emptyDir)."""
    claims = {
        claim["metadata"]["name"] for claim in (obj.get("spec") or {}).get("volumeClaimTemplates") or []
    }
    if not claims:
        return spec
    spec = copy.deepcopy(spec)
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        container["volumeMounts"] = [
            m for m in container.get("volumeMounts") or [] if m["name"] not in claims
        ]
    return spec


@pytest.mark.parametrize("kustomization", [k for k in DEPLOYABLE if k.startswith("serving/")])
def test_serving_replicas_share_their_user_state_or_keep_none(kustomization):
    """Every serving overlay runs two or more replicas: their handler must either keep no per-user state
    (METAREC_STATE_URL=none) or use a store they all reach (Redis), never the embedded default, one
    SQLite file per pod that the next request may not see; and a $(VAR) in the URL must name a variable
    defined before it (Kubernetes expands only those)."""
    serving = [
        container
        for obj in render(kustomization)
        for _, spec in pod_specs(obj)
        for container in spec["containers"]
        if container["image"].split("/")[-1].startswith("metarec-serving")
    ]
    assert serving, kustomization
    for container in serving:
        env = container.get("env") or []
        names = [entry["name"] for entry in env]
        url = next((entry.get("value") for entry in env if entry["name"] == "METAREC_STATE_URL"), None)
        assert url == "none" or (url or "").startswith(("redis://", "rediss://")), (kustomization, url)
        for variable in re.findall(r"\$\((\w+)\)", url):
            assert variable in names[: names.index("METAREC_STATE_URL")], (kustomization, variable)


def test_every_serving_overlay_is_checked():
    assert {"serving/overlays/gke-cpu", "serving/overlays/gke-cpu-redis", "serving/overlays/gke-gpu",
            "serving/overlays/kserve", "serving/overlays/kserve-istio"} <= set(DEPLOYABLE)  # fmt: skip


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_every_pod_template_is_hardened(kustomization):
    templates = [(where, _without_claim_mounts(obj, spec)) for obj in render(kustomization)
                 for where, spec in pod_specs(obj)]  # fmt: skip
    assert templates, f"{kustomization} has no pod template"
    problems = [p for where, spec in templates for p in hardening_problems(spec, f"{kustomization} {where}")]
    assert not problems, "\n".join(problems)


def api_token_problems(pod_spec: dict, where: str) -> list[str]:
    """A serving or state pod needs no Kubernetes API access: its spec itself must say
    ``automountServiceAccountToken: false`` (a ServiceAccount's setting is lost when the pod is given
    another account, e.g. one KServe or a platform team creates)."""
    if pod_spec.get("automountServiceAccountToken") is not False:
        return [f"{where}: automountServiceAccountToken is not false (an API token is mounted)"]
    return []


@pytest.mark.parametrize("kustomization", [k for k in DEPLOYABLE if k.startswith("serving/")])
def test_no_serving_pod_mounts_an_api_token(kustomization):
    templates = [(where, spec) for obj in render(kustomization) for where, spec in pod_specs(obj)]
    assert templates
    problems = [p for where, spec in templates for p in api_token_problems(spec, f"{kustomization} {where}")]
    assert not problems, "\n".join(problems)
    weakened = copy.deepcopy(templates[0][1])
    weakened.pop("automountServiceAccountToken")
    assert api_token_problems(weakened, "weakened")


WEAKENINGS = {
    "pod runAsNonRoot removed": lambda s: s["securityContext"].pop("runAsNonRoot"),
    "pod seccomp Unconfined": lambda s: s["securityContext"].__setitem__(
        "seccompProfile", {"type": "Unconfined"}
    ),
    "init container escalates": lambda s: s["initContainers"][0]["securityContext"].__setitem__(
        "allowPrivilegeEscalation", True
    ),
    "init container writable root": lambda s: s["initContainers"][0]["securityContext"].pop(
        "readOnlyRootFilesystem"
    ),
    "init container seccomp missing": lambda s: s["initContainers"][0]["securityContext"].pop(
        "seccompProfile"
    ),
    "container keeps capabilities": lambda s: s["containers"][0]["securityContext"].pop("capabilities"),
    "container adds NET_ADMIN": lambda s: s["containers"][0]["securityContext"]["capabilities"].__setitem__(
        "add", ["NET_ADMIN"]
    ),
    "container runAsNonRoot false": lambda s: s["containers"][0]["securityContext"].__setitem__(
        "runAsNonRoot", False
    ),
    "container privileged": lambda s: s["containers"][0]["securityContext"].__setitem__("privileged", True),
    "container without limits": lambda s: s["containers"][0]["resources"].pop("limits"),
    "no /tmp emptyDir": lambda s: s["containers"][0].__setitem__(
        "volumeMounts", [m for m in s["containers"][0]["volumeMounts"] if m["mountPath"] != "/tmp"]
    ),
    "writable hostPath mount": lambda s: (
        s["volumes"].append({"name": "host", "hostPath": {"path": "/var"}}),
        s["containers"][0]["volumeMounts"].append({"name": "host", "mountPath": "/var/host"}),
    ),
    "host network": lambda s: s.__setitem__("hostNetwork", True),
}


@pytest.mark.parametrize("weakening", sorted(WEAKENINGS))
def test_hardening_checker_rejects_weakened_templates(weakening):
    spec = copy.deepcopy(_objects("Deployment", "serving/overlays/gke-cpu")[0]["spec"]["template"]["spec"])
    assert hardening_problems(spec, "original") == []
    WEAKENINGS[weakening](spec)
    assert hardening_problems(spec, "weakened"), f"checker accepted: {weakening}"


def test_hardening_checker_sees_every_pytorchjob_replica():
    job = copy.deepcopy(_objects("PyTorchJob", "training-example")[0])
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["securityContext"].pop("seccompProfile")
    problems = [p for where, spec in pod_specs(job) for p in hardening_problems(spec, where)]
    assert len(problems) == 1 and "Worker" in problems[0]


# ----------------------------------------------------------------------------------------------
# Serving objects


@pytest.mark.parametrize("kustomization", DEPLOYABLE)
def test_no_service_exposes_the_management_api(kustomization):
    exposures = [
        e for service in _objects("Service", kustomization) for e in management_port_exposures(service)
    ]
    assert exposures == []


def test_management_exposure_check_can_fail():
    service = copy.deepcopy(_objects("Service", "serving/base")[0])
    service["spec"]["ports"].append({"name": "management", "port": 9000, "targetPort": MANAGEMENT_PORT})
    assert management_port_exposures(service) == ["metarec-serving:9000->8081"]


@pytest.mark.parametrize("kustomization", ["serving/overlays/gke-cpu", "serving/overlays/gke-gpu"])
def test_serving_overlay_objects(kustomization):
    kinds = sorted(obj["kind"] for obj in render(kustomization))
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy"]
        + ["PodDisruptionBudget", "Service", "ServiceAccount"]
    )
    deployment = _objects("Deployment", kustomization)[0]
    pod = deployment["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "torchserve")
    assert sorted(p["containerPort"] for p in server["ports"]) == [8080, 8082]
    assert server["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert server["livenessProbe"]["httpGet"]["port"] in (8080, "http")
    # Ready only with a READY worker (/ping is 200 before and while workers fail to load).
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["exec"]["command"][:3] == ["python", "-m", "metarec.ready_probe"], probe
    fetch = pod["initContainers"][0]
    assert fetch["command"][:4] == ["python", "-m", "metarec.storage", "download-dir"]
    assert "--require-complete" in fetch["command"]
    # The model version is the pod template annotation deploy_model sets; no manifest may name it, or a
    # later `kubectl apply -k` would roll serving back to it (components/deploy_model/deploy.py).
    (model_env,) = [e for e in fetch["env"] if e["name"] == "MODEL_URI"]
    assert model_env == {"name": "MODEL_URI", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['metarec.io/model-uri']"}}}  # fmt: skip
    assert "metarec.io/model-uri" not in deployment["spec"]["template"]["metadata"].get("annotations", {})
    account = _objects("ServiceAccount", kustomization)[0]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    hpa = _objects("HorizontalPodAutoscaler", kustomization)[0]
    assert (
        hpa["apiVersion"] == "autoscaling/v2"
        and hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    )
    # The HPA owns the pod count: a `replicas` in the manifest would reset it on every apply (the
    # Kubernetes HPA docs: remove spec.replicas from the manifests of an autoscaled Deployment).
    assert "replicas" not in deployment["spec"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert _objects("PodDisruptionBudget", kustomization)[0]["spec"]["selector"]["matchLabels"] == selector
    assert _objects("Service", kustomization)[0]["spec"]["selector"] == selector
    policy = _objects("NetworkPolicy", kustomization)[0]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert ingress_ports == {8080, 8082}
    # Labels reach the pods through `labels` (includeTemplates), selectors are left alone.
    assert (
        pod and deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "metarec"
    )
    assert "app.kubernetes.io/part-of" not in selector


@pytest.mark.parametrize("kustomization", ["serving/overlays/gke-cpu", "serving/overlays/gke-gpu"])
def test_torchserve_config(kustomization):
    config_map = next(
        c
        for c in _objects("ConfigMap", kustomization)
        if c["metadata"]["name"].startswith("metarec-serving-config")
    )
    properties = _properties(config_map["data"]["config.properties"])
    assert properties["inference_address"] == "http://0.0.0.0:8080"
    # REST management on a Unix socket (no TCP peer reaches it), see metarec.torchserve_config.
    assert properties["management_address"].startswith("unix:")
    assert properties["metrics_address"] == "http://0.0.0.0:8082"
    assert properties["metrics_mode"] == "prometheus"
    assert properties["enable_model_api"] == "false"
    # Probes call /ping without a token: authorisation is disabled on purpose (see the comment in the file).
    assert properties["disable_token_authorization"] == "true"
    # No URL may be registered at all (the init container fetches the model, not TorchServe).
    assert properties["allowed_urls"] == "^$"
    deployment = _objects("Deployment", kustomization)[0]
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert properties["model_store"].startswith(mounts["/home/model-server/archive"]["mountPath"])
    volume = next(
        v for v in pod["volumes"] if v["name"] == mounts["/home/model-server/config.properties"]["name"]
    )
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    init_mounts = {m["mountPath"] for m in pod["initContainers"][0]["volumeMounts"]}
    assert "/home/model-server/archive" in init_mounts


def test_gpu_overlay_targets_gpu_nodes():
    pod = _objects("Deployment", "serving/overlays/gke-gpu")[0]["spec"]["template"]["spec"]
    assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    server = next(c for c in pod["containers"] if c["name"] == "torchserve")
    assert int(server["resources"]["limits"]["nvidia.com/gpu"]) == 1
    cpu_pod = _objects("Deployment", "serving/overlays/gke-cpu")[0]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert "cloud.google.com/gke-accelerator" not in cpu_pod.get("nodeSelector", {})


# ----------------------------------------------------------------------------------------------
# Custom resources


# KServe's defaulting webhook rewrites these shorthand predictors into `model:` on every create and update
# (kserve/kserve pkg/apis/serving/v1beta1/inference_service_defaults.go, setPredictorModelDefaults).
KSERVE_SHORTHANDS = ("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
                     "lightgbm", "paddle")  # fmt: skip


def kserve_container(isvc: dict, runtimes: list[dict]) -> dict:
    """The predictor container KServe runs: the named runtime's ``kserve-container`` overlaid with the
    InferenceService's ``model`` fields, except ``args``, which KServe concatenates, runtime's first
    (MergeRuntimeContainers in kserve/kserve pkg/controller/v1beta1/inferenceservice/utils/utils.go).

    Args:
        isvc: A rendered InferenceService.
        runtimes: The rendered ServingRuntimes it may name.

    Returns:
        The merged container (``{}`` when the runtime is missing).
    """
    model = dict((isvc.get("spec") or {}).get("predictor", {}).get("model") or {})
    runtime = next((r for r in runtimes if r["metadata"]["name"] == model.get("runtime")), None)
    if runtime is None:
        return {}
    base = next((c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"), {})
    fields = {
        k: v for k, v in model.items() if k not in ("modelFormat", "runtime", "protocolVersion", "storageUri")
    }
    return {**base, **fields, "args": list(base.get("args") or []) + list(model.get("args") or [])}


def inference_service_problems(isvc: dict, runtimes: list[dict] | None = None) -> list[str]:
    """Lists what an InferenceService lacks of the fields MetaRec relies on.

    Args:
        isvc: A rendered InferenceService.
        runtimes: The rendered ServingRuntimes of its overlay.

    Returns:
        Problems; empty when the object is as expected.
    """
    problems = []
    if (isvc.get("apiVersion"), isvc.get("kind")) != ("serving.kserve.io/v1beta1", "InferenceService"):
        problems.append(f"apiVersion/kind {isvc.get('apiVersion')}/{isvc.get('kind')}")
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    shorthands = [k for k in KSERVE_SHORTHANDS if k in predictor]
    if shorthands:
        # The live object would have `model:` instead; an apply of this manifest would replace it whole.
        problems.append(f"predictor.{shorthands[0]} is a shorthand KServe rewrites into predictor.model")
    model = predictor.get("model") or {}
    if not model:
        problems.append("no predictor.model")
    if (model.get("modelFormat") or {}).get("name") != "pytorch":
        problems.append("predictor.model.modelFormat.name is not pytorch")
    runtime = next((r for r in runtimes or [] if r["metadata"]["name"] == model.get("runtime")), None)
    if runtime is None:
        problems.append(
            f"predictor.model.runtime {model.get('runtime')!r} is not a ServingRuntime of the overlay"
        )
    else:
        formats = {f.get("name") for f in runtime["spec"].get("supportedModelFormats") or []}
        if "pytorch" not in formats or "v1" not in (runtime["spec"].get("protocolVersions") or []):
            problems.append(f"ServingRuntime {model.get('runtime')} does not serve pytorch over protocol v1")
    # deploy_model sets storageUri; a manifest naming one would roll serving back on every apply.
    if "storageUri" in model:
        problems.append(f"predictor.model.storageUri is in the manifest: {model['storageUri']}")
    if model.get("protocolVersion") != "v1":
        problems.append(f"predictor.model.protocolVersion is {model.get('protocolVersion')}, not v1")
    if not predictor.get("serviceAccountName"):
        problems.append("predictor.serviceAccountName is missing")
    resources = model.get("resources") or {}
    if not (resources.get("requests") and resources.get("limits")):
        problems.append("predictor.model.resources needs requests and limits")
    container = kserve_container(isvc, runtimes or []) or model
    args = container.get("args") or []
    line = (container.get("command") or []) + args
    if line.count("torchserve") != 1 or len([a for a in line if a == "--start"]) != 1:
        problems.append(f"the predictor container does not run one torchserve command line: {line}")
    if "--model-store=/mnt/models/model-store" not in args:
        problems.append("torchserve must read the archives KServe copied to /mnt/models/model-store")
    config_arg = next((a for a in args if a.startswith("--ts-config=")), "")
    config_dir = str(Path(config_arg.partition("=")[2]).parent)
    volumes = {v["name"]: v for v in predictor.get("volumes") or []}
    mounts = [m for m in container.get("volumeMounts") or [] if m.get("mountPath") == config_dir]
    if not mounts or "configMap" not in volumes.get(mounts[0]["name"], {}):
        problems.append(f"--ts-config {config_arg!r} is not in a mounted ConfigMap")
    return problems


def pytorchjob_problems(job: dict) -> list[str]:
    """Lists what a PyTorchJob lacks of the fields MetaRec relies on.

    Args:
        job: A rendered PyTorchJob.

    Returns:
        Problems; empty when the object is as expected.
    """
    problems = []
    if (job.get("apiVersion"), job.get("kind")) != ("kubeflow.org/v1", "PyTorchJob"):
        problems.append(f"apiVersion/kind {job.get('apiVersion')}/{job.get('kind')}")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if set(replicas) != {"Master", "Worker"}:
        problems.append(f"replica specs are {sorted(replicas)}, expected Master and Worker")
    if replicas.get("Master", {}).get("replicas") != 1:
        problems.append("exactly one Master replica is needed")
    nproc = str(spec.get("nprocPerNode", ""))
    if not nproc.isdigit() or int(nproc) < 1:
        problems.append(f"nprocPerNode must be a positive count (a string), got {spec.get('nprocPerNode')!r}")
    for role, replica in replicas.items():
        if replica.get("restartPolicy") != "OnFailure":
            problems.append(f"{role}: restartPolicy is not OnFailure")
        pod = (replica.get("template") or {}).get("spec") or {}
        containers = {c.get("name"): c for c in pod.get("containers") or []}
        container = containers.get("pytorch")
        if container is None:
            problems.append(f"{role}: no container named pytorch")
            continue
        command = container.get("command") or []
        joined = " ".join(command)
        if not command or command[0] != "torchrun" or "metarec.training" not in command:
            problems.append(f"{role}: command is not torchrun -m metarec.training: {joined}")
        for flag in ("--preprocessed", "--method", "--output"):
            if flag not in command:
                problems.append(f"{role}: {flag} is missing")
            elif flag != "--method" and not command[command.index(flag) + 1].startswith("gs://"):
                problems.append(f"{role}: {flag} is not a gs:// URI")
        limits = (container.get("resources") or {}).get("limits") or {}
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if gpus < 1:
            problems.append(f"{role}: no nvidia.com/gpu limit")
        elif nproc.isdigit() and gpus != int(nproc):
            problems.append(f"{role}: {gpus} GPUs but nprocPerNode {nproc}")
        if "cloud.google.com/gke-accelerator" not in (pod.get("nodeSelector") or {}):
            problems.append(f"{role}: no GPU node selector")
        if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or []):
            problems.append(f"{role}: no toleration for the nvidia.com/gpu taint")
        if not pod.get("serviceAccountName"):
            problems.append(f"{role}: no serviceAccountName (Workload Identity)")
    return problems


def test_inference_service():
    objects = render("serving/overlays/kserve")
    isvc = next(obj for obj in objects if obj["kind"] == "InferenceService")
    runtimes = [obj for obj in objects if obj["kind"] == "ServingRuntime"]
    assert inference_service_problems(isvc, runtimes) == []
    account = next(obj for obj in objects if obj["kind"] == "ServiceAccount")
    assert isvc["spec"]["predictor"]["serviceAccountName"] == account["metadata"]["name"]
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
    # The generated ConfigMap's hashed name reaches the custom resource (kustomizeconfig.yaml).
    config_map = next(obj for obj in objects if obj["kind"] == "ConfigMap")
    volume_names = [v["configMap"]["name"] for v in isvc["spec"]["predictor"]["volumes"] if "configMap" in v]
    assert volume_names == [config_map["metadata"]["name"]]
    properties = _properties(config_map["data"]["config.properties"])
    assert properties["inference_address"] == "http://0.0.0.0:8080"  # KServe's container port
    assert properties["management_address"].startswith("unix:")
    assert properties["model_store"] == "/mnt/models/model-store"
    assert properties["disable_token_authorization"] == "true" and properties["enable_model_api"] == "false"
    assert properties["allowed_urls"] == "^$"  # KServe's storage initializer fetches the model
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["model"]["storageUri"] = "s3://bucket/model"
    broken["spec"]["predictor"]["model"]["protocolVersion"] = "v2"
    broken["spec"]["predictor"]["volumes"] = [
        v for v in broken["spec"]["predictor"]["volumes"] if "configMap" not in v
    ]
    assert len(inference_service_problems(broken, runtimes)) == 3


def test_inference_service_is_stored_as_shipped_and_runs_one_torchserve():
    """KServe stores a ``pytorch:`` predictor as ``model:`` (its webhook, on every update too) and runs
    the stock kserve-torchserve runtime's args before the predictor's: the shipped predictor was
    ``pytorch:`` with its own torchserve args, so the server got two command lines, and an apply after
    deploy_model replaced the live ``model:`` and its storageUri."""
    objects = render("serving/overlays/kserve")
    isvc = next(obj for obj in objects if obj["kind"] == "InferenceService")
    runtimes = [obj for obj in objects if obj["kind"] == "ServingRuntime"]
    shorthand = copy.deepcopy(isvc)
    model = shorthand["spec"]["predictor"].pop("model")
    for key in ("modelFormat", "runtime"):
        model.pop(key)
    shorthand["spec"]["predictor"]["pytorch"] = model
    assert any("shorthand" in p for p in inference_service_problems(shorthand, runtimes))
    # With the stock runtime's args (kserve/kserve config/runtimes/kserve-torchserve.yaml) in front.
    stock = {"metadata": {"name": "kserve-torchserve"}, "spec": {
        "supportedModelFormats": [{"name": "pytorch", "version": "1", "autoSelect": True}],
        "protocolVersions": ["v1", "v2"],
        "containers": [{"name": "kserve-container", "image": "pytorch/torchserve-kfs:0.12.0",
                        "args": ["torchserve", "--start", "--model-store=/mnt/models/model-store",
                                 "--ts-config=/mnt/models/config/config.properties"]}]}}  # fmt: skip
    on_stock = copy.deepcopy(isvc)
    on_stock["spec"]["predictor"]["model"]["runtime"] = "kserve-torchserve"
    assert any("one torchserve" in p for p in inference_service_problems(on_stock, [stock]))
    container = kserve_container(isvc, runtimes)
    assert container["args"] == isvc["spec"]["predictor"]["model"]["args"]
    assert container["image"] == isvc["spec"]["predictor"]["model"]["image"]


def test_pytorchjob():
    objects = render("training-example")
    job = next(obj for obj in objects if obj["kind"] == "PyTorchJob")
    assert pytorchjob_problems(job) == []
    account = next(obj for obj in objects if obj["kind"] == "ServiceAccount")
    assert {
        r["template"]["spec"]["serviceAccountName"] for r in job["spec"]["pytorchReplicaSpecs"].values()
    } == {account["metadata"]["name"]}
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
    # Every pod fits a node of the GPU pool docs/cluster.md creates, with one process per GPU.
    per_node = int(
        re.search(r"--accelerator type=[^,]+,count=(\d+)", (REPO_ROOT / "docs/cluster.md").read_text())[1]
    )
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        limits = replica["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == int(job["spec"]["nprocPerNode"]) <= per_node
    broken = copy.deepcopy(job)
    worker = broken["spec"]["pytorchReplicaSpecs"]["Worker"]
    worker["restartPolicy"] = "Never"
    worker["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    worker["template"]["spec"]["containers"][0]["command"][0] = "python"
    assert len(pytorchjob_problems(broken)) == 3


# ----------------------------------------------------------------------------------------------
# The rendered TorchServe config, run for real


PROBE_HANDLER = """
from ts.torch_handler.base_handler import BaseHandler


class ProbeHandler(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        return [{"ok": True} for _ in data]
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(method: str, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.slow
def test_rendered_torchserve_config_serves_probes_without_token(tmp_path):
    """Starts TorchServe exactly as the image's CMD does, with the ConfigMap's config.properties (only the
    listen addresses moved to free loopback ports and the model store to a temporary folder): /ping answers
    without a token (what the kubelet's probes need), the model in the store is loaded, model registration
    over HTTP is refused and Prometheus metrics are served."""
    import os
    import signal
    import sys
    import time

    bin_dir = Path(sys.executable).parent
    torchserve, archiver = bin_dir / "torchserve", bin_dir / "torch-model-archiver"
    if not (torchserve.exists() and archiver.exists() and shutil.which("java")):
        pytest.skip("TorchServe, torch-model-archiver or Java is not installed")
    config_map = next(
        c
        for c in _objects("ConfigMap", "serving/overlays/gke-cpu")
        if c["metadata"]["name"].startswith("metarec-serving-config")
    )
    properties = _properties(config_map["data"]["config.properties"])
    ports = {name: _free_port() for name in ("inference", "metrics")}
    store, work = tmp_path / "model-store", tmp_path / "work"
    for folder in (store, work / "tmp", work / "logs"):
        folder.mkdir(parents=True)
    (tmp_path / "probe_handler.py").write_text(PROBE_HANDLER)
    subprocess.run(
        [
            str(archiver),
            "--model-name",
            "probe",
            "--version",
            "1.0",
            "--handler",
            str(tmp_path / "probe_handler.py"),
        ]
        + ["--export-path", str(store)],
        check=True,
        timeout=120,
    )
    for name, port in ports.items():
        properties[f"{name}_address"] = f"http://127.0.0.1:{port}"
    properties["model_store"] = str(store)
    properties["management_address"] = f"unix:{work / 'tmp' / 'management.sock'}"
    properties["default_workers_per_model"] = "1"
    config = tmp_path / "config.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    env = dict(os.environ, TMPDIR=str(work / "tmp"), TEMP=str(work / "tmp"), LOG_LOCATION=str(work / "logs"))
    env["METRICS_LOCATION"] = str(work / "logs")
    server = subprocess.Popen(
        [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # own process group: stopping it also stops the Java frontend
    )
    inference = f"http://127.0.0.1:{ports['inference']}"
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status, body = _http("GET", f"{inference}/ping")
                if status == 200 and b"Healthy" in body:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert status == 200, f"/ping without a token answered {status} (TorchServe exited: {server.poll()})"
        assert _http("POST", f"{inference}/predictions/probe", timeout=30) == (200, b'{\n  "ok": true\n}')
        registration = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(work / "tmp" / "management.sock"),
             "-X", "POST", "http://localhost/models?url=https://example.com/evil.mar"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert int(registration.stdout) >= 400, registration
        assert _http("GET", f"http://127.0.0.1:{ports['metrics']}/metrics")[0] == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        _wait_for_exit(work / "tmp" / ".model_server.pid")


def _wait_for_exit(pid_file: Path, timeout_s: float = 30.0) -> None:
    """Waits until the Java frontend named in TorchServe's pid file has exited (SIGKILL after the time-out).

    Args:
        pid_file: ``.model_server.pid`` in the server's private temporary folder.
        timeout_s: How long to wait for the process to end after the SIGTERM.
    """
    import os
    import signal
    import time

    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text().strip())
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + timeout_s
    while status.exists() and "\tZ " not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    if status.exists() and "\tZ " not in status.read_text():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("gpus_per_node", [0, 2])
def test_pytorchjob_submitted_by_the_pipeline_meets_the_hardening_baseline(gpus_per_node):
    """The meta_train_pytorchjob component builds its job in code, outside kustomize: same baseline."""
    from metarec.components.meta_train_pytorchjob import pytorchjob

    job = pytorchjob.build_pytorchjob(
        name="metarec-maml-test", namespace="team", image="registry/metarec-components:1", method="maml",
        preprocessed_uri="gs://bucket/pre", output_uri="gs://bucket/model", num_nodes=2,
        gpus_per_node=gpus_per_node,
    )  # fmt: skip
    problems = [p for where, spec in pod_specs(job) for p in hardening_problems(spec, where)]
    assert problems == []
