"""KFP component: meta-train on several GPUs/nodes through a Kubeflow Training Operator PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def meta_train_pytorchjob(
    dataset: Input[Dataset],
    model: Output[Model],
    method: str = "maml",
    config: str = "{}",
    image: str = "",
    namespace: str = "",
    num_nodes: int = 2,
    gpus_per_node: int = 1,
    gpu_type: str = "",
    cpu_request: str = "4",
    memory_request: str = "16Gi",
    service_account: str = "",
    timeout_s: int = 86400,
    poll_interval_s: int = 30,
):
    """Submits a PyTorchJob running ``torchrun -m metarec.training`` and waits for it to finish.

    Needs a gs:// pipeline root (the job's pods read and write the artifacts in Cloud Storage
    themselves) and a pipeline service account allowed to create and get ``pytorchjobs.kubeflow.org``
    in ``namespace`` (see docs/pipeline.md).

    Args:
        dataset: Preprocessed data set (output of the preprocess component); its URI must be gs://.
        model: Output model directory: the job writes it to the artifact's gs:// URI, the component then
            copies it into the local artifact path so the KFP launcher records the same files.
        method: Meta-learning method: ``maml``, ``fomaml`` or ``reptile``.
        config: JSON object with the ``train`` section of the run config; ``"{}"`` keeps the defaults.
        image: Training image; empty uses the MetaRec components image of this release.
        namespace: Namespace of the job; empty uses the namespace this step runs in.
        num_nodes: Pods in the job (one Master plus num_nodes - 1 Workers).
        gpus_per_node: GPUs per pod and torchrun processes per pod (0: CPU, one process).
        gpu_type: ``cloud.google.com/gke-accelerator`` node selector value (e.g. ``nvidia-l4``); empty: none.
        cpu_request: CPU request of each job pod.
        memory_request: Memory request of each job pod.
        service_account: Service account of the job pods (Workload Identity for GCS); empty: metarec-training.
        timeout_s: Seconds to wait for the job before deleting it and failing.
        poll_interval_s: Seconds between two job status reads.
    """
    import json
    import uuid

    from metarec import storage
    from metarec.components.common import parse_config
    from metarec.components.meta_train_pytorchjob.pytorchjob import (
        build_pytorchjob,
        current_namespace,
        job_name,
        submit_and_wait,
    )
    from metarec.images import components_image

    job = build_pytorchjob(
        name=job_name(method, uuid.uuid4().hex[:8]),
        namespace=namespace or current_namespace(),
        image=image or components_image(),
        method=method,
        preprocessed_uri=dataset.uri,
        output_uri=model.uri,
        train_config=parse_config(config, "train"),
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        gpu_type=gpu_type,
        cpu_request=cpu_request,
        memory_request=memory_request,
        service_account=service_account,
        active_deadline_s=timeout_s,
    )
    print(json.dumps(job["metadata"]), flush=True)
    submit_and_wait(job, timeout_s=timeout_s, poll_interval_s=poll_interval_s)
    # The launcher uploads model.path after this step: fill it with what the job wrote, so it stays.
    storage.download_dir(model.uri, model.path)
    model.metadata["method"] = method
    model.metadata["pytorchjob"] = job["metadata"]["name"]
