"""Roll a published model version out to serving, then promote it or roll back.

Two targets, both driven through the Kubernetes API (a fake API server in the tests):

* a KServe ``InferenceService``: its predictor's ``storageUri`` is set to the new version. In Serverless
  mode together with ``canaryTrafficPercent`` (that share of traffic goes to the new revision); once
  KServe reports the new revision ready, the canary setting is removed (all traffic to it). In
  RawDeployment mode (what ``manifests/serving/overlays/kserve`` uses) KServe splits no traffic and
  reports no revisions, so no canary is set and readiness is the rollout of the predictor's own
  Deployment, judged as for the plain Deployment. If the new version fails or the wait times out,
  ``storageUri`` goes back to the previous version.
* the plain Deployment of ``manifests/serving``: its pod template annotation ``metarec.io/model-uri``,
  which the ``fetch-model`` init container reads as ``MODEL_URI``, is set to the new version, which rolls
  the pods; the rollout must complete (as ``kubectl rollout status`` judges it: every replica updated and
  available, no old replica left) or the previous version is put back.

Who owns the model location. ``kubectl apply`` (client-side: a three-way merge against the
``kubectl.kubernetes.io/last-applied-configuration`` annotation; server-side: field managers) and GitOps
syncs reset every field their manifests declare and leave every other field alone. So the model location
must be a field the manifests do not declare, or the next apply of ``manifests/serving`` silently rolls
serving back to the manifest's URI (KServe) or fails on the pod template (the Deployment, whose env var
would carry both ``value`` and ``valueFrom``). The shipped manifests therefore name no model: the
InferenceService has no ``storageUri``, and the Deployment's ``MODEL_URI`` is read (downward API) from its
pod template annotation ``metarec.io/model-uri``. This step writes only that one field, as field manager
``metarec-deploy-model``, and refuses, before writing anything, when the object's applied configuration
declares it (older manifests, or an overlay that pins a version): a later apply would undo the rollout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
# Where the storageUri lives in a v1beta1 predictor: KServe's defaulting webhook stores `pytorch:` as `model:`
# (kserve/kserve pkg/apis/serving/v1beta1/inference_service_defaults.go), older KServe kept `pytorch:`.
PREDICTOR_KINDS = ("model", "pytorch")
FETCH_CONTAINER, MODEL_ENV = "fetch-model", "MODEL_URI"
RAW_MODE, MODE_ANNOTATION = "RawDeployment", "serving.kserve.io/deploymentMode"
# The predictor Deployment KServe creates in RawDeployment mode: `<name>-predictor` since KServe 0.11,
# `<name>-predictor-default` before.
RAW_PREDICTOR_NAMES = ("{name}-predictor", "{name}-predictor-default")
# The plain Deployment's model version: a pod template annotation its fetch-model container reads through
# the downward API (manifests/serving/base/deployment.yaml), so that no manifest declares it.
MODEL_ANNOTATION = "metarec.io/model-uri"
# On the InferenceService: the version this step replaced, for a one-command rollback (docs/cluster.md).
PREVIOUS_ANNOTATION = "metarec.io/previous-model-uri"
# On the Deployment: recorded on each ReplicaSet, so `kubectl rollout history` names the model per revision.
CHANGE_CAUSE = "kubernetes.io/change-cause"
FIELD_MANAGER = "metarec-deploy-model"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class DeployError(RuntimeError):
    """The new version did not become ready; the previous one was restored."""


class OwnershipError(RuntimeError):
    """The object's applied manifests declare the model location, so the next ``kubectl apply`` or GitOps
    sync would undo this rollout; nothing was changed."""


def _declared_by(obj: dict, path: tuple[str, ...]) -> list[str]:
    """Who, besides this step, declared ``path`` of ``obj`` in an applied configuration.

    Client-side ``kubectl apply`` (and Argo CD, which uses it) keeps what it applied in the
    ``last-applied-configuration`` annotation and resets those fields on every apply; server-side apply
    records an ``Apply`` entry in ``metadata.managedFields`` per field manager (``kubectl``,
    ``kustomize-controller``, ...) and resets or conflicts on the fields listed there.

    Args:
        obj: The live object, as the API returns it.
        path: Keys from the object's root to the field.

    Returns:
        Descriptions of the declarations found; empty when no applied configuration names the field.
    """
    found = []
    metadata = obj.get("metadata") or {}
    last_applied = (metadata.get("annotations") or {}).get(LAST_APPLIED)
    if last_applied:
        node = json.loads(last_applied)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            found.append(f"kubectl client-side apply ({LAST_APPLIED} holds {node!r})")
    for entry in metadata.get("managedFields") or []:
        if entry.get("operation") != "Apply" or entry.get("manager") == FIELD_MANAGER:
            continue
        node = entry.get("fieldsV1") or {}
        for key in path:
            node = node.get(f"f:{key}") if isinstance(node, dict) else None
        if node is not None:
            found.append(f"server-side apply by field manager {entry.get('manager')!r}")
    return found


def _refuse_if_declared(obj: dict, path: tuple[str, ...], target: str, fix: str) -> None:
    declared = _declared_by(obj, path)
    if declared:
        raise OwnershipError(
            f"{target}: {'.'.join(path)} is declared by {' and '.join(declared)}, so the next apply of those "
            f"manifests (or GitOps sync) would roll serving back; nothing was changed. {fix}"
        )


def _predictor_model(isvc: dict) -> dict:
    predictor = isvc["spec"]["predictor"]
    for kind in PREDICTOR_KINDS:
        if isinstance(predictor.get(kind), dict):
            return predictor[kind]
    raise ValueError(
        f"InferenceService {isvc['metadata']['name']} has no predictor.{'/'.join(PREDICTOR_KINDS)}"
    )


def _raw_mode(isvc: dict) -> bool:
    """Whether KServe runs this InferenceService as a plain Deployment (no Knative revisions)."""
    annotations = isvc["metadata"].get("annotations") or {}
    status = isvc.get("status") or {}
    return RAW_MODE in (annotations.get(MODE_ANNOTATION), status.get("deploymentMode"))


def _isvc_failed(isvc: dict) -> bool:
    for condition in (isvc.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready" and str(condition.get("status")) == "False":
            if condition.get("reason") in ("RevisionFailed", "RevisionMissing", "Failed"):
                return True
    return False


def _isvc_state(isvc: dict) -> str | None:
    """Serverless mode: ``ready`` when the latest revision is ready for the current spec, ``failed``, or
    None (pending)."""
    status = isvc.get("status") or {}
    if status.get("observedGeneration", 0) < isvc["metadata"].get("generation", 0):
        return None
    if _isvc_failed(isvc):
        return "failed"
    predictor = (status.get("components") or {}).get("predictor") or {}
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if created and created == ready:
        return "ready"
    return None


def _raw_predictor(apps, name: str, namespace: str):
    """The predictor Deployment of a RawDeployment InferenceService, or None while it does not exist."""
    from kubernetes.client.exceptions import ApiException

    for pattern in RAW_PREDICTOR_NAMES:
        try:
            return apps.read_namespaced_deployment(pattern.format(name=name), namespace)
        except ApiException as error:
            if error.status != 404:
                raise
    return None


def _raw_state(isvc: dict, deployment, model_uri: str, serialize: Callable) -> str | None:
    """RawDeployment mode: the predictor Deployment's rollout, once its pod template is for ``model_uri``.

    KServe's status there only mirrors the Deployment's Available condition, which old pods keep true
    during a rolling update, so it cannot tell the new version's pods are up.
    """
    if _isvc_failed(isvc):
        return "failed"
    if deployment is None or model_uri not in json.dumps(serialize(deployment.spec.template)):
        return None  # KServe has not rewritten the Deployment for the new storageUri yet
    return _rollout_state(deployment)


def _wait(read: Callable[[], dict], state: Callable[[dict], str | None], timeout_s: float,
          poll_s: float, sleep: Callable[[float], None], clock: Callable[[], float]) -> str:  # fmt: skip
    deadline = clock() + timeout_s
    while True:
        current = state(read())
        if current is not None:
            return current
        if clock() >= deadline:
            return "timeout"
        sleep(poll_s)


def deploy_inferenceservice(api, name: str, namespace: str, model_uri: str, canary_percent: int = 10,
                            timeout_s: float = 900, poll_s: float = 10, sleep=time.sleep,
                            clock=time.monotonic, apps=None) -> dict:  # fmt: skip
    """Points an InferenceService at a new model version (with a canary in Serverless mode), then
    promotes or rolls back.

    Args:
        api: ``kubernetes.client.CustomObjectsApi``.
        name: InferenceService name.
        namespace: Its namespace.
        model_uri: The published version (``gs://.../<version>``).
        canary_percent: Serverless mode: traffic share of the new revision while it is checked (0: no
            canary step). RawDeployment mode splits no traffic and ignores it.
        timeout_s: Seconds to wait for the new revision to be ready.
        poll_s: Seconds between status reads.
        sleep: Sleep function (tests pass a fake one).
        clock: Monotonic clock (tests pass a fake one).
        apps: ``kubernetes.client.AppsV1Api``, to watch the predictor Deployment in RawDeployment mode.

    Returns:
        ``{"target", "previous_uri", "model_uri", "outcome": "promoted" | "unchanged", "mode"}``.

    Raises:
        DeployError: The new revision failed or timed out; storageUri was restored.
        OwnershipError: The InferenceService's applied manifests declare ``storageUri``; nothing was
            changed.
        ValueError: RawDeployment mode without ``apps``.
    """
    group, version, plural = KSERVE
    current = api.get_namespaced_custom_object(group, version, namespace, plural, name)
    previous = _predictor_model(current).get("storageUri")
    result = {
        "target": f"InferenceService {namespace}/{name}",
        "previous_uri": previous,
        "model_uri": model_uri,
    }
    raw = _raw_mode(current)
    result["mode"] = RAW_MODE if raw else "Serverless"
    if previous == model_uri:
        return result | {"outcome": "unchanged"}
    if raw and apps is None:
        raise ValueError(f"{result['target']} is in {RAW_MODE} mode: pass apps= to watch its Deployment")
    kind = next(k for k in PREDICTOR_KINDS if isinstance(current["spec"]["predictor"].get(k), dict))
    migrate = ("Apply the current manifests (manifests/serving/overlays/kserve: predictor.model, no storageUri) "
               "once, as docs/cluster.md ('Who owns the model version') shows.")  # fmt: skip
    _refuse_if_declared(current, ("spec", "predictor", kind, "storageUri"), result["target"], migrate)
    # KServe's webhook turns a `pytorch:` predictor into `model:` on every create and update, replacing the
    # live `model:` whole: an applied configuration naming `pytorch` resets the version on its next apply.
    if kind == "model":
        _refuse_if_declared(current, ("spec", "predictor", "pytorch"), result["target"], migrate)
    older = (current["metadata"].get("annotations") or {}).get(PREVIOUS_ANNOTATION)
    canary = None if raw else (canary_percent or None)
    rollout = {
        "metadata": {"annotations": {PREVIOUS_ANNOTATION: previous}},
        "spec": {"predictor": {kind: {"storageUri": model_uri}, "canaryTrafficPercent": canary}},
    }
    api.patch_namespaced_custom_object(group, version, namespace, plural, name, rollout,
                                       field_manager=FIELD_MANAGER)  # fmt: skip
    how = "rolling update of the predictor Deployment (no canary)" if raw else f"canary {canary_percent}%"
    print(f"{result['target']}: storageUri {previous} -> {model_uri}, {how}", flush=True)

    def read():
        return api.get_namespaced_custom_object(group, version, namespace, plural, name)

    if raw:
        serialize = apps.api_client.sanitize_for_serialization

        def state(isvc: dict) -> str | None:
            return _raw_state(isvc, _raw_predictor(apps, name, namespace), model_uri, serialize)
    else:
        state = _isvc_state
    outcome = _wait(read, state, timeout_s, poll_s, sleep, clock)
    if outcome == "ready":
        if not raw:
            promote = {"spec": {"predictor": {"canaryTrafficPercent": None}}}
            api.patch_namespaced_custom_object(group, version, namespace, plural, name, promote,
                                               field_manager=FIELD_MANAGER)  # fmt: skip
        print(f"{result['target']}: new version ready, serving all traffic", flush=True)
        return result | {"outcome": "promoted"}
    back = {
        "metadata": {"annotations": {PREVIOUS_ANNOTATION: older}},
        "spec": {"predictor": {kind: {"storageUri": previous}, "canaryTrafficPercent": None}},
    }
    api.patch_namespaced_custom_object(group, version, namespace, plural, name, back,
                                       field_manager=FIELD_MANAGER)  # fmt: skip
    raise DeployError(f"{result['target']}: new revision {outcome}; rolled back to {previous}")


def _fetch_container(deployment) -> object:
    for container in deployment.spec.template.spec.init_containers or []:
        if container.name == FETCH_CONTAINER:
            return container
    raise ValueError(f"Deployment {deployment.metadata.name} has no init container {FETCH_CONTAINER!r}")


def _rollout_state(deployment) -> str | None:
    """``kubectl rollout status``'s rule: ``ready`` once every wanted replica runs the new template and is
    available and no old replica is left, ``failed`` past the progress deadline, else None (pending)."""
    status, wanted = deployment.status, deployment.spec.replicas
    if status is None or (status.observed_generation or 0) < (deployment.metadata.generation or 0):
        return None
    for condition in status.conditions or []:
        if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
            return "failed"
    updated = status.updated_replicas or 0
    if wanted is not None and updated < wanted:
        return None
    if (status.replicas or 0) > updated:  # old pods still running (and counted as available)
        return None
    if (status.available_replicas or 0) < updated:
        return None
    return "ready"


def _reads_annotation(container) -> bool:
    """Whether the fetch-model container takes ``MODEL_URI`` from the pod template annotation."""
    wanted = f"metadata.annotations['{MODEL_ANNOTATION}']"
    for env in container.env or []:
        if env.name == MODEL_ENV:
            field_ref = env.value_from.field_ref if env.value_from else None
            return not env.value and field_ref is not None and field_ref.field_path == wanted
    return False


def deploy_deployment(api, name: str, namespace: str, model_uri: str, timeout_s: float = 900,
                      poll_s: float = 10, sleep=time.sleep, clock=time.monotonic) -> dict:  # fmt: skip
    """Rolls the serving Deployment to a new model version, or back to the previous one.

    The version is the pod template annotation ``metarec.io/model-uri`` (the manifests never name it, so
    a later ``kubectl apply -k`` keeps it); a change rolls the pods, and each version is its own
    ReplicaSet revision, labelled by ``kubernetes.io/change-cause`` in ``kubectl rollout history``, so
    ``kubectl rollout undo`` returns to the previous version.

    Args:
        api: ``kubernetes.client.AppsV1Api``.
        name: Deployment name (``metarec-serving``).
        namespace: Its namespace.
        model_uri: The published version.
        timeout_s: Seconds to wait for the rollout.
        poll_s: Seconds between status reads.
        sleep: Sleep function.
        clock: Monotonic clock.

    Returns:
        ``{"target", "previous_uri", "model_uri", "outcome"}``.

    Raises:
        DeployError: The rollout failed or timed out; the previous version was restored.
        OwnershipError: The Deployment's applied manifests declare the version, or its fetch-model
            container does not read it from the annotation (older manifests); nothing was changed.
    """
    deployment = api.read_namespaced_deployment(name, namespace)
    target = f"Deployment {namespace}/{name}"
    if not _reads_annotation(_fetch_container(deployment)):
        raise OwnershipError(
            f"{target}: its {FETCH_CONTAINER} container does not read {MODEL_ENV} from the pod template "
            f"annotation {MODEL_ANNOTATION} (manifests older than this step): setting the annotation would "
            "change nothing. Migrate it once as docs/cluster.md ('Who owns the model version') shows."
        )
    _refuse_if_declared(
        api.api_client.sanitize_for_serialization(deployment),
        ("spec", "template", "metadata", "annotations", MODEL_ANNOTATION), target,
        f"Remove the {MODEL_ANNOTATION} annotation from the manifests (docs/cluster.md, 'Who owns the model "
        "version').",
    )  # fmt: skip
    previous = (deployment.spec.template.metadata.annotations or {}).get(MODEL_ANNOTATION)
    previous_cause = (deployment.metadata.annotations or {}).get(CHANGE_CAUSE)
    result = {"target": target, "previous_uri": previous, "model_uri": model_uri}
    if previous == model_uri:
        return result | {"outcome": "unchanged"}

    def point_at(uri: str | None, cause: str | None) -> None:
        # A strategic merge patch of two map keys only: nothing else of the template is rewritten.
        body = {"metadata": {"annotations": {CHANGE_CAUSE: cause}},
                "spec": {"template": {"metadata": {"annotations": {MODEL_ANNOTATION: uri}}}}}  # fmt: skip
        api.patch_namespaced_deployment(name, namespace, body, field_manager=FIELD_MANAGER)

    point_at(model_uri, f"deploy_model: {MODEL_ENV}={model_uri}")
    print(f"{target}: {MODEL_ENV} -> {model_uri}", flush=True)
    outcome = _wait(lambda: api.read_namespaced_deployment(name, namespace), _rollout_state,
                    timeout_s, poll_s, sleep, clock)  # fmt: skip
    if outcome == "ready":
        return result | {"outcome": "promoted"}
    point_at(previous, previous_cause)
    raise DeployError(f"{target}: rollout {outcome}; rolled back to {previous}")
