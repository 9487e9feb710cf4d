"""The MetaRec pipeline: fingerprint -> preprocess -> meta-train candidates in parallel -> evaluate ->
select -> package (versioned, gated publishing) -> deploy.

``build_pipeline(PipelineOptions(...))`` returns a pipeline function for one of three variants:

* ``gpu``: each meta-train task asks for ``nvidia.com/gpu`` accelerators, a GKE accelerator node
  selector and a toleration for the GPU taint;
* ``cpu``: the same graph without any GPU setting (also what ``metarec run-local`` runs);
* ``pytorchjob``: each meta-train task submits a Training Operator PyTorchJob (multi-node torchrun)
  and waits for it.

Every task gets CPU and memory requests; training tasks get retries, a time-out and no caching. Only the
GPU training steps run the CUDA image (``-cuda`` tag); everything else runs the CPU image. The minimum
KFP backend is 2.14: the ``dsl.Collected`` fan-in of models runs on the open-source backend from 2.14.0
on (kubeflow/pipelines#11725; see each component's metadata.yaml).
"""

from dataclasses import dataclass, field

from kfp import dsl, kubernetes

from metarec.components.deploy_model.component import deploy_model
from metarec.components.evaluate.component import evaluate
from metarec.components.fingerprint_data.component import fingerprint_data
from metarec.components.meta_train.component import meta_train
from metarec.components.meta_train_pytorchjob.component import meta_train_pytorchjob
from metarec.components.package_model.component import package_model
from metarec.components.preprocess.component import preprocess
from metarec.components.select_model.component import select_model
from metarec.images import components_image
from metarec.pipelines.compile import VARIANTS

PIPELINE_NAME = "metarec"
DEFAULT_METHODS = ["maml", "fomaml", "reptile"]
GPU_RESOURCE = "nvidia.com/gpu"  # open-source KFP uses the accelerator type as the resource name
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# The PyTorchJob launcher gives up (and deletes its job) this long before the pod's own deadline kills it.
LAUNCHER_GRACE_S = 300


@dataclass
class Resources:
    """CPU and memory of one task (requests; limits default to the requests).

    Attributes:
        cpu: CPU request, Kubernetes quantity (``"2"``, ``"500m"``).
        memory: Memory request (``"8G"``, ``"8Gi"``).
        cpu_limit: CPU limit; empty: same as the request.
        memory_limit: Memory limit; empty: same as the request.
    """

    cpu: str
    memory: str
    cpu_limit: str = ""
    memory_limit: str = ""


def _default_resources() -> dict[str, Resources]:
    return {
        "preprocess": Resources("1", "4Gi"),
        "meta_train": Resources("4", "16Gi"),
        "evaluate": Resources("2", "8Gi"),
        "select_model": Resources("500m", "1Gi"),
        "package_model": Resources("1", "2Gi"),
        "deploy_model": Resources("250m", "512Mi"),
    }


@dataclass
class PipelineOptions:
    """Compile-time options of the pipeline (runtime settings are pipeline parameters).

    Attributes:
        variant: ``gpu``, ``cpu`` or ``pytorchjob``.
        gpu_type: GKE accelerator node label value (``nvidia-l4``, ``nvidia-tesla-t4``, ``nvidia-a100-80gb``);
            empty: no node selector (any GPU node).
        gpus_per_task: GPUs per meta-train task (gpu variant) or per PyTorchJob pod (pytorchjob variant).
        pytorchjob_nodes: Pods per PyTorchJob (pytorchjob variant).
        train_retries: Retries of a failed meta-train task (preemptible GPU nodes).
        train_timeout_s: Time-out of one meta-train task in seconds.
        resources: Per step name (``preprocess``, ``meta_train``, ``evaluate``, ``select_model``,
            ``package_model``): CPU and memory requests.
        name: Pipeline name; empty: ``metarec-<variant>``.
    """

    variant: str = "gpu"
    gpu_type: str = "nvidia-l4"
    gpus_per_task: int = 1
    pytorchjob_nodes: int = 2
    train_retries: int = 2
    train_timeout_s: int = 6 * 3600
    resources: dict[str, Resources] = field(default_factory=_default_resources)
    name: str = ""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown pipeline variant {self.variant!r} (choose from {', '.join(VARIANTS)})")
        if self.gpus_per_task < 1 and self.variant == "gpu":
            raise ValueError(f"the gpu variant needs at least one GPU per task, got {self.gpus_per_task}")
        if self.pytorchjob_nodes < 1:
            raise ValueError(f"pytorchjob_nodes must be at least 1, got {self.pytorchjob_nodes}")
        missing = set(_default_resources()) - set(self.resources)
        if missing:
            raise ValueError(f"resources lack steps: {', '.join(sorted(missing))}")

    @property
    def pipeline_name(self) -> str:
        """Name of the compiled pipeline."""
        return self.name or f"{PIPELINE_NAME}-{self.variant}"


