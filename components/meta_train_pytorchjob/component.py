"""KFP component: meta-train on several GPUs/nodes through a Kubeflow Training Operator PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def meta_train_pytorchjob(
    dataset: Input[Dataset],
    model: Output[Model],
    image: str,
    method: str = "maml",
    config: str = "{}",
    namespace: str = "",
    num_nodes: int = 2,
    gpus_per_node: int = 1,
    gpu_type: str = "",
    cpu_request: str = "4",
    memory_request: str = "16Gi",
    service_account: str = "",
    timeout_s: int = 86100,
    poll_interval_s: int = 30,
    checkpoint_root: str = "",
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_id: str = dsl.PIPELINE_TASK_ID_PLACEHOLDER,
):
    """Submits (or, on a retry, adopts) a PyTorchJob running ``torchrun -m metarec.training`` and waits.

    Needs a gs:// pipeline root (the job's pods read and write the artifacts in Cloud Storage
    themselves), a pipeline service account allowed to create, get, update and delete
    ``pytorchjobs.kubeflow.org`` in the run's namespace (manifests/pipeline-rbac) and the
    ``metarec-training`` service account there (manifests/training); see docs/cluster.md.

    Args:
        dataset: Preprocessed data set (output of the preprocess component); its URI must be gs://.
        model: Output model directory: the job writes it to the artifact's gs:// URI, the component then
            copies it into the local artifact path so the KFP launcher records the same files.
        image: Training image, fixed when the pipeline is compiled (``metarec.images.components_image``
            for the compile-time registry; the pod's own environment does not know it).
        method: Meta-learning method: ``maml``, ``fomaml`` or ``reptile``.
        config: JSON object with the ``train`` section of the run config; ``"{}"`` keeps the defaults.
        namespace: Namespace of the job; empty uses the namespace this step runs in.
        num_nodes: Pods in the job (one Master plus num_nodes - 1 Workers).
        gpus_per_node: GPUs per pod and torchrun processes per pod (0: CPU, one process).
        gpu_type: ``cloud.google.com/gke-accelerator`` node selector value (e.g. ``nvidia-l4``); empty: none.
        cpu_request: CPU request of each job pod.
        memory_request: Memory request of each job pod.
        service_account: Service account of the job pods (Workload Identity for GCS); empty: metarec-training.
        timeout_s: Seconds to wait for the job before deleting it and failing; the pipeline keeps it
            below the pod's deadline so that the deletion happens.
        poll_interval_s: Seconds between two job status reads.
        checkpoint_root: Durable ``gs://`` prefix for checkpoints; empty: the folder above the model
            artifact (never inside it). As in meta_train, the job checkpoints to
            ``<root>/checkpoints/<run_id>/<task_id>/<method>``: a retry resumes, another run or method
            never does.
        run_id: KFP run id (the backend fills it); with task_id it names the job and its checkpoints.
        task_id: KFP task id, kept by a retry: the retry adopts the job instead of starting a second one.
    """
    import json

    from metarec import storage
    from metarec.components.common import checkpoint_dir, parse_config
    from metarec.components.kube import current_namespace, launcher_pod
    from metarec.components.meta_train_pytorchjob.pytorchjob import (
        build_pytorchjob,
        job_name,
        owner_reference,
        submit_and_wait,
    )

    if not image:
        raise ValueError("image is empty: compile the pipeline with metarec compile (it names the image)")
    train = dict(parse_config(config, "train") or {})
    # Scoped like meta_train's: without it the job would checkpoint into the Model artifact (copied by
    # every downstream step) and a fixed train.checkpoint_dir would be shared by runs and methods.
    train["checkpoint_dir"] = checkpoint_dir(
        train.get("checkpoint_dir") or checkpoint_root, model.uri, run_id, task_id, method
    )
    job = build_pytorchjob(
        name=job_name(method, run_id, task_id),
        namespace=namespace or current_namespace(),
        image=image,
        method=method,
        preprocessed_uri=dataset.uri,
        output_uri=model.uri,
        train_config=train,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        gpu_type=gpu_type,
        cpu_request=cpu_request,
        memory_request=memory_request,
        service_account=service_account,
        active_deadline_s=timeout_s,
        owner=owner_reference(*launcher_pod()),
    )
    print(json.dumps(job["metadata"]), flush=True)
    submit_and_wait(job, timeout_s=timeout_s, poll_interval_s=poll_interval_s)
    # The launcher uploads model.path after this step: fill it with what the job wrote, so it stays.
    storage.download_dir(model.uri, model.path)
    model.metadata["method"] = method
    model.metadata["pytorchjob"] = job["metadata"]["name"]
