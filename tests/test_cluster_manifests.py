"""The cluster-side manifests the pipeline relies on: RBAC for its steps, the training identity in the
run's namespace, drains that a single replica cannot block, and the Managed Prometheus scrape."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def render(kustomization: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render the manifests")
    done = subprocess.run([kubectl, "kustomize", str(MANIFESTS / kustomization)], capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def _one(objects: list[dict], kind: str) -> dict:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def test_pipeline_role_grants_every_call_the_steps_make():
    objects = render("pipeline-rbac")
    role, binding = _one(objects, "Role"), _one(objects, "RoleBinding")
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}  # fmt: skip
    # meta_train_pytorchjob: create, read, adopt (replace) and delete; deploy_model: read and patch.
    assert {"create", "get", "update", "delete"} <= granted[("kubeflow.org", "pytorchjobs")]
    assert {"get", "patch"} <= granted[("serving.kserve.io", "inferenceservices")]
    assert {"get", "patch"} <= granted[("apps", "deployments")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert "default-editor" in {subject["name"] for subject in binding["subjects"]}


def test_pipeline_rbac_binds_the_runners_of_the_namespace_it_is_moved_to(tmp_path):
    # What `kustomize edit set namespace $NS` does, as an overlay: every object and every subject must
    # end up in $NS. A subject without a namespace means the binding's own (the RBAC authorizer's rule);
    # kustomize never rewrites an explicit one, which bound another profile's accounts.
    shutil.copytree(MANIFESTS / "pipeline-rbac", tmp_path / "pipeline-rbac")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text("namespace: team-a\nresources:\n  - ../pipeline-rbac\n")
    objects = render(str(overlay))
    role, binding = _one(objects, "Role"), _one(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"
    bound = {subject.get("namespace", binding["metadata"]["namespace"]) for subject in binding["subjects"]}
    assert bound == {"team-a"}


def test_training_identity_is_created_where_the_runs_are():
    account = _one(render("training"), "ServiceAccount")
    assert account["metadata"]["name"] == "metarec-training"
    assert "namespace" not in account["metadata"], "pinned to one namespace: jobs in a profile would lack it"
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert not [obj for obj in render("training") if obj["kind"] == "PyTorchJob"], (
        "no job with placeholder URIs"
    )


@pytest.mark.parametrize("overlay", ["serving/overlays/gke-cpu", "serving/overlays/gke-gpu"])
def test_a_single_replica_cannot_block_a_node_drain(overlay):
    objects = render(overlay)
    budget, autoscaler = _one(objects, "PodDisruptionBudget"), _one(objects, "HorizontalPodAutoscaler")
    spec = budget["spec"]
    if "minAvailable" in spec:
        assert int(spec["minAvailable"]) < autoscaler["spec"]["minReplicas"]
    else:
        assert int(spec["maxUnavailable"]) >= 1


def _metrics_port(objects: list[dict]) -> int:
    """The port TorchServe's metrics API listens on, from the rendered ConfigMap's config.properties."""
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and "config.properties" in o.get("data", {})]
    (line,) = [
        x for x in config["data"]["config.properties"].splitlines() if x.startswith("metrics_address=")
    ]
    return int(line.rsplit(":", 1)[1])


@pytest.mark.parametrize("kustomization", ["serving/overlays/gke-cpu", "serving/overlays/kserve"])
def test_podmonitoring_scrapes_the_serving_metrics_port(kustomization):
    """Both serving variants are scraped: the endpoint is the metrics port by number, or a port name the
    pods declare (the KServe predictor declares only http1, so `port: metrics` scraped none of its pods)."""
    monitor = _one(render("monitoring"), "PodMonitoring")
    objects = render(kustomization)
    if kustomization.endswith("kserve"):
        predictor = _one(objects, "InferenceService")["spec"]["predictor"]
        labels, containers = predictor["labels"], [predictor["model"]]
    else:
        template = _one(objects, "Deployment")["spec"]["template"]
        labels, containers = template["metadata"]["labels"], template["spec"]["containers"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    declared = {port.get("name"): port["containerPort"] for c in containers for port in c.get("ports", [])}
    metrics_port = _metrics_port(objects)
    for endpoint in monitor["spec"]["endpoints"]:
        port = endpoint["port"]
        assert (declared.get(port) if isinstance(port, str) else port) == metrics_port, (port, declared)


def test_cluster_guide_applies_with_n_only_what_renders_without_a_namespace():
    # `kubectl apply -n NS -k DIR` refuses objects that name another namespace ("the namespace from the
    # provided object ... does not match"): every such command in docs/cluster.md must render none.
    import re

    guide = (MANIFESTS.parent / "docs" / "cluster.md").read_text()
    targets = re.findall(r"kubectl apply -n \S+ -k manifests/(\S+)", guide)
    assert targets, "the guide applies nothing with -n: update this test"
    for target in targets:
        pinned = [obj["metadata"]["name"] for obj in render(target) if obj["metadata"].get("namespace")]
        assert not pinned, f"manifests/{target} pins a namespace on {pinned}: `-n` would be refused"


# A stand-in for `kubectl` that runs the guide's commands against local files instead of a cluster: `get`
# answers from the objects in $KUBE_STATE (via `kubectl patch --local`, which evaluates jsonpath), `patch`
# rewrites them the way the API server's strategic merge would, anything else is only logged in order.
_KUBECTL_SHIM = """#!/usr/bin/env python3
import os, subprocess, sys
state, real = os.environ["KUBE_STATE"], os.environ["REAL_KUBECTL"]
args = sys.argv[1:]
with open(os.path.join(state, "log"), "a") as log:
    log.write(" ".join(args) + "\\n")
