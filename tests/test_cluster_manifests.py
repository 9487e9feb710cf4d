"""The cluster-side manifests the pipeline relies on: RBAC for its steps, the training identity in the
run's namespace, drains that a single replica cannot block, and the Managed Prometheus scrape."""

from __future__ import annotations

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
        labels, containers = predictor["labels"], [predictor["pytorch"]]
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
