"""Build, submit and watch a Kubeflow Training Operator PyTorchJob that meta-trains with torchrun.

The meta_train_pytorchjob component calls these inside its pod; they are plain functions so that the
job object can be tested without a cluster. The job runs ``torchrun -m metarec.training`` (the entry
point in docs/ARCHITECTURE.md) on ``num_nodes`` pods with ``gpus_per_node`` GPUs each; the Training
Operator sets the ``PET_*`` variables (nnodes, node rank, master address) that torchrun reads.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the Training Operator finds the training container by this name
MAX_RESTARTS = 3  # torchrun restarts of the local worker group before the pod fails
DEFAULT_SERVICE_ACCOUNT = "metarec-training"  # manifests/training/serviceaccount.yaml (Workload Identity)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TERMINAL_CONDITIONS = ("Succeeded", "Failed")


class PyTorchJobError(RuntimeError):
    """The PyTorchJob failed, timed out or could not be created."""


def job_name(method: str, suffix: str) -> str:
    """Returns a valid Kubernetes name ``metarec-<method>-<suffix>`` (lower case, at most 63 chars).

    Args:
        method: Meta-learning method.
        suffix: Unique part, e.g. a short random hex string.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", f"metarec-{method}-{suffix}".lower()).strip("-")
    return name[:63].rstrip("-")