if "-n" in args:
    i = args.index("-n"); args = args[:i] + args[i + 2:]
verb, rest = args[0], args[1:]
def local(kind, name, extra):
    path = os.path.join(state, f"{kind}-{name}.yaml")
    if not os.path.exists(path):
        sys.exit(f"Error from server (NotFound): {kind} {name!r} not found")
    return [real, "patch", "--local", "-f", path] + extra
if verb == "get":
    kind, flags = rest[0], [a for a in rest[1:] if a.startswith("-o") or a.startswith("jsonpath")]
    names = [a for a in rest[1:] if not a.startswith("-o") and not a.startswith("jsonpath")]
    (jsonpath,) = [a.split("=", 1)[1] for a in rest if a.startswith("jsonpath=")] or [None]
    query = ["--type", "merge", "-p", "{}", "-o", f"jsonpath={jsonpath}"]
    out = subprocess.run(local(kind, names[0], query), check=True, capture_output=True, text=True).stdout
    sys.stdout.write(out)
elif verb == "patch":
    kind, name, patch = rest[0], rest[1], rest[rest.index("-p") + 1]
    kind_of_patch = ["--type", rest[rest.index("--type") + 1]] if "--type" in rest else []
    out = subprocess.run(local(kind, name, ["-p", patch, "-o", "yaml"] + kind_of_patch), check=True,
                         capture_output=True, text=True).stdout
    open(os.path.join(state, f"{kind}-{name}.yaml"), "w").write(out)
"""


def _guide_block(start: str) -> str:
    """The commands of docs/cluster.md's code block from the line starting with ``start`` to its end."""
    guide = (MANIFESTS.parent / "docs" / "cluster.md").read_text()
    head = guide.index("\n" + start) + 1
    return guide[head : guide.index("```", head)]


