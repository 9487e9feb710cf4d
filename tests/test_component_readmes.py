"""Each component README's "Use it alone" example, run as a platform team would: it compiles in a pipeline
of our own, and a GPU it asks for is one the step can use."""

import importlib
import os
import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler, components, dsl
from kfp_fakes import fake_candidate, fake_evaluation

from metarec.components import build

COMPONENTS_DIR = Path(build.__file__).resolve().parent
REPO_ROOT = COMPONENTS_DIR.parent


def readme_example(name: str) -> str:
    """The first ``python`` block of ``components/<name>/README.md``."""
    text = (COMPONENTS_DIR / name / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, f"{name}/README.md has no python example"
    return match.group(1)


def _load(name: str):
    return components.load_component_from_file(str(COMPONENTS_DIR / name / build.YAML_NAME))


def compile_example(name: str, tmp_path: Path) -> dict:
    """Compiles a README example and returns the pipeline spec.

    A complete example (one defining ``pipe``) is compiled as it is; a fragment ("inside a pipeline")
    runs inside a pipeline of ours that provides the upstream tasks it names (``data``, ``train`` inside
    a ParallelFor, ``scores``, ``chosen``, ``packaged``) and the loaded ``preprocess``.
    """
    code = readme_example(name)
    cwd = os.getcwd()
    # The examples load components/<name>/component.yaml relative to the checkout and may write their
    # compiled YAML to the working folder: run them in tmp_path, beside a link to the components.
    (tmp_path / "components").symlink_to(REPO_ROOT / "components", target_is_directory=True)
    os.chdir(tmp_path)
    try:
        if "def pipe" in code:
            namespace: dict = {}
            exec(compile(code, f"{name}/README.md", "exec"), namespace)  # noqa: S102 - our own README
            pipe = namespace["pipe"]
        else:

            @dsl.pipeline(name=f"readme-{name.replace('_', '-')}")
            def pipe(methods: list = ["maml", "reptile"]):  # noqa: B006 - a pipeline parameter default
                data = _load("preprocess")(data_uri="synthetic:tiny")
                with dsl.ParallelFor(methods) as method:
                    train = fake_candidate(method=method)
                scores = fake_evaluation()
                chosen = _load("select_model")(
                    evaluation=scores.outputs["evaluation"], models=dsl.Collected(train.outputs["model"])
                )
                packaged = _load("package_model")(
                    model=chosen.outputs["selected_model"],
                    evaluation=scores.outputs["evaluation"],
                    selection=chosen.outputs["selection"],
                    dataset=data.outputs["dataset"],
                )
                namespace = {"data": data, "train": train, "scores": scores, "chosen": chosen,
                             "packaged": packaged, "preprocess": _load("preprocess")}  # fmt: skip
                exec(compile(code, f"{name}/README.md", "exec"), namespace)  # noqa: S102

        package = tmp_path / f"{name}.yaml"
        compiler.Compiler().compile(pipe, str(package))
    finally:
        os.chdir(cwd)
    return next(yaml.safe_load_all(package.read_text()))


@pytest.mark.parametrize("name", build.COMPONENT_NAMES)
def test_readme_example_compiles_with_the_component(name, tmp_path):
    spec = compile_example(name, tmp_path)
    assert any(key.startswith(f"comp-{name.replace('_', '-')}") for key in spec["components"])


@pytest.mark.parametrize("name", build.COMPONENT_NAMES)
def test_readme_example_gives_a_gpu_step_the_cuda_image_and_device(name, tmp_path):
    """A step the example gives a GPU must run the -cuda image and, for meta_train, train on cuda: with
    the CPU image and device 'cpu' it would hold the GPU while training on the CPU."""
    spec = compile_example(name, tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    for executor_name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        if not container.get("resources", {}).get("accelerator"):
            continue
        assert container["image"].endswith("-cuda"), (
            f"{name}: {executor_name} gets a GPU but runs {container['image']}"
        )
        component = executor_name.replace("exec-", "comp-", 1)
        for task in tasks.values():
            if task["componentRef"]["name"] == component and name == "meta_train":
                device = (
                    task["inputs"]["parameters"].get("device", {}).get("runtimeValue", {}).get("constant")
                )
                assert device == "cuda", f"{name}: the GPU task trains on device {device!r}"


@pytest.mark.parametrize("name", build.COMPONENT_NAMES)
def test_readme_names_the_image_and_how_to_change_its_registry(name, tmp_path, monkeypatch):
    from metarec import __version__

    readme = (COMPONENTS_DIR / name / "README.md").read_text()
    committed = yaml.safe_load((COMPONENTS_DIR / name / build.YAML_NAME).read_text())
    (executor,) = committed["deploymentSpec"]["executors"].values()
    assert executor["container"]["image"] == f"ghcr.io/metarec/metarec-components:{__version__}"
    assert "`ghcr.io/metarec/metarec-components:<version>`" in readme
    # The committed YAML keeps the default registry whatever METAREC_REGISTRY says when a team compiles
    # its pipeline (preprocess's README claimed otherwise); the README must give the two ways that work.
    monkeypatch.setenv("METAREC_REGISTRY", "registry.example/team")
    package = tmp_path / "pipeline.yaml"
    loaded = _load(name)
    compiler.Compiler().compile(loaded, str(package))
    assert "ghcr.io/metarec/" in package.read_text()
    assert "metarec compile --output DIR" in readme and "set_container_image" in readme
    # What `METAREC_REGISTRY=... metarec compile --output DIR` does: a fresh import names that registry.
    module = importlib.import_module(f"metarec.components.{name}.component")
    try:
        importlib.reload(module)
        written = build.compile_component(name, tmp_path / "components" / name / build.YAML_NAME)
    finally:
        monkeypatch.undo()
        importlib.reload(module)
    assert "registry.example/team/metarec-components:" in written.read_text()
