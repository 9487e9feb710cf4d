"""The PyTorchJob launcher: the job object, and submission against a fake Kubernetes API server (retry
adoption, cancellation, timeout)."""

import json
import os
import signal

import pytest
import yaml
from fake_kube import PYTORCHJOBS, condition_status

from metarec.components.meta_train_pytorchjob import pytorchjob


def _job(**overrides):
    arguments = dict(
        name="metarec-maml-abc",
        namespace="team",
        image="registry/metarec-components:1",
        method="maml",
        preprocessed_uri="gs://bucket/pre",
        output_uri="gs://bucket/model",
        train_config={"meta_steps": 200, "hidden": [64, 32]},
        num_nodes=3,
        gpus_per_node=2,
        gpu_type="nvidia-l4",
    )
    arguments.update(overrides)
    return pytorchjob.build_pytorchjob(**arguments)


def test_pytorchjob_has_master_workers_torchrun_and_gpu_scheduling():
    job = _job()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"]["namespace"] == "team"
    assert job["spec"]["nprocPerNode"] == "2"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["image"] == "registry/metarec-components:1"
        command = container["command"]
        assert command[0] == "torchrun" and command[command.index("-m") + 1] == "metarec.training"
        assert command[command.index("--preprocessed") + 1] == "gs://bucket/pre"
        assert command[command.index("--output") + 1] == "gs://bucket/model"
        assert "meta_steps=200" in command and "hidden=[64, 32]" in command
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["serviceAccountName"] == pytorchjob.DEFAULT_SERVICE_ACCOUNT


def test_pytorchjob_matches_the_shape_of_the_training_manifest(repo_root):
    manifest = repo_root / "manifests" / "training-example" / "pytorchjob.yaml"
    reference = yaml.safe_load(manifest.read_text())
    job = _job(num_nodes=2)
    assert job["apiVersion"] == reference["apiVersion"] and job["kind"] == reference["kind"]
    assert set(job["spec"]["pytorchReplicaSpecs"]) == set(reference["spec"]["pytorchReplicaSpecs"])
    ours = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    theirs = reference["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert set(theirs) <= set(ours), f"missing pod settings: {set(theirs) - set(ours)}"
    assert ours["containers"][0]["name"] == theirs["containers"][0]["name"]


def test_pytorchjob_on_cpu_has_no_gpu_settings_and_one_pod():
    job = _job(num_nodes=1, gpus_per_node=0, gpu_type="nvidia-l4")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert job["spec"]["nprocPerNode"] == "1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"preprocessed_uri": "/tmp/pre"}, "gs:// pipeline_root"),
        ({"num_nodes": 0}, "num_nodes"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
    ],
)
def test_pytorchjob_refuses_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        _job(**overrides)


def test_the_entry_point_reads_back_every_setting_the_command_writes():
    from metarec.training import parse_override

    config = {"weight_decay": 1e-5, "outer_lr": 0.001, "meta_steps": 200, "hidden": [64, 32],
              "freeze": ["encoder"], "checkpoint_dir": "gs://b/c", "id_dropout": 0.0, "averaging": None,
              "tag": "1e-05", "flag": True}  # fmt: skip
    command = pytorchjob.training_command("maml", "gs://b/pre", "gs://b/model", config)
    flags = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    parsed = {key: parse_override(value) for key, _, value in (flag.partition("=") for flag in flags)}
    assert parsed == config  # YAML alone read 1e-05 (json.dumps(1e-5)) back as the string "1e-05"


def test_job_name_is_stable_per_task_and_valid():
    name = pytorchjob.job_name("MAML_v2", "run-" + "x" * 80, "task-1")
    assert len(name) <= 63 and name == name.lower() and not name.endswith("-")
    assert name.startswith("metarec-maml-v2-")
    # A retry keeps the run and task ids, so it finds the job its first attempt started.
    assert name == pytorchjob.job_name("MAML_v2", "run-" + "x" * 80, "task-1")
    assert name != pytorchjob.job_name("MAML_v2", "run-" + "x" * 80, "task-2")
    with pytest.raises(ValueError, match="run_id and task_id"):
        pytorchjob.job_name("maml", "", "task-1")


