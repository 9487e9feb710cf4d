"""Pipeline variants compile to IR with the right GPU, scheduling, resource, retry and caching settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metarec import images
from metarec.pipelines.compile import compile_all, compile_pipeline, main, pipeline_filename
from metarec.pipelines.metarec_pipeline import DEFAULT_METHODS, VARIANTS, PipelineOptions, Resources

GPU_LABEL = "cloud.google.com/gke-accelerator"


def _load_ir(path: Path) -> tuple[dict, dict]:
    """Returns (pipeline spec, platform spec or {}) of a compiled pipeline YAML."""
    documents = list(yaml.safe_load_all(path.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else {})


def _all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the root DAG and of the sub-DAGs (the ParallelFor body), by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _executor_of(spec: dict, task: dict) -> dict:
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]


def _platform_executors(platform: dict) -> dict[str, dict]:
    if not platform:
        return {}
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    out = tmp_path_factory.mktemp("pipelines")
    paths = compile_all(out, gpu_type="nvidia-tesla-t4", gpus_per_task=2)
    assert [path.name for path in paths] == [pipeline_filename(variant) for variant in VARIANTS]
    return {variant: _load_ir(out / pipeline_filename(variant)) for variant in VARIANTS}


def test_graph_has_every_step_in_order(compiled):
    spec, _ = compiled["cpu"]
    tasks = _all_tasks(spec)
    assert {"fingerprint-data", "preprocess", "meta-train", "evaluate", "select-model", "package-model",
            "deploy-model"} <= set(tasks)  # fmt: skip
    assert "fingerprint-data" in tasks["preprocess"]["dependentTasks"]
    assert "preprocess" in tasks["evaluate"]["dependentTasks"]
    deploy = next(
        task for task in spec["root"]["dag"]["tasks"].values() if task["taskInfo"]["name"] == "deploy"
    )
    assert deploy["dependentTasks"] == ["package-model"]
    assert (
        deploy["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--deploy_target'] != ''"
    )
    assert "evaluate" in tasks["select-model"]["dependentTasks"]
    assert {"evaluate", "select-model"} <= set(tasks["package-model"]["dependentTasks"])
    # meta-train runs inside a ParallelFor over the methods parameter, collected for evaluate.
    loop = next(task for name, task in tasks.items() if name.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("methods")
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["methods"]["defaultValue"] == DEFAULT_METHODS
    assert parameters["data_uri"]["defaultValue"] == "synthetic"


def test_gpu_variant_requests_gpus_node_pool_and_toleration(compiled):
    spec, platform = compiled["gpu"]
    tasks = _all_tasks(spec)
    accelerator = _executor_of(spec, tasks["meta-train"])["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert accelerator["resourceCount"] == "2"
    train_platform = _platform_executors(platform)["exec-meta-train"]
    assert train_platform["nodeSelector"]["labels"] == {GPU_LABEL: "nvidia-tesla-t4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train_platform[
        "tolerations"
    ]
    # Only training needs a GPU: the other steps are scheduled anywhere.
    for name in ("preprocess", "evaluate", "select-model", "package-model"):
        assert "accelerator" not in _executor_of(spec, tasks[name]).get("resources", {}), name
        assert "nodeSelector" not in _platform_executors(platform).get(f"exec-{name}", {}), name


def test_cpu_variant_has_no_gpu_setting_anywhere(compiled):
    spec, platform = compiled["cpu"]
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in executor["container"].get("resources", {})
    for settings in _platform_executors(platform).values():
        assert "nodeSelector" not in settings and "tolerations" not in settings
    text = yaml.safe_dump(spec) + yaml.safe_dump(platform)
    assert "nvidia" not in text and GPU_LABEL not in text


def test_gpu_type_can_be_left_out(tmp_path):
    path = compile_pipeline(PipelineOptions(variant="gpu", gpu_type=""), tmp_path / "p.yaml")
    spec, platform = _load_ir(path)
    train_platform = _platform_executors(platform)["exec-meta-train"]
    assert "nodeSelector" not in train_platform and train_platform["tolerations"]
    assert (
        _executor_of(spec, _all_tasks(spec)["meta-train"])["resources"]["accelerator"]["resourceCount"] == "1"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_task_requests_cpu_and_memory(compiled, variant):
    spec, _ = compiled[variant]
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 7
    for label, executor in executors.items():
        resources = executor["container"].get("resources", {})
        for key in ("cpuRequest", "memoryRequest", "cpuLimit", "memoryLimit"):
            assert resources.get(key), f"{variant}: {label} lacks {key}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_retries_and_is_never_cached(compiled, variant):
    spec, platform = compiled[variant]
    tasks = _all_tasks(spec)
    train_name = "meta-train-pytorchjob" if variant == "pytorchjob" else "meta-train"
    train = tasks[train_name]
    assert train["retryPolicy"]["maxRetryCount"] == 2
    assert not train.get("cachingOptions", {}).get("enableCache", False)
    assert _platform_executors(platform)[f"exec-{train_name}"]["activeDeadlineSeconds"]
    for name in ("preprocess", "evaluate", "select-model", "package-model"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True, name
        assert "retryPolicy" not in tasks[name], name


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_checkpoints_under_the_checkpoint_root_parameter(compiled, variant):
    """docs/cluster.md tells users to set checkpoint_root: every variant's training step must get it."""
    spec, _ = compiled[variant]
    tasks = _all_tasks(spec)
    train = tasks["meta-train-pytorchjob" if variant == "pytorchjob" else "meta-train"]
    channel = train["inputs"]["parameters"]["checkpoint_root"]
    assert channel == {"componentInputParameter": "pipelinechannel--checkpoint_root"}
    (loop,) = [
        task
        for task in spec["root"]["dag"]["tasks"].values()
        if task["taskInfo"]["name"].startswith("for-loop")
    ]
    assert loop["inputs"]["parameters"]["pipelinechannel--checkpoint_root"] == {
        "componentInputParameter": "checkpoint_root"
    }


