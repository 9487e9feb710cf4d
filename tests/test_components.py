"""KFP components: committed YAMLs are fresh, load and compose, run under kfp.local; helpers and the
PyTorchJob object."""

import base64
import json
from pathlib import Path

import pytest
import yaml
from kfp import compiler, components, dsl
from kfp_fakes import fake_candidate, fake_evaluation

from metarec.components import build
from metarec.components.common import (
    embed_images,
    model_dirs_by_method,
    model_method,
    numeric_items,
    parse_config,
)

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
    for file_name in ("__init__.py", "component.py", "README.md", "component.yaml", "metadata.yaml"):
        assert (folder / file_name).is_file(), f"{folder / file_name} missing"
    spec = yaml.safe_load((folder / "component.yaml").read_text())
    executor = next(iter(spec["deploymentSpec"]["executors"].values()))["container"]
    assert executor["image"].endswith("/metarec-components:" + __import__("metarec").__version__)
    assert list((folder / "tests").glob("test_*.py")), f"{name} has no tests/ folder beside it"
    # Nothing may be pip-installed at run time: the image holds every package.
    assert "pip install" not in " ".join(executor["command"])
    readme = (folder / "README.md").read_text()
    component = components.load_component_from_file(str(folder / "component.yaml"))
    for parameter in [*component.component_spec.inputs, *(component.component_spec.outputs or {})]:
        assert f"`{parameter}`" in readme, f"{name}/README.md does not document {parameter!r}"


@pytest.mark.parametrize("name", build.COMPONENT_NAMES)
def test_component_metadata_names_stability_kfp_version_and_verification(name):
    import datetime as dt
    import re

    metadata = yaml.safe_load((COMPONENTS_DIR / name / "metadata.yaml").read_text())
    assert metadata["name"] == name
    assert metadata["stability"] in ("alpha", "beta", "stable")
    (pipelines,) = [dep for dep in metadata["dependencies"]["kubeflow"] if dep["name"] == "Pipelines"]
    minimum = re.fullmatch(r">=(\d+)\.(\d+)\.\d+", pipelines["version"])
    assert minimum and (int(minimum.group(1)), int(minimum.group(2))) >= (2, 2), pipelines["version"]
    # A list-of-artifacts input (filled by dsl.Collected) runs on the open-source backend from 2.14 on.
    spec = yaml.safe_load((COMPONENTS_DIR / name / "component.yaml").read_text())
    artifacts = spec["root"]["inputDefinitions"].get("artifacts", {}).values()
    if any(artifact.get("isArtifactList") for artifact in artifacts):
        assert (int(minimum.group(1)), int(minimum.group(2))) >= (2, 14), pipelines["version"]
    verified = dt.date.fromisoformat(str(metadata["lastVerified"]))
    assert verified <= dt.date.today()


def test_unknown_component_name_is_refused():
    with pytest.raises(ValueError, match="unknown component"):
        build.load_component("train_everything")


# ---------------------------------------------------------------------------------------------------
# Loading from YAML and composing into a pipeline of our own


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

    elif name == "fingerprint_data":

        @dsl.pipeline(name="two-step-fingerprint")
        def pipe():
            first = loaded(data_uri="synthetic:tiny")
            _load("preprocess")(data_uri="synthetic:tiny", data_fingerprint=first.output)

    elif name == "meta_train":

        @dsl.pipeline(name="two-step-meta-train")
        def pipe():
            first = _load("preprocess")(data_uri="synthetic:tiny")
            loaded(dataset=first.outputs["dataset"], method="reptile")

    elif name == "meta_train_pytorchjob":

        @dsl.pipeline(name="two-step-pytorchjob")
        def pipe():
            first = _load("preprocess")(data_uri="synthetic:tiny")
            loaded(dataset=first.outputs["dataset"], method="reptile", image="registry/metarec-components:1")

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
                selection=scores.outputs["evaluation"],
                dataset=first.outputs["dataset"],
                model_name="demo",
            )

    elif name == "deploy_model":

        @dsl.pipeline(name="two-step-deploy")
        def pipe():
            candidate = fake_candidate(method="maml")
            loaded(archive=candidate.outputs["model"], target="inferenceservice")

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
    for folder in ("a", "b"):  # model folders as meta_train writes them
        (tmp_path / folder).mkdir()
        for name in ("model.json", "model.pt"):
            (tmp_path / folder / name).write_text("{}")
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