def test_pytorchjob_is_owned_cleaned_up_and_kept_out_of_istio():
    owner = pytorchjob.owner_reference("launcher-pod", "uid-1")
    job = _job(owner=owner)
    assert job["metadata"]["ownerReferences"] == [owner]
    assert owner["kind"] == "Pod" and owner["uid"] == "uid-1"
    policy = job["spec"]["runPolicy"]
    assert policy["cleanPodPolicy"] == "Running"
    assert policy["ttlSecondsAfterFinished"] > 0
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pytorchjob.owner_reference("", "") is None


# ---------------------------------------------------------------------------------------------------
# Submission against a fake API server, through the real kubernetes client

JOBS = PYTORCHJOBS.format(namespace="team")


def _api():
    from metarec.components.kube import custom_objects_api

    return custom_objects_api()


def _finish_after(reads: int, state: str):
    """A controller stand-in: the job reaches ``state`` after ``reads`` status reads (counted by sleeps)."""
    calls = []

    def sleep(_seconds, kube):
        calls.append(1)
        if len(calls) >= reads:
            kube.set_status(JOBS, "metarec-maml-abc", condition_status(state, f"job {state.lower()}"))

    return sleep


def test_submit_and_wait_returns_when_succeeded(kube):
    finish = _finish_after(2, "Succeeded")
    final = pytorchjob.submit_and_wait(_job(), api=_api(), poll_interval_s=0, sleep=lambda s: finish(s, kube))
    assert pytorchjob.job_state(final) == "Succeeded"
    assert [entry for entry in kube.log if entry[0] == "POST"] == [("POST", JOBS, "")]


def test_submit_and_wait_raises_with_the_failure_message(kube):
    finish = _finish_after(1, "Failed")
    with pytest.raises(pytorchjob.PyTorchJobError, match="failed: job failed"):
        pytorchjob.submit_and_wait(_job(), api=_api(), poll_interval_s=0, sleep=lambda s: finish(s, kube))


def test_timeout_deletes_the_job(kube):
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(pytorchjob.PyTorchJobError, match="did not finish"):
        pytorchjob.submit_and_wait(_job(), api=_api(), timeout_s=60, poll_interval_s=30, sleep=sleep,
                                   clock=lambda: now[0])  # fmt: skip
    assert kube.get(JOBS, "metarec-maml-abc") is None
    assert ("DELETE", JOBS, "metarec-maml-abc") in kube.log


def test_sigterm_deletes_the_job(kube):
    """KFP cancelling the run (or an eviction) sends SIGTERM to the launcher: the job must go too."""

    def sleep(_seconds):
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(pytorchjob.PyTorchJobError, match="terminated"):
        pytorchjob.submit_and_wait(_job(), api=_api(), poll_interval_s=0, sleep=sleep)
    assert kube.get(JOBS, "metarec-maml-abc") is None
    assert signal.getsignal(signal.SIGTERM) is previous


def test_retry_adopts_the_running_job_and_adds_itself_as_owner(kube):
    first = _job(owner=pytorchjob.owner_reference("attempt-1", "uid-1"))
    kube.put(JOBS, first)
    kube.set_status(JOBS, "metarec-maml-abc", condition_status("Running"))
    retry = _job(owner=pytorchjob.owner_reference("attempt-2", "uid-2"))
    finish = _finish_after(1, "Succeeded")
    pytorchjob.submit_and_wait(retry, api=_api(), poll_interval_s=0, sleep=lambda s: finish(s, kube))
    creates = [entry for entry in kube.log if entry[0] == "POST"]
    assert len(creates) == 1  # the retry's create hit 409, and no second job was made
    assert ("DELETE", JOBS, "metarec-maml-abc") not in kube.log
    owners = [o["uid"] for o in kube.get(JOBS, "metarec-maml-abc")["metadata"]["ownerReferences"]]
    assert owners == ["uid-1", "uid-2"]  # the first attempt's pod going away no longer deletes it


