"""deploy_model against a fake Kubernetes API server: canary rollout, promotion and rollback for a KServe
InferenceService and for the plain Deployment, on the repository's own serving manifests."""

import json

import pytest
import yaml
from fake_kube import (
    DEPLOYMENTS,
    INFERENCESERVICES,
    KSERVE_SOURCE_URI,
    client_side_apply,
    kserve_raw_controller,
    raw_predictor_deployment,
    three_way_patch,
)

from metarec.components.deploy_model import deploy

NEW, OLD, BROKEN = "gs://models/metarec/run-2", "gs://models/metarec/run-1", "gs://models/metarec/broken"
ISVCS, DEPS = INFERENCESERVICES.format(namespace="serving"), DEPLOYMENTS.format(namespace="serving")


def _controller(fake, collection, obj):
    """KServe and the Deployment controller, reduced to: a model URI with "broken" never becomes ready."""
    generation = obj["metadata"]["generation"]
    if collection == ISVCS:
        uri = obj["spec"]["predictor"]["model"]["storageUri"]
        revision = f"metarec-predictor-{generation:05d}"
        ready = "broken" not in uri
        obj["status"] = {
            "observedGeneration": generation,
            "conditions": [{"type": "Ready", "status": str(ready),
                            **({} if ready else {"reason": "RevisionFailed"})}],
            "components": {"predictor": {"latestCreatedRevision": revision,
                                         "latestReadyRevision": revision if ready else "metarec-predictor-00001"}},
        }  # fmt: skip
    elif collection == DEPS:
        uri = (obj["spec"]["template"]["metadata"].get("annotations") or {}).get(deploy.MODEL_ANNOTATION, "")
        replicas = obj["spec"].get("replicas", 1)
        healthy = "broken" not in uri
        obj["status"] = {"observedGeneration": generation, "replicas": replicas,
                         "updatedReplicas": replicas if healthy else 0, "availableReplicas": replicas if healthy else 0,
                         "conditions": [] if healthy else [{"type": "Progressing", "status": "False",
                                                             "reason": "ProgressDeadlineExceeded"}]}  # fmt: skip


@pytest.fixture()
def serving(kube, repo_root):
    """The shipped InferenceService (made Serverless) and Deployment, on version OLD, in ``serving``."""
    kube.controller = _controller
    isvc = yaml.safe_load((repo_root / "manifests/serving/overlays/kserve/inferenceservice.yaml").read_text())
    isvc["metadata"]["annotations"].pop(deploy.MODE_ANNOTATION)
    isvc["metadata"]["namespace"] = "serving"
    isvc["spec"]["predictor"]["model"]["storageUri"] = OLD
    kube.put(ISVCS, isvc)
    deployment = _shipped_deployment(repo_root)
    deployment["spec"]["template"]["metadata"]["annotations"][deploy.MODEL_ANNOTATION] = OLD
    kube.put(DEPS, deployment)
    return kube


def _shipped_deployment(repo_root) -> dict:
    deployment = yaml.safe_load((repo_root / "manifests/serving/base/deployment.yaml").read_text())
    deployment["metadata"]["namespace"] = "serving"
    # The live object always has a pod count: the manifest leaves it to the HPA (minReplicas 2).
    deployment["spec"]["replicas"] = 2
    return deployment


def _older_deployment(repo_root) -> dict:
    """The Deployment as the manifests before the annotation scheme had it: MODEL_URI from a ConfigMap."""
    older = _shipped_deployment(repo_root)
    (init,) = older["spec"]["template"]["spec"]["initContainers"]
    init["env"] = [{"name": "MODEL_URI", "valueFrom": {"configMapKeyRef": {"name": "metarec-serving-env",
                                                                           "key": "MODEL_URI"}}}]  # fmt: skip
    return older


def _custom():
    from metarec.components.kube import custom_objects_api

    return custom_objects_api()


def _apps():
    from metarec.components.kube import apps_api

    return apps_api()


def _no_wait(_seconds):
    pass


