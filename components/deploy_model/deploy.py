"""Roll a published model version out to serving, then promote it or roll back.

Two targets, both driven through the Kubernetes API (a fake API server in the tests):

* a KServe ``InferenceService``: its predictor's ``storageUri`` is set to the new version. In Serverless
  mode together with ``canaryTrafficPercent`` (that share of traffic goes to the new revision); once
  KServe reports the new revision ready, the canary setting is removed (all traffic to it). In
  RawDeployment mode (what ``manifests/serving/overlays/kserve`` uses) KServe splits no traffic and
  reports no revisions, so no canary is set and readiness is the rollout of the predictor's own
  Deployment, judged as for the plain Deployment. If the new version fails or the wait times out,
  ``storageUri`` goes back to the previous version.
* the plain Deployment of ``manifests/serving``: the ``fetch-model`` init container's ``MODEL_URI`` is set
  to the new version, which rolls the pods; the rollout must complete (as ``kubectl rollout status``
  judges it: every replica updated and available, no old replica left) or the previous pod template is
  put back.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable

KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
PREDICTOR_KINDS = ("model", "pytorch")  # where the storageUri lives in a v1beta1 predictor
FETCH_CONTAINER, MODEL_ENV = "fetch-model", "MODEL_URI"
RAW_MODE, MODE_ANNOTATION = "RawDeployment", "serving.kserve.io/deploymentMode"
# The predictor Deployment KServe creates in RawDeployment mode: `<name>-predictor` since KServe 0.11,
# `<name>-predictor-default` before.
RAW_PREDICTOR_NAMES = ("{name}-predictor", "{name}-predictor-default")


class DeployError(RuntimeError):
    """The new version did not become ready; the previous one was restored."""


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
    canary = None if raw else (canary_percent or None)
    rollout = {"spec": {"predictor": {kind: {"storageUri": model_uri}, "canaryTrafficPercent": canary}}}
    api.patch_namespaced_custom_object(group, version, namespace, plural, name, rollout)
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
            api.patch_namespaced_custom_object(group, version, namespace, plural, name, promote)
        print(f"{result['target']}: new version ready, serving all traffic", flush=True)
        return result | {"outcome": "promoted"}
    back = {"spec": {"predictor": {kind: {"storageUri": previous}, "canaryTrafficPercent": None}}}
    api.patch_namespaced_custom_object(group, version, namespace, plural, name, back)
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


def deploy_deployment(api, name: str, namespace: str, model_uri: str, timeout_s: float = 900,
                      poll_s: float = 10, sleep=time.sleep, clock=time.monotonic) -> dict:  # fmt: skip
    """Rolls the serving Deployment to a new model version, or back to the previous pod template.

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
        DeployError: The rollout failed or timed out; the previous template was restored.
    """
    from kubernetes import client

    deployment = api.read_namespaced_deployment(name, namespace)
    previous_template = copy.deepcopy(deployment.spec.template)
    container = _fetch_container(deployment)
    env = [e for e in container.env or [] if e.name != MODEL_ENV]
    previous = next((e.value for e in container.env or [] if e.name == MODEL_ENV), None)
    result = {"target": f"Deployment {namespace}/{name}", "previous_uri": previous, "model_uri": model_uri}
    if previous == model_uri:
        return result | {"outcome": "unchanged"}
    container.env = env + [client.V1EnvVar(name=MODEL_ENV, value=model_uri)]
    api.replace_namespaced_deployment(name, namespace, deployment)
    print(f"{result['target']}: {MODEL_ENV} -> {model_uri}", flush=True)
    outcome = _wait(lambda: api.read_namespaced_deployment(name, namespace), _rollout_state,
                    timeout_s, poll_s, sleep, clock)  # fmt: skip
    if outcome == "ready":
        return result | {"outcome": "promoted"}
    current = api.read_namespaced_deployment(name, namespace)
    current.spec.template = previous_template
    api.replace_namespaced_deployment(name, namespace, current)
    raise DeployError(f"{result['target']}: rollout {outcome}; rolled back to the previous pod template")