def test_retry_adopts_the_job_when_the_operator_writes_its_status_meanwhile(kube):
    """The Training Operator updates a running job's status at any time, which moves its resourceVersion:
    the retry's update (adding its owner) is then refused with 409 Conflict, as by a real API server, and
    must be redone on a fresh read instead of failing the task."""
    kube.put(JOBS, _job(owner=pytorchjob.owner_reference("attempt-1", "uid-1")))
    kube.set_status(JOBS, "metarec-maml-abc", condition_status("Running"))
    api = _api()
    real_get, reads = api.get_namespaced_custom_object, []

    def get_then_operator_writes(*args, **kwargs):
        found = real_get(*args, **kwargs)
        reads.append(1)
        if len(reads) == 1:  # between the retry's read and its update
            kube.set_status(JOBS, "metarec-maml-abc", condition_status("Running", "pods running"))
        return found

    api.get_namespaced_custom_object = get_then_operator_writes
    finish = _finish_after(1, "Succeeded")
    retry = _job(owner=pytorchjob.owner_reference("attempt-2", "uid-2"))
    pytorchjob.submit_and_wait(retry, api=api, poll_interval_s=0, sleep=lambda s: finish(s, kube))
    assert [entry[0] for entry in kube.log].count("PUT") == 2  # refused once, then made on a fresh read
    owners = [o["uid"] for o in kube.get(JOBS, "metarec-maml-abc")["metadata"]["ownerReferences"]]
    assert owners == ["uid-1", "uid-2"]


def test_retry_after_a_failed_job_starts_it_again(kube):
    kube.put(JOBS, _job())
    kube.set_status(JOBS, "metarec-maml-abc", condition_status("Failed"))
    finish = _finish_after(1, "Succeeded")
    pytorchjob.submit_and_wait(_job(), api=_api(), poll_interval_s=0, sleep=lambda s: finish(s, kube))
    assert ("DELETE", JOBS, "metarec-maml-abc") in kube.log
    assert pytorchjob.job_state(kube.get(JOBS, "metarec-maml-abc")) == "Succeeded"


# ---------------------------------------------------------------------------------------------------
# The component body: the job it submits checkpoints where meta_train would, never into the Model


class _Artifact:
    def __init__(self, uri: str, path: str = ""):
        self.uri, self.path, self.metadata = uri, path, {}


def _run_component(kube, bucket: str, tmp_path, run_id: str, method: str = "maml", **parameters) -> list[str]:
    """Runs meta_train_pytorchjob's body against the fake API server; the stand-in Training Operator
    writes the model and marks the job Succeeded. Returns the job's torchrun command."""
    from metarec import storage
    from metarec.components.meta_train_pytorchjob.component import meta_train_pytorchjob

    model_uri = f"gs://{bucket}/root/pipe/{run_id}/meta-train-pytorchjob/model"

    def operator(fake, collection, job):
        if collection == JOBS and "status" not in job:
            storage.write_bytes(f"{model_uri}/model.json", b"{}")
            job["status"] = condition_status("Succeeded")

    kube.controller = operator
    model = _Artifact(model_uri, str(tmp_path / run_id / method / "model"))
    meta_train_pytorchjob.python_func(
        dataset=_Artifact(f"gs://{bucket}/root/pipe/{run_id}/preprocess/dataset"), model=model,
        image="registry/metarec-components:1", method=method, namespace="team", poll_interval_s=0,
        run_id=run_id, task_id="task-7", **parameters,
    )  # fmt: skip
    (job,) = [kube.get(JOBS, name) for collection, name in list(kube.objects) if collection == JOBS]
    kube.objects.clear()
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]


def _checkpoint_dir(command: list[str]) -> str:
    (value,) = [flag.partition("=")[2] for flag in command if flag.startswith("checkpoint_dir=")]
    return json.loads(value)


def test_job_checkpoints_under_the_root_per_run_task_and_method(kube, gcs_bucket, tmp_path):
    root = f"gs://{gcs_bucket}/durable"
    seen = set()
    for run_id in ("run-a", "run-b"):
        for method in ("maml", "fomaml"):
            command = _run_component(kube, gcs_bucket, tmp_path, run_id, method, checkpoint_root=root)
            directory = _checkpoint_dir(command)
            assert directory == f"{root}/checkpoints/{run_id}/task-7/{method}"
            seen.add(directory)
    assert len(seen) == 4  # no run or method resumes another's checkpoints
    # A fixed train.checkpoint_dir is a root too, not a directory shared by every run.
    fixed = json.dumps({"checkpoint_dir": f"{root}/fixed"})
    command = _run_component(kube, gcs_bucket, tmp_path, "run-c", config=fixed)
    assert _checkpoint_dir(command) == f"{root}/fixed/checkpoints/run-c/task-7/maml"