def test_inferenceservice_rolls_out_with_a_canary_then_promotes(serving):
    # What each write left in the predictor spec (the controller sees every write): the counting of
    # PATCH requests alone passed with no canary ever set.
    seen = []

    def recording(fake, collection, obj):
        if collection == ISVCS:
            predictor = obj["spec"]["predictor"]
            seen.append((predictor["model"]["storageUri"], predictor.get("canaryTrafficPercent")))
        _controller(fake, collection, obj)

    serving.controller = recording
    result = deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, canary_percent=20,
                                            poll_s=0, sleep=_no_wait)  # fmt: skip
    assert result["outcome"] == "promoted" and result["previous_uri"] == OLD
    patches = [entry for entry in serving.log if entry[0] == "PATCH"]
    assert len(patches) == 2  # the canary rollout, then the promotion
    assert seen == [(NEW, 20), (NEW, None)]  # 20 % on the new revision first, then all of it
    predictor = serving.get(ISVCS, "metarec")["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == NEW
    assert "canaryTrafficPercent" not in predictor  # all traffic on the new revision


def test_inferenceservice_rolls_back_when_the_new_revision_fails(serving):
    with pytest.raises(deploy.DeployError, match="rolled back to gs://models/metarec/run-1"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", BROKEN, poll_s=0, sleep=_no_wait)
    predictor = serving.get(ISVCS, "metarec")["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == OLD
    assert "canaryTrafficPercent" not in predictor


def test_inferenceservice_rolls_back_on_timeout(serving):
    serving.controller = None  # nothing ever reports the new revision
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(deploy.DeployError, match="timeout"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, timeout_s=30, poll_s=10,
                                       sleep=sleep, clock=lambda: now[0])  # fmt: skip
    assert serving.get(ISVCS, "metarec")["spec"]["predictor"]["model"]["storageUri"] == OLD


def test_same_version_is_left_alone(serving):
    result = deploy.deploy_inferenceservice(_custom(), "metarec", "serving", OLD, sleep=_no_wait)
    assert result["outcome"] == "unchanged"
    assert not [entry for entry in serving.log if entry[0] in ("PATCH", "PUT")]


def _deployed_uri(kube) -> str | None:
    template = kube.get(DEPS, "metarec-serving")["spec"]["template"]
    return (template["metadata"].get("annotations") or {}).get(deploy.MODEL_ANNOTATION)


def test_deployment_rolls_to_the_new_version(serving):
    result = deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert result == {"target": "Deployment serving/metarec-serving", "previous_uri": OLD, "model_uri": NEW,
                      "outcome": "promoted"}  # fmt: skip
    assert _deployed_uri(serving) == NEW
    # `kubectl rollout history` shows each revision's change-cause: here, the model it serves.
    assert serving.get(DEPS, "metarec-serving")["metadata"]["annotations"][deploy.CHANGE_CAUSE].endswith(NEW)
    assert [q for q in serving.queries if q] == ["fieldManager=metarec-deploy-model"]


def test_deployment_rolls_back_when_the_rollout_fails(serving):
    with pytest.raises(deploy.DeployError, match="rolled back to gs://models/metarec/run-1"):
        deploy.deploy_deployment(_apps(), "metarec-serving", "serving", BROKEN, poll_s=0, sleep=_no_wait)
    assert _deployed_uri(serving) == OLD
    assert deploy.CHANGE_CAUSE not in (
        serving.get(DEPS, "metarec-serving")["metadata"].get("annotations") or {}
    )


def _recording(api, method: str, body_at: int) -> list[tuple[dict, dict]]:
    """Wraps ``api.<method>`` to record each call's (body, keyword arguments) before sending it."""
    calls, send = [], getattr(api, method)

    def record(*args, **kwargs):
        calls.append((args[body_at], kwargs))
        return send(*args, **kwargs)

    setattr(api, method, record)
    return calls


def test_deploy_writes_only_the_version_fields_as_its_own_field_manager(serving):
    """Each patch names the model version (and its bookkeeping annotations) and nothing else, as field
    manager metarec-deploy-model: any other field it wrote would become one an apply fights over."""
    custom = _custom()
    isvc_calls = _recording(custom, "patch_namespaced_custom_object", 5)
    deploy.deploy_inferenceservice(
        custom, "metarec", "serving", NEW, canary_percent=20, poll_s=0, sleep=_no_wait
    )
    owner = {"field_manager": deploy.FIELD_MANAGER}
    assert isvc_calls == [
        ({"metadata": {"annotations": {deploy.PREVIOUS_ANNOTATION: OLD}},
          "spec": {"predictor": {"model": {"storageUri": NEW}, "canaryTrafficPercent": 20}}}, owner),
        ({"spec": {"predictor": {"canaryTrafficPercent": None}}}, owner),
    ]  # fmt: skip
    apps = _apps()
    deployment_calls = _recording(apps, "patch_namespaced_deployment", 2)
    deploy.deploy_deployment(apps, "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert deployment_calls == [
        ({"metadata": {"annotations": {deploy.CHANGE_CAUSE: f"deploy_model: MODEL_URI={NEW}"}},
          "spec": {"template": {"metadata": {"annotations": {deploy.MODEL_ANNOTATION: NEW}}}}}, owner),
    ]  # fmt: skip


def test_a_rollback_restores_the_bookkeeping_of_the_version_it_returns_to(serving):
    """After a failed rollout the annotations describe the restored version again: the InferenceService's
    previous-model-uri names the version before it (the documented rollback target), the Deployment's
    change-cause names the restored model (kubectl rollout history)."""
    deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, poll_s=0, sleep=_no_wait)
    with pytest.raises(deploy.DeployError, match="rolled back to gs://models/metarec/run-2"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", BROKEN, poll_s=0, sleep=_no_wait)
    isvc = serving.get(ISVCS, "metarec")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == NEW
    assert isvc["metadata"]["annotations"][deploy.PREVIOUS_ANNOTATION] == OLD
    deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    with pytest.raises(deploy.DeployError, match="rolled back to gs://models/metarec/run-2"):
        deploy.deploy_deployment(_apps(), "metarec-serving", "serving", BROKEN, poll_s=0, sleep=_no_wait)
    assert _deployed_uri(serving) == NEW
    cause = serving.get(DEPS, "metarec-serving")["metadata"]["annotations"][deploy.CHANGE_CAUSE]
    assert cause == f"deploy_model: MODEL_URI={NEW}"


def test_same_version_of_the_deployment_is_left_alone(serving):
    result = deploy.deploy_deployment(_apps(), "metarec-serving", "serving", OLD, poll_s=0, sleep=_no_wait)
    assert result["outcome"] == "unchanged"
    assert not [entry for entry in serving.log if entry[0] in ("PATCH", "PUT")]


# ---------------------------------------------------------------------------------------------------
# RawDeployment mode (the shipped overlay) and kubectl's rollout rule


class RolloutSteps:
    """A Deployment controller that rolls in steps, one per sleep of the deploy loop: the new pod template
    is first not observed, then half rolled (maxSurge 1, maxUnavailable 0 on 2 replicas: 3 pods, 2 new and
    2 available, the old pod still counted as available), then done; a "broken" version never gets past
    the first new pod and ends past its progress deadline."""

    def __init__(self, kube, collection: str, name: str):
        self.kube, self.collection, self.name, self.step, self.sleeps = kube, collection, name, 0, 0

    def status(self, obj: dict, broken: bool) -> dict:
        generation, wanted = obj["metadata"]["generation"], obj["spec"]["replicas"]
        if self.step == 0:
            return {"observedGeneration": generation - 1, "replicas": wanted, "updatedReplicas": 0,
                    "availableReplicas": wanted}  # fmt: skip
        if self.step == 1 or broken:
            status = {"observedGeneration": generation, "replicas": wanted + 1, "updatedReplicas": 1 if broken
                      else wanted, "availableReplicas": wanted}  # fmt: skip
            if broken and self.step >= 2:
                status["conditions"] = [{"type": "Progressing", "status": "False",
                                         "reason": "ProgressDeadlineExceeded"}]  # fmt: skip
            return status
        return {"observedGeneration": generation, "replicas": wanted, "updatedReplicas": wanted,
                "availableReplicas": wanted}  # fmt: skip

    def sleep(self, _seconds):
        self.sleeps += 1
        self.step += 1
        obj = self.kube.get(self.collection, self.name)
        self.kube.set_status(
            self.collection, self.name, self.status(obj, "broken" in json.dumps(obj["spec"]))
        )


@pytest.fixture()
def raw_serving(kube, repo_root):
    """The shipped RawDeployment InferenceService on OLD, and the predictor Deployment KServe made of it.

    KServe's part, as kserve/kserve's PropagateRawStatus: on a new storageUri it rewrites the Deployment's
    pod template, and the InferenceService's status only mirrors the Deployment's Available condition
    (true throughout a rolling update) and reports no revisions."""
    isvc = yaml.safe_load((repo_root / "manifests/serving/overlays/kserve/inferenceservice.yaml").read_text())
    assert isvc["metadata"]["annotations"][deploy.MODE_ANNOTATION] == "RawDeployment"
    isvc["metadata"]["namespace"] = "serving"
    isvc["spec"]["predictor"]["model"]["storageUri"] = OLD
    kube.put(DEPS, raw_predictor_deployment("metarec", "serving", OLD))
    steps = RolloutSteps(kube, DEPS, "metarec-predictor")

    def kserve(fake, collection, obj):
        if collection != ISVCS:
            return
        obj["status"] = {"observedGeneration": 1, "components": {"predictor": {}},
                         "conditions": [{"type": kind, "status": "True"} for kind in ("PredictorReady", "Ready")]}  # fmt: skip
        deployment = fake.objects[(DEPS, "metarec-predictor")]
        uri = obj["spec"]["predictor"]["model"]["storageUri"]
        if deployment["spec"]["template"]["metadata"]["annotations"][KSERVE_SOURCE_URI] != uri:
            deployment["spec"]["template"]["metadata"]["annotations"][KSERVE_SOURCE_URI] = uri
            deployment["metadata"]["generation"] += 1
            steps.step = 0
            deployment["status"] = steps.status(deployment, "broken" in uri)

    kube.controller = kserve
    kube.put(ISVCS, isvc)
    return kube, steps


def test_raw_deployment_inferenceservice_is_promoted_once_its_predictor_has_rolled(raw_serving):
    kube, steps = raw_serving
    result = deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, canary_percent=20, poll_s=0,
                                            sleep=steps.sleep, apps=_apps())  # fmt: skip
    assert result["outcome"] == "promoted" and result["mode"] == "RawDeployment"
    # Not while the new template was unobserved, nor half rolled with the old pod still available.
    assert steps.sleeps == 2
    patches = [entry for entry in kube.log if entry[0] == "PATCH"]
    assert len(patches) == 1  # the storageUri only: raw mode splits no traffic, so there is no canary
    predictor = kube.get(ISVCS, "metarec")["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == NEW and "canaryTrafficPercent" not in predictor


def test_raw_deployment_inferenceservice_rolls_back_when_its_predictor_stalls(raw_serving):
    kube, steps = raw_serving
    with pytest.raises(deploy.DeployError, match="failed; rolled back to gs://models/metarec/run-1"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", BROKEN, poll_s=0, sleep=steps.sleep,
                                       apps=_apps())  # fmt: skip
    assert kube.get(ISVCS, "metarec")["spec"]["predictor"]["model"]["storageUri"] == OLD


def test_raw_deployment_needs_the_apps_api(raw_serving):
    with pytest.raises(ValueError, match="RawDeployment"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, poll_s=0, sleep=_no_wait)


def test_deployment_is_not_promoted_while_old_pods_remain(serving):
    steps = RolloutSteps(serving, DEPS, "metarec-serving")

    def rolling(fake, collection, obj):
        if collection == DEPS:
            steps.step = 0
            obj["status"] = steps.status(obj, "broken" in json.dumps(obj["spec"]))

    serving.controller = rolling
    result = deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=steps.sleep)
    assert result["outcome"] == "promoted"
    assert steps.sleeps == 2  # 3 pods, 2 updated, 2 available is not done: one old pod is still serving


def test_deployment_is_not_promoted_while_its_new_pods_are_not_available(serving):
    """Every pod already runs the new template and no old one is left, but the new ones are not ready
    yet (loading the model): kubectl's rule waits until they are available."""
    sleeps = []

    def starting(fake, collection, obj):
        if collection == DEPS:
            wanted = obj["spec"]["replicas"]
            obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "replicas": wanted,
                             "updatedReplicas": wanted, "availableReplicas": 0}  # fmt: skip

    def sleep(seconds):
        sleeps.append(seconds)
        status = serving.get(DEPS, "metarec-serving")["status"]
        serving.set_status(DEPS, "metarec-serving", {**status, "availableReplicas": status["replicas"]})

    serving.controller = starting
    result = deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=sleep)
    assert result["outcome"] == "promoted" and len(sleeps) == 1


