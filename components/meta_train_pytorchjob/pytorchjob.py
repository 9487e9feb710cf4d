"""Build, submit and watch a Kubeflow Training Operator PyTorchJob that meta-trains with torchrun.

The meta_train_pytorchjob component calls these inside its pod; they are plain functions so that the
job object can be tested against a fake API server. Safety: the job is named after the KFP run and task, so
a retried launcher adopts the job its previous attempt started instead of starting a second one; it is
owned by the launcher pod (deleting the run's pods deletes it), has a TTL after it finishes, deletes its
running pods on completion (``cleanPodPolicy: Running``) and is deleted when the launcher is terminated or
gives up waiting. The job runs ``torchrun -m metarec.training`` (the entry
point in docs/ARCHITECTURE.md) on ``num_nodes`` pods with ``gpus_per_node`` GPUs each; the Training
Operator sets the ``PET_*`` variables (nnodes, node rank, master address) that torchrun reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import signal
import time
from collections.abc import Callable

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the Training Operator finds the training container by this name
MAX_RESTARTS = 3  # torchrun restarts of the local worker group before the pod fails
DEFAULT_SERVICE_ACCOUNT = "metarec-training"  # manifests/training/serviceaccount.yaml (Workload Identity)
TERMINAL_CONDITIONS = ("Succeeded", "Failed")
ADOPT_ATTEMPTS = 5  # reads and updates of an adopted job when the operator's status writes race them
TTL_AFTER_FINISHED_S = 3600  # the finished job (and its logs) stays an hour for debugging, then goes
# Istio-injected profile namespaces would add a sidecar that never exits, so the pods never complete.
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}


class PyTorchJobError(RuntimeError):
    """The PyTorchJob failed, timed out or could not be created."""


def job_name(method: str, run_id: str, task_id: str) -> str:
    """Returns the job's name, the same for every attempt of one task of one run.

    Args:
        method: Meta-learning method (kept readable in the name).
        run_id: KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``).
        task_id: KFP task id (``dsl.PIPELINE_TASK_ID_PLACEHOLDER``): a retry keeps it.

    Returns:
        ``metarec-<method>-<hash of run and task>``, a valid Kubernetes name (at most 63 chars).

    Raises:
        ValueError: An id is empty (the job would not be unique to its run and task).
    """
    if not run_id or not task_id:
        raise ValueError(f"run_id and task_id are required to name the job, got {run_id!r} and {task_id!r}")
    digest = hashlib.sha256(f"{run_id}/{task_id}".encode()).hexdigest()[:12]
    prefix = re.sub(r"[^a-z0-9-]+", "-", f"metarec-{method}".lower()).strip("-")[:48].rstrip("-")
    return f"{prefix}-{digest}"


def owner_reference(pod_name: str, pod_uid: str) -> dict | None:
    """Returns an ownerReference to the launcher pod, or None outside a pod.

    Args:
        pod_name: The launcher pod's name (downward API ``metadata.name``).
        pod_uid: Its uid (downward API ``metadata.uid``).
    """
    if not pod_name or not pod_uid:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid,
            "controller": False, "blockOwnerDeletion": False}  # fmt: skip


def training_command(
    method: str, preprocessed_uri: str, output_uri: str, train_config: dict | None = None
) -> list[str]:
    """Returns the container command: torchrun on the training entry point, config as ``--set`` flags.

    Args:
        method: Meta-learning method.
        preprocessed_uri: ``gs://`` prefix of the preprocessed data set.
        output_uri: ``gs://`` prefix the model directory is written to.
        train_config: ``train`` section of the run config; each key becomes ``--set key=<JSON value>``
            (the entry point reads JSON first), so the job needs no config file.
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
    owner: dict | None = None,
    ttl_s: int = TTL_AFTER_FINISHED_S,
) -> dict:
    """Builds the PyTorchJob object (same shape as ``manifests/training/``).

    Args:
        name: Job name (see ``job_name``).
        namespace: Namespace to create it in.
        image: Training image (the components image holds the core package and torch).
        method: Meta-learning method: ``maml``, ``fomaml`` or ``reptile``.
        preprocessed_uri: ``gs://`` prefix of the preprocessed data set (pods read it themselves).
        output_uri: ``gs://`` prefix the model directory is written to by rank 0.
        train_config: ``train`` section of the run config (None: the training DEFAULTS); its
            ``checkpoint_dir``, when set, must be ``gs://`` too (the component always sets one).
        num_nodes: Pods in the job: one Master plus ``num_nodes - 1`` Workers.
        gpus_per_node: GPUs per pod, also torchrun's processes per node; 0 trains on CPU with one process.
        gpu_type: Value of the ``cloud.google.com/gke-accelerator`` node selector (empty: no selector).
        cpu_request: CPU request (and limit) of each pod.
        memory_request: Memory request (and limit) of each pod.
        service_account: Service account of the pods (Workload Identity for GCS); empty: ``metarec-training``
            (manifests/training/serviceaccount.yaml).
        backoff_limit: Pod restarts before the job is marked Failed (preemptions count as failures).
        active_deadline_s: Wall-clock limit of the job in seconds.
        owner: ownerReference to the launcher pod (see ``owner_reference``); None: no owner.
        ttl_s: Seconds a finished job is kept before the Training Operator deletes it.

    Returns:
        The PyTorchJob as a dict, ready for ``CustomObjectsApi.create_namespaced_custom_object``.

    Raises:
        ValueError: A count is out of range or a URI (data, model, checkpoints) is not ``gs://``.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be 0 or more, got {gpus_per_node}")
    root_hint = "run the pipeline with a gs:// pipeline_root so that artifacts live in Cloud Storage"
    uris = [("preprocessed data", preprocessed_uri, root_hint), ("model output", output_uri, root_hint)]
    if (train_config or {}).get("checkpoint_dir"):
        hint = "set checkpoint_root (or train.checkpoint_dir) to a gs:// prefix"
        uris.append(("checkpoint directory", str(train_config["checkpoint_dir"]), hint))
    for label, uri, hint in uris:
        if not uri.startswith("gs://"):
            raise ValueError(f"the PyTorchJob pods cannot reach the {label} at {uri!r}: {hint}")
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
            "template": {
                "metadata": {"labels": dict(labels), "annotations": dict(POD_ANNOTATIONS)},
                "spec": copy.deepcopy(pod_spec),
            },
        }

    replica_specs = {"Master": replica(1)}
    if num_nodes > 1:
        replica_specs["Worker"] = replica(num_nodes - 1)
    metadata: dict = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner:
        metadata["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(max(gpus_per_node, 1)),
            "runPolicy": {
                # Running: worker pods left after the master finished stop holding their GPUs.
                "cleanPodPolicy": "Running",
                "ttlSecondsAfterFinished": ttl_s,
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


class Terminated(Exception):
    """The launcher received SIGTERM (run cancelled, pod evicted or past its deadline)."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def _create_or_adopt(api, job: dict) -> dict:
    """Creates the job, or adopts the one a previous attempt of this task created.

    A job left Failed by the previous attempt is deleted and created again (the retry is meant to train
    again, resuming from its checkpoints); a running or succeeded one is adopted, with this pod added
    to its owners so that it outlives the previous attempt's pod.
    """
    from kubernetes.client.exceptions import ApiException

    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        print(f"created {KIND} {namespace}/{name}", flush=True)
        return created
    except ApiException as error:
        if error.status != 409:
            raise PyTorchJobError(f"could not create {KIND} {namespace}/{name}: {error.reason}") from error
    for attempt in range(ADOPT_ATTEMPTS):
        existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if job_state(existing) == "Failed":
            print(f"{KIND} {namespace}/{name} of a previous attempt failed: recreating it", flush=True)
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        owners = existing["metadata"].get("ownerReferences") or []
        new_owners = [o for o in job["metadata"].get("ownerReferences") or [] if o not in owners]
        if new_owners:
            existing["metadata"]["ownerReferences"] = owners + new_owners
            try:
                existing = api.replace_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, existing
                )
            except ApiException as error:
                # 409: the Training Operator wrote the job's status since the read (the update carries the
                # read's resourceVersion): read it again and retry.
                if error.status != 409 or attempt == ADOPT_ATTEMPTS - 1:
                    raise PyTorchJobError(
                        f"could not adopt {KIND} {namespace}/{name}: {error.reason}"
                    ) from error
                continue
        print(f"adopted {KIND} {namespace}/{name} started by a previous attempt", flush=True)
        return existing
    raise AssertionError("unreachable")  # the loop returns or raises


