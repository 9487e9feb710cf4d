"""deploy_model against a fake Kubernetes API server: canary rollout, promotion and rollback for a KServe
InferenceService and for the plain Deployment, on the repository's own serving manifests."""

import pytest
import yaml
from fake_kube import DEPLOYMENTS, INFERENCESERVICES
from metarec.components.deploy_model import deploy

NEW, OLD, BROKEN = "gs://models/metarec/run-2", "gs://models/metarec/run-1", "gs://models/metarec/broken"
ISVCS, DEPS = INFERENCESERVICES.format(namespace="serving"), DEPLOYMENTS.format(namespace="serving")


def _controller(fake, collection, obj):
    """KServe and the Deployment controller, reduced to: a model URI with "broken" never becomes ready."""
    generation = obj["metadata"]["generation"]
    if collection == ISVCS:
        uri = obj["spec"]["predictor"]["pytorch"]["storageUri"]
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
        (init,) = [c for c in obj["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-model"]
        uri = next((e.get("value") for e in init.get("env", []) if e["name"] == "MODEL_URI"), "") or ""
        replicas = obj["spec"].get("replicas", 1)
        healthy = "broken" not in uri
        obj["status"] = {"observedGeneration": generation, "replicas": replicas,
                         "updatedReplicas": replicas if healthy else 0, "availableReplicas": replicas if healthy else 0,
                         "conditions": [] if healthy else [{"type": "Progressing", "status": "False",
                                                             "reason": "ProgressDeadlineExceeded"}]}  # fmt: skip


@pytest.fixture()
def serving(kube, repo_root):
    """The shipped InferenceService and Deployment, on version OLD, in namespace ``serving``."""
    kube.controller = _controller
    isvc = yaml.safe_load((repo_root / "manifests/serving/overlays/kserve/inferenceservice.yaml").read_text())
    isvc["metadata"]["namespace"] = "serving"
    isvc["spec"]["predictor"]["pytorch"]["storageUri"] = OLD
    kube.put(ISVCS, isvc)
    deployment = yaml.safe_load((repo_root / "manifests/serving/base/deployment.yaml").read_text())
    deployment["metadata"]["namespace"] = "serving"
    deployment["spec"]["replicas"] = 2
    (init,) = [
        c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-model"
    ]
    init["env"] = [{"name": "MODEL_URI", "value": OLD}]
    kube.put(DEPS, deployment)
    return kube


def _custom():
    from metarec.components.kube import custom_objects_api

    return custom_objects_api()


def _apps():
    from metarec.components.kube import apps_api

    return apps_api()


def _no_wait(_seconds):
    pass


def test_inferenceservice_rolls_out_with_a_canary_then_promotes(serving):
    result = deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, canary_percent=20,
                                            poll_s=0, sleep=_no_wait)  # fmt: skip
    assert result["outcome"] == "promoted" and result["previous_uri"] == OLD
    patches = [entry for entry in serving.log if entry[0] == "PATCH"]
    assert len(patches) == 2  # the canary rollout, then the promotion
    predictor = serving.get(ISVCS, "metarec")["spec"]["predictor"]
    assert predictor["pytorch"]["storageUri"] == NEW
    assert "canaryTrafficPercent" not in predictor  # all traffic on the new revision


def test_inferenceservice_rolls_back_when_the_new_revision_fails(serving):
    with pytest.raises(deploy.DeployError, match="rolled back to gs://models/metarec/run-1"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", BROKEN, poll_s=0, sleep=_no_wait)
    predictor = serving.get(ISVCS, "metarec")["spec"]["predictor"]
    assert predictor["pytorch"]["storageUri"] == OLD
    assert "canaryTrafficPercent" not in predictor


def test_inferenceservice_rolls_back_on_timeout(serving):
    serving.controller = None  # nothing ever reports the new revision
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(deploy.DeployError, match="timeout"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, timeout_s=30, poll_s=10,
                                       sleep=sleep, clock=lambda: now[0])  # fmt: skip
    assert serving.get(ISVCS, "metarec")["spec"]["predictor"]["pytorch"]["storageUri"] == OLD


def test_same_version_is_left_alone(serving):
    result = deploy.deploy_inferenceservice(_custom(), "metarec", "serving", OLD, sleep=_no_wait)
    assert result["outcome"] == "unchanged"
    assert not [entry for entry in serving.log if entry[0] in ("PATCH", "PUT")]


def _deployed_uri(kube) -> str:
    spec = kube.get(DEPS, "metarec-serving")["spec"]["template"]["spec"]
    (init,) = [c for c in spec["initContainers"] if c["name"] == "fetch-model"]
    return next(e["value"] for e in init["env"] if e["name"] == "MODEL_URI")


def test_deployment_rolls_to_the_new_version(serving):
    result = deploy.deploy_deployment(_apps(), "metarec-serving", "serving", NEW, poll_s=0, sleep=_no_wait)
    assert result == {"target": "Deployment serving/metarec-serving", "previous_uri": OLD, "model_uri": NEW,
                      "outcome": "promoted"}  # fmt: skip
    assert _deployed_uri(serving) == NEW


def test_deployment_rolls_back_when_the_rollout_fails(serving):
    with pytest.raises(deploy.DeployError, match="rolled back"):
        deploy.deploy_deployment(_apps(), "metarec-serving", "serving", BROKEN, poll_s=0, sleep=_no_wait)
    assert _deployed_uri(serving) == OLD