# ---------------------------------------------------------------------------------------------------
# Who owns the model version: what an on-call `kubectl apply -k manifests/serving/overlays/<x>` (or a
# GitOps sync) does after a rollout. The manifests name no version, so the apply keeps it; when an
# object's applied configuration does name it, deploy_model refuses before writing anything.

NEWER = "gs://models/metarec/run-3"


def _shipped_isvc(repo_root) -> dict:
    isvc = yaml.safe_load((repo_root / "manifests/serving/overlays/kserve/inferenceservice.yaml").read_text())
    isvc["metadata"]["namespace"] = "serving"
    return isvc


def _raw_deploy(uri: str) -> dict:
    return deploy.deploy_inferenceservice(_custom(), "metarec", "serving", uri, poll_s=0, sleep=_no_wait,
                                          apps=_apps())  # fmt: skip


def test_the_fake_kubectl_apply_merges_as_the_kubernetes_docs_example():
    """kubernetes.io/docs/tasks/manage-kubernetes-objects/declarative-config, "Merge patch calculation":
    a field dropped from the configuration is deleted, a changed one is set, and one written by another
    writer (replicas, by `kubectl scale`) is kept."""

    def pod(image: str) -> dict:
        return {"spec": {"containers": [{"name": "nginx", "image": image}]}}

    last = {"spec": {"minReadySeconds": 5, "template": pod("nginx:1.14.2")}}
    live = {"spec": {"replicas": 2, "minReadySeconds": 5, "template": pod("nginx:1.14.2")}}
    new = {"spec": {"template": pod("nginx:1.16.1")}}
    patch = three_way_patch(last, new, live, strategic=True)
    assert patch == {"spec": {"minReadySeconds": None, "template": pod("nginx:1.16.1")}}