@pytest.mark.parametrize("deployed_by", ["configmap", "old-deploy-model"])
def test_documented_deployment_migration_keeps_the_version_and_the_pod_count(tmp_path, deployed_by):
    """The guide's migration of a Deployment from the older manifests (MODEL_URI from the generated
    ConfigMap, or the literal value the older deploy_model wrote; ``replicas: 2`` in its last-applied
    configuration), run as written: the version it serves ends up in the annotation the current template
    reads, and the replicas line leaves the last-applied configuration before the apply (else that apply
    drops the pod count to 1)."""
    current = _one(render("serving/overlays/gke-cpu"), "Deployment")
    old = copy.deepcopy(current)
    (fetch,) = [c for c in old["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-model"]
    served = "gs://models/metarec/run-7"
    if deployed_by == "configmap":
        fetch["env"] = [{"name": "MODEL_URI", "valueFrom": {"configMapKeyRef": {
            "name": "metarec-serving-env-abc", "key": "MODEL_URI"}}}]  # fmt: skip
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"MODEL_URI": served},
                     "metadata": {"name": "metarec-serving-env-abc", "namespace": "metarec"}}  # fmt: skip
        (tmp_path / "configmap-metarec-serving-env-abc.yaml").write_text(yaml.safe_dump(configmap))
    else:
        fetch["env"] = [{"name": "MODEL_URI", "value": served}]
    (tmp_path / "deployment-metarec-serving.yaml").write_text(yaml.safe_dump(old))
    done = _run_with_shim(tmp_path, "set -e\n" + _guide_block("OVERLAY=manifests/serving/overlays/gke-cpu"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == served
    migrated = yaml.safe_load((tmp_path / "deployment-metarec-serving.yaml").read_text())
    template = migrated["spec"]["template"]
    assert template["metadata"]["annotations"]["metarec.io/model-uri"] == served
    (migrated_fetch,) = [c for c in template["spec"]["initContainers"] if c["name"] == "fetch-model"]
    (wanted,) = [
        c for c in current["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-model"
    ]
    assert migrated_fetch["env"] == wanted["env"]
    calls = (tmp_path / "log").read_text().splitlines()
    applies = [i for i, call in enumerate(calls) if call.startswith("apply -k")]
    edits = [i for i, call in enumerate(calls) if "edit-last-applied deployment/metarec-serving" in call]
    assert applies and edits and max(edits) < min(applies), calls
    assert [calls[i] for i in applies] == ["apply -k manifests/serving/overlays/gke-cpu"], (
        "the migration re-applies the installed overlay, named once"
    )


def _run_with_shim(tmp_path: Path, block: str) -> subprocess.CompletedProcess:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    shim = tmp_path / "bin" / "kubectl"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(_KUBECTL_SHIM)
    shim.chmod(0o755)
    env = {"PATH": f"{shim.parent}:/usr/bin:/bin", "KUBE_STATE": str(tmp_path), "REAL_KUBECTL": kubectl,
           "SERVING_NS": "metarec"}  # fmt: skip
    return subprocess.run(["bash", "-uo", "pipefail", "-c", block], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize("previous", [None, "gs://models/metarec/run-6"])
def test_documented_kserve_rollback_swaps_versions_and_never_empties_storage_uri(tmp_path, previous):
    """docs/cluster.md step 9 (KServe), run as written: with a recorded previous version it swaps the
    two; without one (only one version ever deployed: deploy_model records none) it must not set an empty
    storageUri, which would leave the predictor with no model."""
    isvc = _one(render("serving/overlays/kserve"), "InferenceService")
    isvc["spec"]["predictor"]["model"]["storageUri"] = "gs://models/metarec/run-7"
    if previous:
        isvc["metadata"].setdefault("annotations", {})["metarec.io/previous-model-uri"] = previous
    path = tmp_path / "inferenceservice-metarec.yaml"
    path.write_text(yaml.safe_dump(isvc))
    _run_with_shim(tmp_path, _guide_block("PREV=$(kubectl -n $SERVING_NS get inferenceservice metarec"))
    after = yaml.safe_load(path.read_text())
    annotations = after["metadata"].get("annotations") or {}
    if previous:
        assert after["spec"]["predictor"]["model"]["storageUri"] == previous
        assert annotations["metarec.io/previous-model-uri"] == "gs://models/metarec/run-7"
    else:
        assert after["spec"]["predictor"]["model"]["storageUri"] == "gs://models/metarec/run-7"
