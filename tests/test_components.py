"""KFP components: committed YAMLs are fresh, load and compose, run under kfp.local; helpers and the
PyTorchJob object."""

import base64
import json
from pathlib import Path

import pytest
import yaml
from kfp import compiler, components, dsl
from kfp.dsl import Artifact, Model, Output

from metarec.components import build
from metarec.components.common import (
    embed_images,
    model_dirs_by_method,
    model_method,
    numeric_items,
    parse_config,
)
from metarec.components.meta_train_pytorchjob import pytorchjob

# kfp.local warns that the components image is not a "python" image: it runs in this environment.
pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
COMPONENTS_DIR = Path(build.__file__).resolve().parent
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


# ---------------------------------------------------------------------------------------------------
# Committed YAMLs


@pytest.fixture(scope="module")
def default_registry(monkeypatch_module):
    """Component YAMLs are committed for the default registry: compile without METAREC_REGISTRY."""
    monkeypatch_module.delenv("METAREC_REGISTRY", raising=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("name", build.COMPONENT_NAMES)
def test_committed_component_yaml_is_fresh(name, tmp_path, default_registry):
    import importlib

    committed = COMPONENTS_DIR / name / build.YAML_NAME
    assert committed.is_file(), f"{committed} missing: run `python -m metarec.components.build`"
    # The image is fixed when the module is imported: re-import it under the default registry.
    importlib.reload(importlib.import_module(f"metarec.components.{name}.component"))
    fresh = build.compile_component(name, tmp_path / "fresh.yaml")
    assert fresh.read_text() == committed.read_text(), (
        f"{committed} is stale: run `python -m metarec.components.build` (or `metarec compile`)"
    )


@pytest.mark.parametrize("name", build.COMPONENT_NAMES)
def test_component_folder_is_complete(name):
    folder = COMPONENTS_DIR / name
    for file_name in ("__init__.py", "component.py", "README.md", "component.yaml"):
        assert (folder / file_name).is_file(), f"{folder / file_name} missing"
    spec = yaml.safe_load((folder / "component.yaml").read_text())
    executor = next(iter(spec["deploymentSpec"]["executors"].values()))["container"]
    assert executor["image"].endswith("/metarec-components:" + __import__("metarec").__version__)
    # Nothing may be pip-installed at run time: the image holds every package.
    assert "pip install" not in " ".join(executor["command"])
    readme = (folder / "README.md").read_text()
    component = components.load_component_from_file(str(folder / "component.yaml"))
    for parameter in [*component.component_spec.inputs, *(component.component_spec.outputs or {})]:
        assert f"`{parameter}`" in readme, f"{name}/README.md does not document {parameter!r}"


def test_unknown_component_name_is_refused():
    with pytest.raises(ValueError, match="unknown component"):
        build.load_component("train_everything")


# ---------------------------------------------------------------------------------------------------
# Loading from YAML and composing into a pipeline of our own


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fake_candidate(method: str, model: Output[Model]):
    """Writes a model directory that only names its method (select_model never loads the weights)."""
    import json
    import os

    os.makedirs(model.path, exist_ok=True)
    with open(os.path.join(model.path, "model.json"), "w") as handle:
        json.dump({"method": method}, handle)
    with open(os.path.join(model.path, "model.pt"), "wb") as handle:
        handle.write(method.encode())


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fake_evaluation(evaluation: Output[Artifact], best_meta_score: float = 0.9):
    """Writes an evaluation document: reptile is the best candidate, the baseline scores 0.8."""
    import json

    scenarios = {
        "user_cold": {
            "maml": {"ndcg@3": 0.7, "mae": 0.9},
            "reptile": {"ndcg@3": best_meta_score, "mae": 0.8},
            "global_mean": {"ndcg@3": 0.8, "mae": 0.85},
        }
    }
    methods = {"maml": {"kind": "meta"}, "reptile": {"kind": "meta"}, "global_mean": {"kind": "baseline"}}
    with open(evaluation.path, "w") as handle:
        json.dump({"scenarios": scenarios, "methods": methods}, handle)


def _load(name: str):
    return components.load_component_from_file(str(COMPONENTS_DIR / name / build.YAML_NAME))


def _two_step_pipeline(name: str):
    """A pipeline of the test's own: the loaded component fed from an upstream step."""
    loaded = _load(name)

    if name == "preprocess":

        @dsl.pipeline(name="two-step-preprocess")
        def pipe():
            first = loaded(data_uri="synthetic:tiny")
            _load("meta_train")(dataset=first.outputs["dataset"], method="maml", config='{"meta_steps": 1}')

    elif name in ("meta_train", "meta_train_pytorchjob"):

        @dsl.pipeline(name=f"two-step-{name}")
        def pipe():
            first = _load("preprocess")(data_uri="synthetic:tiny")
            loaded(dataset=first.outputs["dataset"], method="reptile")

    elif name == "evaluate":

        @dsl.pipeline(name="two-step-evaluate")
        def pipe(methods: list = ["maml", "reptile"]):  # noqa: B006 - a pipeline parameter default
            first = _load("preprocess")(data_uri="synthetic:tiny")
            with dsl.ParallelFor(methods) as method:
                candidate = fake_candidate(method=method)
            loaded(dataset=first.outputs["dataset"], models=dsl.Collected(candidate.outputs["model"]))

    elif name == "select_model":

        @dsl.pipeline(name="two-step-select")
        def pipe(methods: list = ["maml", "reptile"], fail_if_worse: bool = False):  # noqa: B006
            with dsl.ParallelFor(methods) as method:
                candidate = fake_candidate(method=method)
            scores = fake_evaluation()
            loaded(
                evaluation=scores.outputs["evaluation"],
                models=dsl.Collected(candidate.outputs["model"]),
                fail_if_worse=fail_if_worse,
            )

    elif name == "package_model":

        @dsl.pipeline(name="two-step-package")
        def pipe():
            first = _load("preprocess")(data_uri="synthetic:tiny")
            candidate = fake_candidate(method="maml")
            scores = fake_evaluation()
            loaded(
                model=candidate.outputs["model"],
                evaluation=scores.outputs["evaluation"],
                dataset=first.outputs["dataset"],
                model_name="demo",
            )

    else:  # a new component must get its own two-step pipeline here
        raise AssertionError(f"no two-step pipeline for {name}")
    return pipe


@pytest.mark.parametrize("name", build.COMPONENT_NAMES)
def test_component_loaded_from_yaml_compiles_in_a_pipeline(name, tmp_path):
    package = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(_two_step_pipeline(name), str(package))
    spec = next(yaml.safe_load_all(package.read_text()))
    component_names = set(spec["components"])
    assert f"comp-{name.replace('_', '-')}" in component_names


@pytest.fixture()
def local_runner(tmp_path):
    from kfp import local

    from metarec.pipelines.local_run import _import_kfp_local_dispatcher

    _import_kfp_local_dispatcher()
    root = tmp_path / "pipeline_root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        workspace_root=str(tmp_path / "ws"),
    )
    return root