def test_reapplying_the_kserve_overlay_keeps_the_deployed_version(kube, repo_root):
    kube.controller = kserve_raw_controller
    client_side_apply(kube, ISVCS, _shipped_isvc(repo_root))  # the install
    assert _raw_deploy(NEW)["outcome"] == "promoted"
    client_side_apply(kube, ISVCS, _shipped_isvc(repo_root))  # on-call re-applies the overlay later
    isvc = kube.get(ISVCS, "metarec")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == NEW
    assert _raw_deploy(NEWER)["previous_uri"] == NEW  # and the next run is not refused
    # The documented rollback (docs/cluster.md, "Roll back by hand") reads the version deploy_model replaced.
    previous = kube.get(ISVCS, "metarec")["metadata"]["annotations"][deploy.PREVIOUS_ANNOTATION]
    assert previous == NEW


def test_deploy_refuses_an_inferenceservice_whose_applied_manifest_names_storageUri(kube, repo_root):
    kube.controller = kserve_raw_controller
    pinned = _shipped_isvc(repo_root)
    pinned["spec"]["predictor"]["model"]["storageUri"] = OLD  # older manifests, or an overlay pinning it
    client_side_apply(kube, ISVCS, pinned)
    writes = len(kube.log)
    with pytest.raises(deploy.OwnershipError, match="last-applied-configuration"):
        _raw_deploy(NEW)
    assert [entry for entry in kube.log[writes:] if entry[0] != "GET"] == []
    assert kube.get(ISVCS, "metarec")["spec"]["predictor"]["model"]["storageUri"] == OLD


