"""meta_train's compiled container command, killed mid-training and run again with the same executor input
(a KFP retry): it resumes from its own checkpoints and ends with the weights of an uninterrupted run; a
different run never picks those checkpoints up."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from metarec.components.build import compiled_command

from metarec.preprocessing import run_preprocessing

TRAIN = {"meta_steps": 60, "meta_batch": 4, "val_every": 0, "checkpoint_every": 5, "log_every": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "dataset"
    run_preprocessing("synthetic:tiny", None, None, str(out))
    return out


def _executor_input(dataset: Path, root: Path, run_id: str, task_id: str = "task-1") -> dict:
    def artifact(name, title, uri, metadata=None):
        return {
            "artifacts": [
                {"name": name, "type": {"schemaTitle": title}, "uri": str(uri), "metadata": metadata or {}}
            ]
        }

    return {
        "inputs": {
            "parameterValues": {"method": "maml", "config": json.dumps(TRAIN), "device": "cpu", "cpu_threads": 1,
                                "checkpoint_root": str(root), "run_id": run_id, "task_id": task_id},
            "artifacts": {"dataset": artifact("dataset", "system.Dataset", dataset)},
        },
        "outputs": {
            "artifacts": {"model": artifact("model", "system.Model", root / run_id / "model"),
                          "metrics": artifact("metrics", "system.Metrics", root / run_id / "metrics")},
            "outputFile": str(root / run_id / "executor_output.json"),
        },
    }  # fmt: skip


def _start(executor_input: dict, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    Path(executor_input["outputs"]["outputFile"]).parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(compiled_command("meta_train", executor_input), cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _weights(model_dir: Path) -> dict:
    state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=False)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _checkpoints(root: Path, run_id: str) -> list[Path]:
    return sorted((root / "checkpoints" / run_id / "task-1" / "maml").glob("ckpt-*.pt"))


@pytest.mark.slow
def test_killed_task_resumes_and_matches_an_uninterrupted_run(dataset, tmp_path):
    root = tmp_path / "root"
    reference = _start(_executor_input(dataset, root, "run-ref"), tmp_path)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    interrupted_input = _executor_input(dataset, root, "run-a")
    first = _start(interrupted_input, tmp_path)
    deadline = time.monotonic() + 240
    while not _checkpoints(root, "run-a") and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # a preempted node: no chance to clean up
    first.wait()
    saved = _checkpoints(root, "run-a")
    assert saved, "no checkpoint was written before the kill"
    assert not (root / "run-a" / "model" / "model.pt").exists(), "the run finished before it was killed"

    retry = _start(interrupted_input, tmp_path)  # same executor input: same run and task ids
    output = retry.communicate(timeout=300)[0]
    assert retry.returncode == 0, output
    assert '"event": "resumed"' in output

    ours, theirs = _weights(root / "run-a" / "model"), _weights(root / "run-ref" / "model")
    assert ours.keys() == theirs.keys()
    for name in ours:
        if isinstance(ours[name], torch.Tensor):
            assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.slow
def test_another_run_never_resumes_a_finished_runs_checkpoints(dataset, tmp_path):
    root = tmp_path / "root"
    for run_id in ("run-1", "run-2"):
        done = _start(_executor_input(dataset, root, run_id), tmp_path)
        output = done.communicate(timeout=300)[0]
        assert done.returncode == 0, output
        assert '"event": "resumed"' not in output, f"{run_id} resumed someone else's checkpoint"
    assert _checkpoints(root, "run-1") and _checkpoints(root, "run-2")