def test_pytorchjob_variant_passes_gpu_settings_to_the_job_not_the_pod(compiled):
    spec, platform = compiled["pytorchjob"]
    tasks = _all_tasks(spec)
    assert "meta-train" not in tasks
    train = tasks["meta-train-pytorchjob"]
    constants = {
        name: value.get("runtimeValue", {}).get("constant")
        for name, value in train["inputs"]["parameters"].items()
    }
    assert constants["gpu_type"] == "nvidia-tesla-t4"
    assert constants["gpus_per_node"] == 2
    assert constants["num_nodes"] == 2
    # The step itself only submits and watches: no GPU, no GPU node.
    assert "accelerator" not in _executor_of(spec, train)["resources"]
    assert "nodeSelector" not in _platform_executors(platform).get("exec-meta-train-pytorchjob", {})


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown pipeline variant"):
        PipelineOptions(variant="tpu")
    with pytest.raises(ValueError, match="at least one GPU"):
        PipelineOptions(variant="gpu", gpus_per_task=0)
    with pytest.raises(ValueError, match="resources lack"):
        PipelineOptions(resources={"preprocess": Resources("1", "1Gi")})


def test_resources_are_configurable(tmp_path):
    options = PipelineOptions(variant="cpu")
    options.resources["evaluate"] = Resources("3", "12Gi", cpu_limit="6")
    spec, _ = _load_ir(compile_pipeline(options, tmp_path / "p.yaml"))
    resources = _executor_of(spec, _all_tasks(spec)["evaluate"])["resources"]
    assert (resources["cpuRequest"], resources["cpuLimit"]) == (3.0, 6.0)
    assert resources["memoryRequest"] == pytest.approx(12 * 1.073741824)


def test_compile_command_line_writes_the_chosen_variants(tmp_path, capsys):
    assert main(["--output", str(tmp_path), "--variant", "cpu", "--gpu-type", "nvidia-l4"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metarec-cpu.yaml"]
    assert "metarec-cpu.yaml" in capsys.readouterr().out


def _constants(task: dict) -> dict:
    return {
        name: value.get("runtimeValue", {}).get("constant")
        for name, value in task["inputs"]["parameters"].items()
    }


def test_only_gpu_training_runs_the_cuda_image_and_asks_for_cuda(compiled):
    for variant in VARIANTS:
        spec, _ = compiled[variant]
        tasks = _all_tasks(spec)
        for name, task in tasks.items():
            if "executorLabel" not in spec["components"][task["componentRef"]["name"]]:
                continue  # a sub-DAG (ParallelFor, If), not a container
            image = _executor_of(spec, task)["image"]
            expected = images.components_image(cuda=variant == "gpu" and name == "meta-train")
            assert image == expected, f"{variant}: {name} runs {image}"
    assert _constants(_all_tasks(compiled["gpu"][0])["meta-train"])["device"] == "cuda"
    cpu_train = _constants(_all_tasks(compiled["cpu"][0])["meta-train"])
    assert cpu_train["device"] == "cpu"
    assert cpu_train["cpu_threads"] == 4  # the task's CPU request, not torch's single thread


def test_pytorchjob_gets_the_compile_time_image(monkeypatch, tmp_path):
    monkeypatch.setenv("METAREC_REGISTRY", "europe-docker.pkg.dev/p/r")
    spec, _ = _load_ir(compile_pipeline(PipelineOptions(variant="pytorchjob"), tmp_path / "p.yaml"))
    image = _constants(_all_tasks(spec)["meta-train-pytorchjob"])["image"]
    assert image == images.components_image(cuda=True)
    assert image.startswith("europe-docker.pkg.dev/p/r/") and image.endswith("-cuda")


def test_pytorchjob_launcher_gives_up_before_its_pod_deadline_and_knows_its_pod(compiled):
    spec, platform = compiled["pytorchjob"]
    settings = _platform_executors(platform)["exec-meta-train-pytorchjob"]
    timeout = _constants(_all_tasks(spec)["meta-train-pytorchjob"])["timeout_s"]
    assert 0 < timeout < int(settings["activeDeadlineSeconds"])
    fields = {entry["name"]: entry["fieldPath"] for entry in settings["fieldPathAsEnv"]}
    assert fields == {"POD_NAME": "metadata.name", "POD_UID": "metadata.uid"}


def test_publishing_is_gated_and_deploy_follows_the_published_version(compiled):
    spec, _ = compiled["cpu"]
    tasks = _all_tasks(spec)
    package_inputs = tasks["package-model"]["inputs"]
    assert package_inputs["artifacts"]["selection"]["taskOutputArtifact"]["producerTask"] == "select-model"
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["publish_if_worse"]["defaultValue"] is False
    # deploy-model runs only when a target is set, on the archive package-model published.
    deploy = next(
        task for task in spec["root"]["dag"]["tasks"].values() if task["taskInfo"]["name"] == "deploy"
    )
    (channel,) = deploy["inputs"]["artifacts"].values()
    assert channel["taskOutputArtifact"] == {"outputArtifactKey": "archive", "producerTask": "package-model"}
    assert (
        tasks["deploy-model"]["inputs"]["artifacts"]["archive"]["componentInputArtifact"]
        in deploy["inputs"]["artifacts"]
    )