def _pytorch_shorthand(isvc: dict) -> dict:
    """The overlay as older MetaRec manifests wrote it: the ``pytorch:`` shorthand, stock runtime."""
    model = isvc["spec"]["predictor"].pop("model")
    for key in ("modelFormat", "runtime"):
        model.pop(key)
    isvc["spec"]["predictor"]["pytorch"] = model
    return isvc


def test_kserve_replaces_the_live_model_when_an_apply_names_pytorch(kube, repo_root):
    """Why the overlay declares ``model:``: KServe's webhook rewrites ``pytorch:`` into ``model:`` on
    every update, so re-applying a ``pytorch:`` manifest drops the storageUri a rollout set."""
    kube.controller = kserve_raw_controller
    older = _pytorch_shorthand(_shipped_isvc(repo_root))
    client_side_apply(kube, ISVCS, older)
    live = kube.get(ISVCS, "metarec")["spec"]["predictor"]
    assert "pytorch" not in live and live["model"]["modelFormat"] == {"name": "pytorch"}
    kube.objects[(ISVCS, "metarec")]["spec"]["predictor"]["model"]["storageUri"] = NEW  # a rollout
    client_side_apply(kube, ISVCS, older)
    assert "storageUri" not in kube.get(ISVCS, "metarec")["spec"]["predictor"]["model"]