def _set_resources(task: dsl.PipelineTask, resources: Resources) -> dsl.PipelineTask:
    """Sets CPU/memory requests and limits on a task."""
    task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu_limit or resources.cpu)
    task.set_memory_request(resources.memory).set_memory_limit(resources.memory_limit or resources.memory)
    return task


def _configure_training(task: dsl.PipelineTask, options: PipelineOptions) -> None:
    """Retries, time-out and no caching: a rerun must retrain, and preempted nodes must not fail the run."""
    task.set_caching_options(False)
    task.set_retry(num_retries=options.train_retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.set_timeout(task, options.train_timeout_s)


def _cpu_threads(cpu: str) -> int:
    """torch threads for a CPU request (``"4"`` -> 4, ``"500m"`` -> 1)."""
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return max(1, int(cores))


def _pass_pod_identity(task: dsl.PipelineTask) -> None:
    """POD_NAME/POD_UID from the downward API: the PyTorchJob's ownerReference points at this pod."""
    kubernetes.use_field_path_as_env(task, env_name="POD_NAME", field_path="metadata.name")
    kubernetes.use_field_path_as_env(task, env_name="POD_UID", field_path="metadata.uid")


def _request_gpus(task: dsl.PipelineTask, options: PipelineOptions) -> None:
    """GPU resource, GKE accelerator node selector and the GPU-taint toleration."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(options.gpus_per_task)
    if options.gpu_type:
        kubernetes.add_node_selector(task, label_key=GKE_ACCELERATOR_LABEL, label_value=options.gpu_type)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")


def build_pipeline(options: PipelineOptions | None = None):
    """Builds the pipeline function for one variant.

    Args:
        options: Compile-time options (None: the gpu variant with the defaults).

    Returns:
        A ``@dsl.pipeline`` function; its parameters are documented in docs/pipeline.md.
    """
    options = options or PipelineOptions()
    res = options.resources

    @dsl.pipeline(
        name=options.pipeline_name,
        description=f"MetaRec ({options.variant}): meta-learned cold-start recommenders, evaluated and packaged",
    )
    def metarec_pipeline(
        data_uri: str = "synthetic",
        dataset_config: str = "",
        methods: list = DEFAULT_METHODS,
        preprocess_config: str = "{}",
        train_config: str = "{}",
        evaluate_config: str = "{}",
        select_metric: str = "ndcg@3",
        select_scenario: str = "user_cold",
        fail_if_worse: bool = False,
        model_name: str = "metarec",
        serving_config: str = "{}",
        output_uri: str = "",
        publish_if_worse: bool = False,
        checkpoint_root: str = "",
        deploy_target: str = "",
        deploy_name: str = "metarec",
        deploy_namespace: str = "",
        canary_percent: int = 10,
    ):
        """MetaRec training pipeline.

        Args:
            data_uri: Raw data: local/mounted directory, gs:// prefix or ``synthetic``.
            dataset_config: Data-set config name, file or gs:// URI; empty: default for the data.
            methods: Meta-learning methods trained in parallel, one task each.
            preprocess_config: JSON ``preprocess`` section of the run config.
            train_config: JSON ``train`` section of the run config.
            evaluate_config: JSON ``evaluate`` section of the run config.
            select_metric: Selection metric (``ndcg@3``, ``mae`` ...).
            select_scenario: Scenario deciding the selection (``user_cold`` ...).
            fail_if_worse: Fail when the selected model does not beat the best baseline.
            model_name: TorchServe model name of the archive.
            serving_config: JSON ``package.serving`` settings.
            output_uri: Optional gs:// prefix the archive is published to, one folder per run
                (``<output_uri>/<run id>``); the quality gate applies whenever it is set.
            publish_if_worse: Publish even when the model does not beat the best baseline.
            checkpoint_root: Durable prefix for training checkpoints (gs:// on a cluster), in every
                variant; empty: next to the model artifact (never inside it). A retried task resumes
                from its own checkpoints only.
            deploy_target: ``inferenceservice``, ``deployment`` or empty (no deploy step effect).
            deploy_name: Name of the InferenceService / Deployment to roll the new version out to.
            deploy_namespace: Its namespace; empty: the run's namespace.
            canary_percent: InferenceService canary traffic share while the new revision is checked.
        """
        # Never cached: it reads the data and the config every time, so preprocess (cached on its
        # inputs) reruns whenever their bytes changed, not only when the strings did.
        fingerprint = fingerprint_data(data_uri=data_uri, dataset_config=dataset_config)
        fingerprint.set_caching_options(False)
        _set_resources(fingerprint, Resources("250m", "512Mi"))
        prep = preprocess(
            data_uri=data_uri,
            dataset_config=dataset_config,
            config=preprocess_config,
            data_fingerprint=fingerprint.output,
        )
        prep.set_display_name("preprocess")
        _set_resources(prep, res["preprocess"])

        with dsl.ParallelFor(methods) as method:
            if options.variant == "pytorchjob":
                train = meta_train_pytorchjob(
                    dataset=prep.outputs["dataset"],
                    image=components_image(cuda=options.gpus_per_task > 0),
                    method=method,
                    config=train_config,
                    num_nodes=options.pytorchjob_nodes,
                    gpus_per_node=options.gpus_per_task,
                    gpu_type=options.gpu_type,
                    cpu_request=res["meta_train"].cpu,
                    memory_request=res["meta_train"].memory,
                    timeout_s=options.train_timeout_s - LAUNCHER_GRACE_S,
                    checkpoint_root=checkpoint_root,
                )
                # This pod only submits and watches the job: it needs little of its own.
                _set_resources(train, Resources("250m", "512Mi"))
                _pass_pod_identity(train)
            else:
                gpu = options.variant == "gpu"
                train = meta_train(
                    dataset=prep.outputs["dataset"],
                    method=method,
                    config=train_config,
                    device="cuda" if gpu else "cpu",
                    cpu_threads=_cpu_threads(res["meta_train"].cpu),
                    checkpoint_root=checkpoint_root,
                )
                _set_resources(train, res["meta_train"])
                if gpu:
                    train.set_container_image(components_image(cuda=True))
                    _request_gpus(train, options)
            train.set_display_name("meta-train")
            _configure_training(train, options)

        candidates = dsl.Collected(train.outputs["model"])
        scores = evaluate(dataset=prep.outputs["dataset"], models=candidates, config=evaluate_config)
        _set_resources(scores, res["evaluate"])

        chosen = select_model(
            evaluation=scores.outputs["evaluation"],
            models=dsl.Collected(train.outputs["model"]),
            metric=select_metric,
            scenario=select_scenario,
            fail_if_worse=fail_if_worse,
        )
        _set_resources(chosen, res["select_model"])

        packaged = package_model(
            model=chosen.outputs["selected_model"],
            evaluation=scores.outputs["evaluation"],
            selection=chosen.outputs["selection"],
            dataset=prep.outputs["dataset"],
            model_name=model_name,
            serving_config=serving_config,
            output_uri=output_uri,
            publish_if_worse=publish_if_worse,
        )
        _set_resources(packaged, res["package_model"])

        with dsl.If(deploy_target != "", name="deploy"):
            rollout = deploy_model(
                archive=packaged.outputs["archive"],
                target=deploy_target,
                name=deploy_name,
                namespace=deploy_namespace,
                canary_percent=canary_percent,
            )
            rollout.set_caching_options(False)  # a rollout acts on the cluster's current state
            _set_resources(rollout, res["deploy_model"])

    return metarec_pipeline