def test_job_without_a_root_checkpoints_beside_the_model_not_inside_it(kube, gcs_bucket, tmp_path):
    command = _run_component(kube, gcs_bucket, tmp_path, "run-a")
    model_uri = command[command.index("--output") + 1]
    directory = _checkpoint_dir(command)
    assert not directory.startswith(model_uri + "/")  # evaluate / select_model would copy them along
    assert directory == model_uri.rsplit("/", 1)[0] + "/checkpoints/run-a/task-7/maml"


def test_pytorchjob_refuses_a_checkpoint_directory_its_pods_cannot_reach():
    with pytest.raises(ValueError, match="checkpoint directory.*checkpoint_root"):
        _job(train_config={"checkpoint_dir": "/tmp/ckpt"})


def test_job_state_reads_only_conditions_that_hold():
    """The operator keeps conditions it no longer holds true with status "False" (e.g. Running after the
    job ended): only a True Succeeded or Failed condition ends the wait."""
    running = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                         {"type": "Failed", "status": "False"},
                                         {"type": "Running", "status": "True"}]}}  # fmt: skip
    assert pytorchjob.job_state(running) is None
    done = {"status": {"conditions": [{"type": "Running", "status": "False"},
                                      {"type": "Succeeded", "status": "True"}]}}  # fmt: skip
    assert pytorchjob.job_state(done) == "Succeeded"
    assert pytorchjob.job_state({}) is None


def _operator_env(job: dict, role: str, index: int) -> dict[str, str]:
    """The env the Training Operator (v1.7+) adds to each container of a replica pod: setPodEnv in
    kubeflow/trainer pkg/controller.v1/pytorch/envvar.go and master.go, for a job without elasticPolicy."""
    replicas = job["spec"]["pytorchReplicaSpecs"]
    total = sum(r["replicas"] for r in replicas.values())
    nproc = job["spec"]["nprocPerNode"]
    rank = index + (1 if role == "Worker" else 0)
    master = f"{job['metadata']['name']}-master-0"
    return {"PYTHONUNBUFFERED": "0", "MASTER_PORT": "23456", "PET_MASTER_PORT": "23456",
            "MASTER_ADDR": master, "PET_MASTER_ADDR": master, "WORLD_SIZE": str(total * int(nproc)),
            "RANK": str(rank), "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": str(rank),
            "PET_NNODES": str(total)}  # fmt: skip


@pytest.mark.parametrize("gpus", [2, 0])
def test_torchrun_reads_the_topology_from_the_env_the_operator_sets(gpus, monkeypatch):
    """Every pod's torchrun sees all pods as nodes of one group (nnodes, its own node rank, the master's
    address) and runs gpus_per_node processes (one on CPU): its flags come from PET_* variables only."""
    from torch.distributed.run import parse_args

    job = _job(num_nodes=3, gpus_per_node=gpus)
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        for index in range(replica["replicas"]):
            (container,) = replica["template"]["spec"]["containers"]
            for key in [k for k in os.environ if k.startswith("PET_")]:
                monkeypatch.delenv(key)
            for key, value in _operator_env(job, role, index).items():
                monkeypatch.setenv(key, value)
            args = parse_args(container["command"][1:])
            assert args.nnodes == "3"
            assert args.node_rank == (0 if role == "Master" else index + 1)
            assert args.nproc_per_node == str(max(gpus, 1))
            assert args.master_addr == "metarec-maml-abc-master-0"
            assert args.module and args.training_script == "metarec.training"


def test_metadata_names_the_training_operator_that_sets_the_torchrun_env():
    """spec.nprocPerNode and the PET_NNODES/PET_NODE_RANK/PET_NPROC_PER_NODE variables without an
    elasticPolicy came with Training Operator v1.7.0 (kubeflow/trainer#1840). An older operator prunes
    nprocPerNode and sets none of them: torchrun then defaults to one node at 127.0.0.1, and every pod
    trains alone as rank 0, each writing the model."""
    import re
    from pathlib import Path

    metadata = yaml.safe_load((Path(pytorchjob.__file__).parent / "metadata.yaml").read_text())
    (trainer,) = [dep for dep in metadata["dependencies"]["kubeflow"] if dep["name"] == "Trainer"]
    minimum = re.fullmatch(r">=(\d+)\.(\d+)\.\d+", trainer["version"])
    assert minimum and (int(minimum.group(1)), int(minimum.group(2))) >= (1, 7)
    assert "nprocPerNode" in _job()["spec"] and "elasticPolicy" not in _job()["spec"]