def test_deploy_refuses_an_inferenceservice_applied_as_a_pytorch_predictor(kube, repo_root):
    """Installed from older manifests (``pytorch:``): the next apply of those would reset the version, so
    deploy_model refuses until the current manifests are applied, which then keeps the live version."""
    kube.controller = kserve_raw_controller
    client_side_apply(kube, ISVCS, _pytorch_shorthand(_shipped_isvc(repo_root)))
    kube.objects[(ISVCS, "metarec")]["spec"]["predictor"]["model"]["storageUri"] = OLD  # served before
    writes = len(kube.log)
    with pytest.raises(deploy.OwnershipError, match="spec.predictor.pytorch"):
        _raw_deploy(NEW)
    assert [entry for entry in kube.log[writes:] if entry[0] != "GET"] == []
    # docs/cluster.md's migration: apply the current manifests; the version stays and deploys go on.
    client_side_apply(kube, ISVCS, _shipped_isvc(repo_root))
    live = kube.get(ISVCS, "metarec")["spec"]["predictor"]
    assert "pytorch" not in live and live["model"]["storageUri"] == OLD
    assert _raw_deploy(NEW)["previous_uri"] == OLD


def test_the_fake_api_server_refuses_a_strategic_merge_patch_of_a_custom_resource(serving):
    """kube-apiserver serves custom resources with JSON patch, merge patch and apply patch only
    (apiextensions-apiserver's customresource_handler.go): a strategic merge patch is 415."""
    from kubernetes.client.exceptions import ApiException

    api = _custom()
    body = {"spec": {"predictor": {"canaryTrafficPercent": 5}}}
    with pytest.raises(ApiException) as refused:
        api.api_client.call_api(
            "/apis/serving.kserve.io/v1beta1/namespaces/serving/inferenceservices/metarec", "PATCH",
            header_params={"Content-Type": "application/strategic-merge-patch+json"}, body=body,
        )  # fmt: skip
    assert refused.value.status == 415
    assert "canaryTrafficPercent" not in serving.get(ISVCS, "metarec")["spec"]["predictor"]
    # The client's own call for custom objects sends a merge patch, which is accepted.
    api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", "serving", "inferenceservices",
                                       "metarec", body)  # fmt: skip
    assert serving.get(ISVCS, "metarec")["spec"]["predictor"]["canaryTrafficPercent"] == 5


def test_deploy_refuses_a_version_another_server_side_applier_declares(serving):
    """A server-side applier (kubectl --server-side, Flux) declares what its managedFields entry with
    operation Apply lists; writers by update or patch (an on-call `kubectl patch`) declare nothing."""
    isvc = serving.get(ISVCS, "metarec")
    storage_uri = {"f:spec": {"f:predictor": {"f:model": {"f:storageUri": {}}}}}
    isvc["metadata"]["managedFields"] = [
        {"manager": "kubectl-patch", "operation": "Update", "fieldsV1": storage_uri},
        {"manager": deploy.FIELD_MANAGER, "operation": "Apply", "fieldsV1": storage_uri},
    ]
    serving.objects[(ISVCS, "metarec")] = isvc
    result = deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert result["outcome"] == "promoted"
    isvc = serving.get(ISVCS, "metarec")
    isvc["metadata"]["managedFields"].append({"manager": "kustomize-controller", "operation": "Apply",
                                              "fieldsV1": storage_uri})  # fmt: skip
    serving.objects[(ISVCS, "metarec")] = isvc
    with pytest.raises(deploy.OwnershipError, match="'kustomize-controller'"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEWER, poll_s=0, sleep=_no_wait)
    assert serving.get(ISVCS, "metarec")["spec"]["predictor"]["model"]["storageUri"] == NEW


