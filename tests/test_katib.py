"""The Katib Experiment over meta-training (a custom resource: no schema offline, so checked structurally).

It must search :data:`metarec.tuning.SEARCH_SPACE`, hand every parameter to the trial command, run the
code the meta_train component runs, meet the project's pod hardening baseline, and its metrics collector
must read the validation metrics out of what ``python -m metarec.training`` really prints. Its trial image
is retargeted like every other manifest's: by ``images:`` in its kustomization or in an overlay.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_manifests import hardening_problems  # the one hardening baseline of the project's pods

from metarec import images
from metarec.tuning import OBJECTIVES, SEARCH_SPACE

EXPERIMENT = Path(__file__).resolve().parents[1] / "manifests" / "katib" / "experiment.yaml"
KATIB_TYPES = {"log": "double", "float": "double", "int": "int", "choice": "categorical"}


@pytest.fixture(scope="module")
def experiment() -> dict:
    return yaml.safe_load(EXPERIMENT.read_text())


def _container(experiment: dict) -> dict:
    pod = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
    (container,) = [
        c
        for c in pod["containers"]
        if c["name"] == experiment["spec"]["trialTemplate"]["primaryContainerName"]
    ]
    return container


def _rendered_experiment(folder: Path) -> dict:
    """The Experiment of a kustomization, rendered with ``kubectl kustomize`` (offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render the manifests")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    (experiment,) = [doc for doc in yaml.safe_load_all(done.stdout) if doc and doc["kind"] == "Experiment"]
    return experiment


def _sets(command: list[str]) -> dict[str, str]:
    return dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--set")


def test_experiment_searches_the_tuning_space(experiment):
    assert experiment["apiVersion"] == "kubeflow.org/v1beta1" and experiment["kind"] == "Experiment"
    parameters = {p["name"]: p for p in experiment["spec"]["parameters"]}
    assert set(parameters) == set(SEARCH_SPACE)
    for name, (kind, spec) in SEARCH_SPACE.items():
        parameter = parameters[name]
        assert parameter["parameterType"] == KATIB_TYPES[kind], name
        space = parameter["feasibleSpace"]
        if kind == "choice":
            assert space["list"] == [str(value) for value in spec], name
        else:
            assert (float(space["min"]), float(space["max"])) == spec, name
            assert space.get("distribution", "uniform") == ("logUniform" if kind == "log" else "uniform"), (
                name
            )


def test_every_parameter_reaches_the_training_command(experiment):
    template = experiment["spec"]["trialTemplate"]
    references = {t["name"]: t["reference"] for t in template["trialParameters"]}
    assert set(references.values()) == set(SEARCH_SPACE)
    container = _container(experiment)
    command = container["command"]
    assert command[:3] == ["python", "-m", "metarec.training"]  # the meta_train component's code
    assert "--no-resume" in command
    sets = _sets(command)
    for placeholder, name in references.items():
        assert sets[name] == f"${{trialParameters.{placeholder}}}", name


def test_the_kustomization_runs_the_trials_in_the_release_components_image(monkeypatch):
    # Trials train on CPU: the CPU build, tagged with the package version, as the pipeline's steps.
    monkeypatch.delenv("METAREC_REGISTRY", raising=False)
    assert _container(_rendered_experiment(EXPERIMENT.parent))["image"] == images.components_image()


def test_an_images_override_in_an_overlay_retargets_the_trial_image(tmp_path, monkeypatch):
    """A platform team's overlay names its registry once in ``images:``, as for the other manifests (the
    trial image used to be a literal in experiment.yaml, applied with ``-f`` and edited by hand)."""
    monkeypatch.delenv("METAREC_REGISTRY", raising=False)
    shutil.copytree(EXPERIMENT.parent, tmp_path / "katib")
    released = images.components_image().rsplit(":", 1)[0]
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../katib"],
        "images": [{"name": released, "newName": "reg.example/team/metarec-components", "newTag": "9.9.9"}],
    }
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    retargeted = _rendered_experiment(tmp_path / "overlay")
    assert _container(retargeted)["image"] == "reg.example/team/metarec-components:9.9.9"
    # Only the image changed: the trial still runs the same command.
    assert (
        _container(retargeted)["command"] == _container(_rendered_experiment(tmp_path / "katib"))["command"]
    )


def test_trial_pod_meets_the_hardening_baseline(experiment):
    pod = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
    assert hardening_problems(pod, "Katib trial") == []


@pytest.mark.slow
def test_metrics_collector_reads_what_training_prints(experiment, tmp_path, capsys):
    """Run the trial command's entry point on tiny data and parse its output with the collector's regex."""
    from metarec.preprocessing import run_preprocessing
    from metarec.training import main

    objective = experiment["spec"]["objective"]
    assert (objective["objectiveMetricName"], objective["type"]) == OBJECTIVES["ndcg@3"]
    assert objective["additionalMetricNames"] == [OBJECTIVES["mae"][0]]
    run_preprocessing("synthetic:tiny", None, None, str(tmp_path / "pre"))
    sets = {k: v for k, v in _sets(_container(experiment)["command"]).items() if "${" not in v}
    argv = ["--preprocessed", str(tmp_path / "pre"), "--method", "reptile", "--output", str(tmp_path / "model"),
            "--no-resume", "--set", "meta_steps=3", "--set", "val_every=0"]  # fmt: skip
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    (pattern,) = experiment["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]
    # Katib's collector (StdOut: stdout and stderr together) reads every name/value pair the regex matches.
    found = {}
    for line in (captured.err + captured.out).splitlines():
        for match in re.finditer(pattern, line):
            found[match.group(1)] = float(match.group(2))
    assert found == {
        "val_mae": pytest.approx(printed["val_mae"]),
        "val_ndcg@3": pytest.approx(printed["val_ndcg@3"]),
    }


def test_experiment_runs_where_the_training_identity_is(experiment):
    # Created with `-n $NS` in the runs' profile namespace, where manifests/training puts the service
    # account that Workload Identity binds (docs/cluster.md): a pinned namespace would run the trials
    # under an account without identity or bucket access.
    assert "namespace" not in experiment["metadata"]
    training = yaml.safe_load((EXPERIMENT.parents[1] / "training" / "serviceaccount.yaml").read_text())
    pod = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == training["metadata"]["name"]
