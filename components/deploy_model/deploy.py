"""Roll a published model version out to serving, then promote it or roll back.

Two targets, both driven through the Kubernetes API (a fake API server in the tests):

* a KServe ``InferenceService``: its predictor's ``storageUri`` is set to the new version together with
  ``canaryTrafficPercent`` (Serverless mode sends that share of traffic to the new revision; RawDeployment
  mode rolls the Deployment). Once KServe reports the new revision ready, the canary setting is removed
  (all traffic to it); if the revision fails or the wait times out, ``storageUri`` goes back to the
  previous version.
* the plain Deployment of ``manifests/serving``: the ``fetch-model`` init container's ``MODEL_URI`` is set
  to the new version, which rolls the pods; the rollout must complete (updated and available replicas)
  or the previous pod template is put back.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
PREDICTOR_KINDS = ("model", "pytorch")  # where the storageUri lives in a v1beta1 predictor
FETCH_CONTAINER, MODEL_ENV = "fetch-model", "MODEL_URI"


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


def _isvc_state(isvc: dict) -> str | None:
    """``ready`` when the latest revision is ready for the current spec, ``failed``, or None (pending)."""
    status = isvc.get("status") or {}
    if status.get("observedGeneration", 0) < isvc["metadata"].get("generation", 0):
        return None
    predictor = (status.get("components") or {}).get("predictor") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready" and str(condition.get("status")) == "False":
            if condition.get("reason") in ("RevisionFailed", "RevisionMissing", "Failed"):
                return "failed"
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if created and created == ready:
        return "ready"
    return None


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
                            clock=time.monotonic) -> dict:  # fmt: skip
    """Points an InferenceService at a new model version with a canary, then promotes or rolls back.

    Args:
        api: ``kubernetes.client.CustomObjectsApi``.
        name: InferenceService name.
        namespace: Its namespace.
        model_uri: The published version (``gs://.../<version>``).
        canary_percent: Traffic share of the new revision while it is checked (0: no canary step).
        timeout_s: Seconds to wait for the new revision to be ready.
        poll_s: Seconds between status reads.
        sleep: Sleep function (tests pass a fake one).
        clock: Monotonic clock (tests pass a fake one).

    Returns:
        ``{"target", "previous_uri", "model_uri", "outcome": "promoted" | "unchanged"}``.

    Raises:
        DeployError: The new revision failed or timed out; storageUri was restored.
    """
    group, version, plural = KSERVE
    current = api.get_namespaced_custom_object(group, version, namespace, plural, name)
    previous = _predictor_model(current).get("storageUri")
    result = {
        "target": f"InferenceService {namespace}/{name}",
        "previous_uri": previous,
        "model_uri": model_uri,
    }
    if previous == model_uri:
        return result | {"outcome": "unchanged"}
    kind = next(k for k in PREDICTOR_KINDS if isinstance(current["spec"]["predictor"].get(k), dict))
    rollout = {"spec": {"predictor": {kind: {"storageUri": model_uri},
                                      "canaryTrafficPercent": canary_percent or None}}}  # fmt: skip
    api.patch_namespaced_custom_object(group, version, namespace, plural, name, rollout)
    print(f"{result['target']}: storageUri {previous} -> {model_uri}, canary {canary_percent}%", flush=True)

    def read():
        return api.get_namespaced_custom_object(group, version, namespace, plural, name)

    outcome = _wait(read, _isvc_state, timeout_s, poll_s, sleep, clock)
    if outcome == "ready":
        promote = {"spec": {"predictor": {"canaryTrafficPercent": None}}}
        api.patch_namespaced_custom_object(group, version, namespace, plural, name, promote)
        print(f"{result['target']}: new revision ready, promoted to all traffic", flush=True)
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
    status, wanted = deployment.status, deployment.spec.replicas or 0
    if status is None or (status.observed_generation or 0) < (deployment.metadata.generation or 0):
        return None
    for condition in status.conditions or []:
        if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
            return "failed"
    if (status.updated_replicas or 0) >= wanted and (status.available_replicas or 0) >= wanted:
        return "ready"
    return None


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