def submit_and_wait(
    job: dict,
    api=None,
    timeout_s: float = 86400,
    poll_interval_s: float = 30,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Creates (or adopts) the PyTorchJob and polls it until it succeeds or fails.

    The job is deleted when the wait times out or the process receives SIGTERM (KFP cancelling the run,
    an eviction, the pod's deadline): nobody would wait for it any more, and it would hold its GPUs.

    Args:
        job: The object from ``build_pytorchjob``.
        api: A ``kubernetes.client.CustomObjectsApi`` (None: see ``metarec.components.kube``).
        timeout_s: Seconds to wait before deleting the job and failing; keep it below the launcher
            pod's own deadline so that this deletion runs.
        poll_interval_s: Seconds between two status reads.
        sleep: Sleep function (tests pass a fake one).
        clock: Monotonic clock (tests pass a fake one).

    Returns:
        The final job object read back from the API server.

    Raises:
        PyTorchJobError: The job failed, did not finish within ``timeout_s``, or the launcher was
            terminated.
    """
    if api is None:
        from metarec.components.kube import custom_objects_api

        api = custom_objects_api()
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    deadline = clock() + timeout_s
    try:
        _create_or_adopt(api, job)
        while True:
            current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            state = job_state(current)
            if state == "Succeeded":
                print(f"{KIND} {namespace}/{name} succeeded", flush=True)
                return current
            if state == "Failed":
                raise PyTorchJobError(f"{KIND} {namespace}/{name} failed: {failure_message(current)}")
            if clock() >= deadline:
                api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                raise PyTorchJobError(
                    f"{KIND} {namespace}/{name} did not finish within {timeout_s:.0f} s; deleted it"
                )
            sleep(poll_interval_s)
    except Terminated as why:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        raise PyTorchJobError(f"launcher terminated ({why}): deleted {KIND} {namespace}/{name}") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