def test_reapplying_the_serving_base_keeps_the_deployed_version(kube, repo_root):
    kube.controller = _controller
    client_side_apply(kube, DEPS, _shipped_deployment(repo_root))
    result = deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert result["previous_uri"] is None and result["outcome"] == "promoted"
    # The apply neither fails (an env var with both value and valueFrom is invalid) nor resets the version.
    client_side_apply(kube, DEPS, _shipped_deployment(repo_root))
    assert _deployed_uri(kube) == NEW
    (init,) = kube.get(DEPS, "metarec-serving")["spec"]["template"]["spec"]["initContainers"]
    assert init["env"] == [{"name": "MODEL_URI", "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{deploy.MODEL_ANNOTATION}']"}}}]  # fmt: skip
    assert deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEWER, poll_s=0,
                                    sleep=_no_wait)["previous_uri"] == NEW  # fmt: skip


def test_deploy_refuses_a_deployment_whose_applied_manifest_pins_the_version(kube, repo_root):
    kube.controller = _controller
    pinned = _shipped_deployment(repo_root)
    pinned["spec"]["template"]["metadata"]["annotations"][deploy.MODEL_ANNOTATION] = OLD
    client_side_apply(kube, DEPS, pinned)
    with pytest.raises(deploy.OwnershipError, match="last-applied-configuration"):
        deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert _deployed_uri(kube) == OLD and not [e for e in kube.log if e[0] in ("PATCH", "PUT")]


def test_deploy_refuses_a_deployment_that_does_not_read_the_annotation(kube, repo_root):
    """Manifests from before this scheme took MODEL_URI from a ConfigMap: setting the annotation would
    roll the pods onto the same model and report success."""
    kube.controller = _controller
    older = _older_deployment(repo_root)
    client_side_apply(kube, DEPS, older)
    with pytest.raises(deploy.OwnershipError, match="does not read MODEL_URI"):
        deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert not [e for e in kube.log if e[0] in ("PATCH", "PUT")]


def test_documented_migration_of_a_deployment_from_older_manifests(kube, repo_root):
    """docs/cluster.md, step 7: an install of the older manifests (MODEL_URI from a ConfigMap, then a
    literal value written by the older deploy_model) takes one patch, after which the current manifests
    apply cleanly, the version it served stays, and deploy_model works."""
    kube.controller = _controller
    older = _older_deployment(repo_root)
    client_side_apply(kube, DEPS, older)
    live = kube.get(DEPS, "metarec-serving")  # what the older deploy_model's replace left
    live["spec"]["template"]["spec"]["initContainers"][0]["env"] = [{"name": "MODEL_URI", "value": OLD}]
    kube.objects[(DEPS, "metarec-serving")] = live
    field_ref = {"fieldPath": f"metadata.annotations['{deploy.MODEL_ANNOTATION}']"}
    migration = {"spec": {"template": {
        "metadata": {"annotations": {deploy.MODEL_ANNOTATION: OLD}},
        "spec": {"initContainers": [{"name": "fetch-model", "env": [
            {"name": "MODEL_URI", "value": None, "valueFrom": {"configMapKeyRef": None, "fieldRef": field_ref}}]}]},
    }}}  # fmt: skip
    _apps().patch_namespaced_deployment("metarec-serving", "serving", migration)
    client_side_apply(kube, DEPS, _shipped_deployment(repo_root))
    assert _deployed_uri(kube) == OLD
    (init,) = kube.get(DEPS, "metarec-serving")["spec"]["template"]["spec"]["initContainers"]
    assert init["env"] == [{"name": "MODEL_URI", "valueFrom": {"fieldRef": field_ref}}]
    result = deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert (result["previous_uri"], result["outcome"]) == (OLD, "promoted")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"target": "isvc"}, "target must be"),
        ({"canary_percent": 150}, "canary_percent must be between 0 and 100"),
        ({"canary_percent": -1}, "canary_percent must be between 0 and 100"),
        ({"poll_interval_s": 0}, "must be positive"),
        ({"timeout_s": -5}, "must be positive"),
    ],
)
def test_bad_parameters_fail_before_the_cluster_is_read(parameters, message, tmp_path, monkeypatch):
    from metarec.components.build import load_component

    # No cluster at all: a check that came after the first API call would fail on the missing config.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    class Archive:
        metadata = {"published_uri": "gs://bucket/serving/v2"}

    arguments = {"target": "inferenceservice", "namespace": "serving", **parameters}
    with pytest.raises(ValueError, match=message):
        load_component("deploy_model").python_func(Archive(), **arguments)