def _task_dir(root: Path, task: str) -> Path:
    (run_dir,) = list(root.iterdir())
    return run_dir / task


@pytest.mark.slow
def test_select_model_from_yaml_runs_locally(local_runner):
    _two_step_pipeline("select_model")()
    select_dir = _task_dir(local_runner, "select-model")
    selection = json.loads((select_dir / "selection").read_text())
    assert selection["selected"] == "reptile"
    assert selection["best_baseline"] == "global_mean"
    assert selection["beats_baseline"] is True
    # The selected candidate's files were copied, not a reference to them.
    assert json.loads((select_dir / "selected_model" / "model.json").read_text())["method"] == "reptile"
    assert (select_dir / "selected_model" / "model.pt").read_bytes() == b"reptile"
    logged = json.loads((select_dir / "executor_output.json").read_text())["artifacts"]["metrics"]
    values = logged["artifacts"][0]["metadata"]
    assert values["selected.ndcg@3"] == pytest.approx(0.9)
    assert values["beats_baseline"] == 1.0


@pytest.mark.slow
def test_select_model_fail_if_worse_fails_the_task(local_runner):
    @dsl.pipeline(name="select-worse")
    def pipe(methods: list = ["maml", "reptile"]):  # noqa: B006
        with dsl.ParallelFor(methods) as method:
            candidate = fake_candidate(method=method)
        scores = fake_evaluation(best_meta_score=0.5)
        _load("select_model")(
            evaluation=scores.outputs["evaluation"],
            models=dsl.Collected(candidate.outputs["model"]),
            fail_if_worse=True,
        )

    with pytest.raises(RuntimeError, match="select-model"):
        pipe()


@pytest.mark.slow
def test_preprocess_from_yaml_runs_locally(local_runner):
    @dsl.pipeline(name="preprocess-only")
    def pipe():
        _load("preprocess")(data_uri="synthetic:tiny", config='{"seed": 3}')

    pipe()
    dataset = _task_dir(local_runner, "preprocess") / "dataset"
    for file_name in ("schema.json", "users.parquet", "items.parquet", "interactions.parquet"):
        assert (dataset / file_name).is_file(), file_name
    schema = json.loads((dataset / "schema.json").read_text())
    assert schema["splits"]["seed"] == 3  # the JSON config reached the step function
    metadata = json.loads((_task_dir(local_runner, "preprocess") / "executor_output.json").read_text())
    dataset_metadata = metadata["artifacts"]["dataset"]["artifacts"][0]["metadata"]
    assert dataset_metadata["data_uri"] == "synthetic:tiny"
    assert dataset_metadata["n_users"] > 0