def training_command(
    method: str, preprocessed_uri: str, output_uri: str, train_config: dict | None = None
) -> list[str]:
    """Returns the container command: torchrun on the training entry point, config as ``--set`` flags.

    Args:
        method: Meta-learning method.
        preprocessed_uri: ``gs://`` prefix of the preprocessed data set.
        output_uri: ``gs://`` prefix the model directory is written to (checkpoints too, for resuming).
        train_config: ``train`` section of the run config; each key becomes ``--set key=<JSON value>``
            (JSON is valid YAML, which the entry point parses), so the job needs no config file.
    """
    command = ["torchrun", f"--max-restarts={MAX_RESTARTS}", "-m", "metarec.training",
               "--preprocessed", preprocessed_uri, "--method", method, "--output", output_uri]  # fmt: skip
    for key, value in sorted((train_config or {}).items()):
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def build_pytorchjob(
    name: str,
    namespace: str,
    image: str,
    method: str,
    preprocessed_uri: str,
    output_uri: str,
    train_config: dict | None = None,
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    gpu_type: str = "",
    cpu_request: str = "4",
    memory_request: str = "16Gi",
    service_account: str = "",
    backoff_limit: int = 6,
    active_deadline_s: int = 86400,
) -> dict:
    """Builds the PyTorchJob object (same shape as ``manifests/training/``).

    Args:
        name: Job name (see ``job_name``).
        namespace: Namespace to create it in.
        image: Training image (the components image holds the core package and torch).
        method: Meta-learning method: ``maml``, ``fomaml`` or ``reptile``.
        preprocessed_uri: ``gs://`` prefix of the preprocessed data set (pods read it themselves).
        output_uri: ``gs://`` prefix the model directory is written to by rank 0.
        train_config: ``train`` section of the run config (None: the training DEFAULTS).
        num_nodes: Pods in the job: one Master plus ``num_nodes - 1`` Workers.
        gpus_per_node: GPUs per pod, also torchrun's processes per node; 0 trains on CPU with one process.
        gpu_type: Value of the ``cloud.google.com/gke-accelerator`` node selector (empty: no selector).
        cpu_request: CPU request (and limit) of each pod.
        memory_request: Memory request (and limit) of each pod.
        service_account: Service account of the pods (Workload Identity for GCS); empty: ``metarec-training``
            (manifests/training/serviceaccount.yaml).
        backoff_limit: Pod restarts before the job is marked Failed (preemptions count as failures).
        active_deadline_s: Wall-clock limit of the job in seconds.

    Returns:
        The PyTorchJob as a dict, ready for ``CustomObjectsApi.create_namespaced_custom_object``.

    Raises:
        ValueError: A count is out of range or a URI is not ``gs://``.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be 0 or more, got {gpus_per_node}")
    for label, uri in (("preprocessed data", preprocessed_uri), ("model output", output_uri)):
        if not uri.startswith("gs://"):
            raise ValueError(
                f"the PyTorchJob pods cannot reach the {label} at {uri!r}: run the pipeline with a gs:// "
                f"pipeline_root so that artifacts live in Cloud Storage"
            )
    requests: dict[str, str | int] = {"cpu": cpu_request, "memory": memory_request}
    if gpus_per_node:
        requests["nvidia.com/gpu"] = gpus_per_node
    container = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        # The Training Operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT and PET_NPROC_PER_NODE
        # (from nprocPerNode); torchrun reads them. Training resumes from its checkpoints after a restart.
        "command": training_command(method, preprocessed_uri, output_uri, train_config),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "NCCL_DEBUG", "value": "WARN"}],
        "resources": {"requests": dict(requests), "limits": dict(requests)},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},  # checkpoints staged locally, caches, rendezvous files
            {"name": "dshm", "mountPath": "/dev/shm"},  # NCCL needs more than the 64 MiB default
        ],
    }
    pod_spec: dict = {
        "serviceAccountName": service_account or DEFAULT_SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }
    if gpus_per_node:
        pod_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            # Spot GPU pools carry this taint; a preempted pod restarts from the last checkpoint.
            {
                "key": "cloud.google.com/gke-spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoSchedule",
            },
        ]
        if gpu_type:
            pod_spec["nodeSelector"] = {"cloud.google.com/gke-accelerator": gpu_type}
    labels = {"app.kubernetes.io/name": "metarec-training", "app.kubernetes.io/component": "meta-train",
              "metarec/method": method}  # fmt: skip

    def replica(replicas: int) -> dict:
        return {
            "replicas": replicas,
            "restartPolicy": "OnFailure",
            "template": {"metadata": {"labels": dict(labels)}, "spec": copy.deepcopy(pod_spec)},
        }

    replica_specs = {"Master": replica(1)}
    if num_nodes > 1:
        replica_specs["Worker"] = replica(num_nodes - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "nprocPerNode": str(max(gpus_per_node, 1)),
            "runPolicy": {
                "cleanPodPolicy": "None",
                "backoffLimit": backoff_limit,
                "activeDeadlineSeconds": active_deadline_s,
            },
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def job_state(job: dict) -> str | None:
    """Returns ``"Succeeded"`` or ``"Failed"`` when the job reached that condition, else None.

    Args:
        job: The PyTorchJob as read back from the API server.
    """
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in TERMINAL_CONDITIONS and str(condition.get("status")) == "True":
            return condition["type"]
    return None


def failure_message(job: dict) -> str:
    """Returns the message of the job's Failed condition (or a generic one).

    Args:
        job: The PyTorchJob as read back from the API server.
    """
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed":
            return condition.get("message") or condition.get("reason") or "no message"
    return "no message"


def current_namespace(default: str = "kubeflow") -> str:
    """Returns the namespace of the pod this runs in (service account mount), or ``default``.

    Args:
        default: Namespace used outside a cluster.
    """
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return default


def submit_and_wait(
    job: dict,
    api=None,
    timeout_s: float = 86400,
    poll_interval_s: float = 30,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Creates the PyTorchJob and polls it until it succeeds or fails.

    Args:
        job: The object from ``build_pytorchjob``.
        api: A ``kubernetes.client.CustomObjectsApi`` (None: built from the in-cluster config).
        timeout_s: Seconds to wait before deleting the job and failing.
        poll_interval_s: Seconds between two status reads.
        sleep: Sleep function (tests pass a fake one).
        clock: Monotonic clock (tests pass a fake one).

    Returns:
        The final job object read back from the API server.

    Raises:
        PyTorchJobError: The job failed or did not finish within ``timeout_s``.
    """
    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    print(f"created {KIND} {namespace}/{name}", flush=True)
    deadline = clock() + timeout_s
    while True:
        current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state = job_state(current)
        if state == "Succeeded":
            print(f"{KIND} {namespace}/{name} succeeded", flush=True)
            return current
        if state == "Failed":
            raise PyTorchJobError(f"{KIND} {namespace}/{name} failed: {failure_message(current)}")
        if clock() >= deadline:
            # Free the GPUs: a job nobody waits for any more would hold them until its own deadline.
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            raise PyTorchJobError(
                f"{KIND} {namespace}/{name} did not finish within {timeout_s:.0f} s; deleted it"
            )
        sleep(poll_interval_s)
