"""KFP component: roll the published model version out to KServe or the plain Deployment."""

from kfp import dsl
from kfp.dsl import Input, Model

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def deploy_model(
    archive: Input[Model],
    target: str = "",
    name: str = "metarec",
    namespace: str = "",
    canary_percent: int = 10,
    timeout_s: int = 900,
    poll_interval_s: int = 10,
):
    """Points serving at the version package_model published; promotes it when ready, else rolls back.

    Needs the pipeline service account allowed to get and patch ``inferenceservices`` (KServe) and to get
    ``deployments`` (a RawDeployment predictor's rollout), or to get and patch ``deployments`` (plain), in
    ``namespace`` (manifests/pipeline-rbac).

    It writes only the model version (``storageUri``, or the Deployment's pod template annotation
    ``metarec.io/model-uri``), which the shipped manifests do not name, so a later ``kubectl apply -k``
    keeps it; it fails, changing nothing, where an applied manifest names it (the apply would undo it).

    Args:
        archive: package_model's output; metadata ``published_uri`` is the version to roll out.
        target: ``inferenceservice``, ``deployment`` or empty (nothing is deployed).
        name: Name of the InferenceService or Deployment.
        namespace: Its namespace; empty: the namespace this step runs in.
        canary_percent: InferenceService in Serverless mode only: traffic share (0 to 100; 0: no canary
            step) of the new revision until it is ready (RawDeployment mode splits no traffic: its
            Deployment rolls instead).
        timeout_s: Seconds to wait for the new version before rolling back.
        poll_interval_s: Seconds between status reads.
    """
    import json

    from metarec.components.deploy_model.deploy import deploy_deployment, deploy_inferenceservice
    from metarec.components.kube import apps_api, current_namespace, custom_objects_api

    if not target:
        print("no deploy target: nothing to roll out")
        return
    # Checked before anything is read from or written to the cluster.
    if target not in ("inferenceservice", "deployment"):
        raise ValueError(f"target must be 'inferenceservice', 'deployment' or empty, got {target!r}")
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"canary_percent must be between 0 and 100, got {canary_percent}")
    if timeout_s <= 0 or poll_interval_s <= 0:
        raise ValueError(
            f"timeout_s and poll_interval_s must be positive, got {timeout_s} and {poll_interval_s}"
        )
    model_uri = archive.metadata.get("published_uri")
    if not model_uri:
        raise ValueError("the archive was not published (set output_uri): there is no version to deploy")
    namespace = namespace or current_namespace()
    if target == "inferenceservice":
        result = deploy_inferenceservice(custom_objects_api(), name, namespace, model_uri, canary_percent,
                                         timeout_s, poll_interval_s, apps=apps_api())  # fmt: skip
    elif target == "deployment":
        result = deploy_deployment(apps_api(), name, namespace, model_uri, timeout_s, poll_interval_s)
    else:
        raise ValueError(f"target must be 'inferenceservice', 'deployment' or empty, got {target!r}")
    print(json.dumps(result))