# ---------------------------------------------------------------------------------------------------
# Helpers used inside the components


def test_parse_config_accepts_json_objects_and_empty():
    assert parse_config('{"meta_steps": 3}', "train") == {"meta_steps": 3}
    assert parse_config("{}", "train") is None
    assert parse_config("  ", "train") is None
    assert parse_config({"a": 1}, "train") == {"a": 1}


@pytest.mark.parametrize(
    ("text", "message"), [("{meta_steps: 3}", "not valid JSON"), ("[1, 2]", "JSON object")]
)
def test_parse_config_rejects_bad_text_naming_the_step(text, message):
    with pytest.raises(ValueError, match=f"train config.*{message}|{message}"):
        parse_config(text, "train")


def test_model_method_prefers_metadata_then_model_json(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"method": "fomaml"}))
    assert model_method(tmp_path) == "fomaml"
    assert model_method(tmp_path, {"method": "maml"}) == "maml"
    with pytest.raises(ValueError, match="cannot tell which method"):
        model_method(tmp_path / "missing")


class _FakeArtifact:
    def __init__(self, path, metadata=None):
        self.path, self.metadata = str(path), metadata or {}


def test_model_dirs_by_method_refuses_duplicates_and_empty(tmp_path):
    first, second = (
        _FakeArtifact(tmp_path / "a", {"method": "maml"}),
        _FakeArtifact(tmp_path / "b", {"method": "maml"}),
    )
    assert model_dirs_by_method([first]) == {"maml": str(tmp_path / "a")}
    with pytest.raises(ValueError, match="trained with method .maml."):
        model_dirs_by_method([first, second])
    with pytest.raises(ValueError, match="no candidate"):
        model_dirs_by_method([])


def test_numeric_items_flattens_finite_numbers_only():
    values = {"val_mae": 0.8, "steps": 10, "ok": True, "name": "x", "nested": {"a": 1.5, "b": float("nan")}}
    assert numeric_items(values) == {"val_mae": 0.8, "steps": 10.0, "nested.a": 1.5}


def test_embed_images_inlines_local_png_only(tmp_path):
    (tmp_path / "kshot.png").write_bytes(PNG_1x1)
    text = "# Report\n![K-shot](kshot.png)\n![gone](missing.png)\n![remote](https://example.org/x.png)\n"
    embedded = embed_images(text, tmp_path)
    assert f"![K-shot](data:image/png;base64,{base64.b64encode(PNG_1x1).decode()})" in embedded
    assert "![gone](missing.png)" in embedded
    assert "![remote](https://example.org/x.png)" in embedded


# ---------------------------------------------------------------------------------------------------
# PyTorchJob object and submission (no cluster: a fake API object)


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
    manifest = repo_root / "manifests" / "training" / "pytorchjob.yaml"
    if not manifest.is_file():
        pytest.skip("manifests/training/pytorchjob.yaml not present")
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


def test_job_name_is_a_valid_kubernetes_name():
    name = pytorchjob.job_name("MAML_v2", "x" * 80)
    assert len(name) <= 63 and name == name.lower() and not name.endswith("-")
    assert name.startswith("metarec-maml-v2-")


class _FakeApi:
    """Records calls; returns the given job states one read at a time."""

    def __init__(self, states):
        self.states, self.created, self.deleted = list(states), [], []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural, body["metadata"]["name"]))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if state is None:
            return {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
        return {
            "status": {"conditions": [{"type": state, "status": "True", "message": f"job {state.lower()}"}]}
        }

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


def test_submit_and_wait_returns_when_succeeded():
    api = _FakeApi([None, None, "Succeeded"])
    sleeps = []
    final = pytorchjob.submit_and_wait(_job(), api=api, poll_interval_s=5, sleep=sleeps.append)
    assert pytorchjob.job_state(final) == "Succeeded"
    assert api.created == [("kubeflow.org", "v1", "team", "pytorchjobs", "metarec-maml-abc")]
    assert sleeps == [5, 5]


def test_submit_and_wait_raises_with_the_failure_message():
    with pytest.raises(pytorchjob.PyTorchJobError, match="failed: job failed"):
        pytorchjob.submit_and_wait(_job(), api=_FakeApi(["Failed"]), sleep=lambda _: None)


def test_submit_and_wait_deletes_the_job_on_timeout():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    api = _FakeApi([None])
    with pytest.raises(pytorchjob.PyTorchJobError, match="did not finish"):
        pytorchjob.submit_and_wait(
            _job(), api=api, timeout_s=60, poll_interval_s=30, sleep=sleep, clock=lambda: now[0]
        )
    assert api.deleted == ["metarec-maml-abc"]
