"""deploy_model against a fake Kubernetes API server: canary rollout, promotion and rollback for a KServe
InferenceService and for the plain Deployment, on the repository's own serving manifests."""

import json

import pytest
import yaml
from fake_kube import DEPLOYMENTS, INFERENCESERVICES, KSERVE_SOURCE_URI, raw_predictor_deployment

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
    """The shipped InferenceService (made Serverless) and Deployment, on version OLD, in ``serving``."""
    kube.controller = _controller
    isvc = yaml.safe_load((repo_root / "manifests/serving/overlays/kserve/inferenceservice.yaml").read_text())
    isvc["metadata"]["annotations"].pop(deploy.MODE_ANNOTATION)
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
    # What each write left in the predictor spec (the controller sees every write): the counting of
    # PATCH requests alone passed with no canary ever set.
    seen = []

    def recording(fake, collection, obj):
        if collection == ISVCS:
            predictor = obj["spec"]["predictor"]
            seen.append((predictor["pytorch"]["storageUri"], predictor.get("canaryTrafficPercent")))
        _controller(fake, collection, obj)

    serving.controller = recording
    result = deploy.deploy_inferenceservice(_custom(), "metarec", "serving", NEW, canary_percent=20,
                                            poll_s=0, sleep=_no_wait)  # fmt: skip
    assert result["outcome"] == "promoted" and result["previous_uri"] == OLD
    patches = [entry for entry in serving.log if entry[0] == "PATCH"]
    assert len(patches) == 2  # the canary rollout, then the promotion
    assert seen == [(NEW, 20), (NEW, None)]  # 20 % on the new revision first, then all of it
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
    isvc["spec"]["predictor"]["pytorch"]["storageUri"] = OLD
    kube.put(DEPS, raw_predictor_deployment("metarec", "serving", OLD))
    steps = RolloutSteps(kube, DEPS, "metarec-predictor")

    def kserve(fake, collection, obj):
        if collection != ISVCS:
            return
        obj["status"] = {"observedGeneration": 1, "components": {"predictor": {}},
                         "conditions": [{"type": kind, "status": "True"} for kind in ("PredictorReady", "Ready")]}  # fmt: skip
        deployment = fake.objects[(DEPS, "metarec-predictor")]
        uri = obj["spec"]["predictor"]["pytorch"]["storageUri"]
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
    assert predictor["pytorch"]["storageUri"] == NEW and "canaryTrafficPercent" not in predictor


def test_raw_deployment_inferenceservice_rolls_back_when_its_predictor_stalls(raw_serving):
    kube, steps = raw_serving
    with pytest.raises(deploy.DeployError, match="failed; rolled back to gs://models/metarec/run-1"):
        deploy.deploy_inferenceservice(_custom(), "metarec", "serving", BROKEN, poll_s=0, sleep=steps.sleep,
                                       apps=_apps())  # fmt: skip
    assert kube.get(ISVCS, "metarec")["spec"]["predictor"]["pytorch"]["storageUri"] == OLD


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
