"""Image fidelity without Docker: replay each image's install spec in a clean venv, then run every
component's *compiled* container command in the components venv, chained on tiny data as on a cluster,
and the serving image's content on the model the chain deployed, as its pod runs it.

No container can start on these machines, so the image is checked by what it installs:

1. a fresh venv gets ``torch==2.13.0`` (CPU build, on disk) and then, non-editable, the build context the
   Dockerfile COPYs with exactly the extras of ``images/components.extras`` (the line the Dockerfile
   installs), followed by ``pip check``, as in the image;
2. each ``components/<name>/component.yaml`` (the committed, compiled YAML) gives the container command and
   arguments; ``{{$}}`` becomes a generated executor input whose artifacts live in ``gs://`` (a real GCS
   emulator); this script plays the KFP launcher's part: it downloads input artifacts into the local
   ``/gcs/`` mirror before the command and uploads the outputs after it;
3. the steps chain fingerprint_data -> preprocess -> meta_train (in process) and meta_train_pytorchjob
   (through a fake Kubernetes API whose controller runs the PyTorchJob's container command in the same
   venv) -> evaluate -> select_model -> package_model (versioned publish) -> deploy_model (a fake KServe
   InferenceService from manifests/serving/overlays/kserve).

Then the documented non-default options the components image must run (:data:`OPTIONS`, after the chain), each through
its real entry point in the same venv: preprocess with a Parquet ratings file, tags and the
sentence-embedding text encoder, its data-set config and model both in ``gs://``; one Katib trial, the
container command of ``manifests/katib/experiment.yaml`` on the chain's gs:// data set; and the options
that need the ``bench`` extra (evaluate's ``peers``, ``metarec tune``), which the image does not install
by design, must fail at once with an error naming that extra.

Then the serving image (:func:`fidelity_serving.run_serving`, checks :data:`fidelity_serving.SERVING`,
in ``images/fidelity_serving.py``): its install spec in a second venv, then its content run as the pod runs it:
the Deployment, the kserve predictor, and the ``gke-cpu-redis`` overlay with its Redis StatefulSet
(``images/fidelity_redis.py``), each pod emulated by ``images/pod_emulation.py`` and ``images/serving_pod.py``.

A component (or the handler) that needs something its image lacks fails here. The last line printed is
``{"components": N, "ran": N, "failed": [...], "options": {...}, "serving": {...}, "seconds": S}``
(``serving`` maps each check to ok / failed / not-run; a failed one is listed in ``failed`` as
``serving:<check>``); the exit status is 1 when anything failed.

Usage: ``python images/fidelity.py --workdir build/fidelity`` (``make fidelity``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the GCS emulator and fake API helpers the tests use
sys.path.insert(0, str(REPO / "images"))  # the serving phase's modules, which import one another by name

from fidelity_serving import SERVING, run_serving  # noqa: E402
from pod_emulation import free_port  # noqa: E402
from serving_pod import SERVING_IMAGE  # noqa: E402

BUCKET = "fidelity"
NAMESPACE = "fidelity"
IMAGE = "components"
TINY_TRAIN = {"meta_steps": 4, "meta_batch": 4, "val_every": 0, "checkpoint_every": 2}
TINY_EVALUATE = {"scenarios": ["user_cold"], "baselines": ["global_mean", "item_user_bias"],
                 "kshots": [1, 5], "tune_on_val": False}  # fmt: skip
# The task that runs each component in the chain; a component missing here counts as failed.
TASKS = {
    "fingerprint_data": "fingerprint", "preprocess": "preprocess", "meta_train": "meta-train-maml",
    "meta_train_pytorchjob": "meta-train-fomaml-job", "evaluate": "evaluate",
    "select_model": "select-model", "package_model": "package-model", "deploy_model": "deploy-model",
}  # fmt: skip
# The documented non-default options checked after the chain (run_options): task -> what it shows.
OPTIONS = {
    "option-fingerprint-parquet": "fingerprint_data on Parquet ratings, config in gs://",
    "option-preprocess-sentence": "preprocess: Parquet, tags, sentence encoder model in gs:// (text extra)",
    "katib-trial": "manifests/katib trial command on a gs:// data set",
    "option-evaluate-peers": "evaluate peers: refused at once, naming the bench extra",
    "metarec-tune": "metarec tune: refused at once, naming the bench extra",
}
# Stands in for the KFP launcher's /gcs/ mirror of gs:// artifacts (kfp maps gs://b/x to /gcs/b/x).
SITECUSTOMIZE = """import os
if os.environ.get("FIDELITY_GCS_MOUNT"):
    from kfp.dsl.types import artifact_types
    artifact_types._GCS_LOCAL_MOUNT_PREFIX = os.environ["FIDELITY_GCS_MOUNT"].rstrip("/") + "/"
"""


def image_extras(image: str) -> str:
    """Returns the extras line of ``images/<image>.extras`` (the image's install spec)."""
    lines = [line.strip() for line in (REPO / "images" / f"{image}.extras").read_text().splitlines()]
    return ",".join(line for line in lines if line and not line.startswith("#"))


def dockerfile_copies(image: str) -> list[tuple[str, str]]:
    """Returns the ``(source, destination)`` pairs the Dockerfile COPYs into /opt/metarec."""
    pairs = []
    for line in (REPO / "images" / f"{image}.Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            tokens = [t for t in shlex.split(line[5:]) if not t.startswith("--")]
            if len(tokens) == 2 and not tokens[1].startswith("/"):
                pairs.append((tokens[0], tokens[1]))
            elif len(tokens) > 2:
                pairs += [(source, tokens[-1] + Path(source).name) for source in tokens[:-1]]
    return pairs


def _dependency_key(image: str) -> str:
    """What decides the venv's third-party content: the install spec, the pins, the declared deps."""
    import hashlib

    parts = [
        REPO / "images" / f"{image}.extras",
        REPO / "requirements/constraints.txt",
        REPO / "pyproject.toml",
    ]
    return hashlib.sha256(b"".join(path.read_bytes() for path in parts)).hexdigest()


def build_venv(workdir: Path, image: str = IMAGE, fresh: bool = False) -> Path:
    """Builds a venv holding exactly what the image installs; returns its ``bin`` folder.

    Like Docker's layer cache, the dependency layers (torch, then the extras' requirements) are reused
    while ``images/<image>.extras``, the constraints and ``pyproject.toml`` are unchanged; the metarec
    package itself is always reinstalled from a fresh copy of the build context. ``fresh`` (or a clean
    checkout) builds everything from nothing.
    """
    venv, context = workdir / "venv", workdir / "context"
    key_file, key = venv / ".metarec-dependency-key", _dependency_key(image)
    reuse = not fresh and key_file.is_file() and key_file.read_text() == key
    if not reuse:
        shutil.rmtree(venv, ignore_errors=True)
    shutil.rmtree(context, ignore_errors=True)
    for source, destination in dockerfile_copies(image):
        target = context / destination.rstrip("/")
        if (REPO / source).is_dir():
            shutil.copytree(
                REPO / source, target, ignore=shutil.ignore_patterns("__pycache__", "tests", "conftest.py")
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / source, target)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check"]
    constraints = workdir / "constraints.txt"
    lines = (context / "requirements/constraints.txt").read_text().splitlines()
    constraints.write_text("\n".join(line for line in lines if not line.startswith("torch==")) + "\n")
    if reuse:
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "metarec"], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # the CPU build on disk, first (as the image)
    subprocess.run(pip + ["-c", str(constraints), f"{context}[{image_extras(image)}]"], check=True)
    subprocess.run([python, "-m", "pip", "check"], check=True)
    key_file.write_text(key)
    launcher = workdir / "launcher"
    launcher.mkdir(exist_ok=True)
    (launcher / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return venv / "bin"


class Launcher:
    """Runs compiled components the way the KFP launcher does, against gs:// artifacts."""

    def __init__(self, workdir: Path, bin_dir: Path, env: dict[str, str]):
        self.workdir, self.bin_dir, self.env = workdir, bin_dir, env
        self.mount = workdir / "gcs"
        self.results: dict[str, str] = {}

    def local(self, uri: str) -> Path:
        return self.mount / uri[len("gs://") :]

    def run(self, task: str, component: str, params: dict, inputs: dict, outputs: dict,
            expect_failure: str = "") -> dict:  # fmt: skip
        """Runs one component; returns ``{"artifacts": {name: {uri, metadata}}, "parameters": {...}}``.

        Args:
            task: Task name (unique), for the artifact URIs and the report.
            component: Component folder name.
            params: Input parameter values.
            inputs: ``{name: [artifact dicts from an upstream result]}``.
            outputs: ``{name: schemaTitle}`` of the output artifacts.
            expect_failure: When set, the step must exit non-zero with this text in its output (an
                option the image refuses by design); returns ``{"seconds": S}`` then.
        """

        from metarec import storage
        from metarec.components.build import compiled_command

        spec = yaml.safe_load((REPO / "components" / component / "component.yaml").read_text())
        out_params = spec["root"].get("outputDefinitions", {}).get("parameters", {})
        task_dir = self.workdir / "tasks" / task
        shutil.rmtree(task_dir, ignore_errors=True)
        task_dir.mkdir(parents=True)
        for artifacts in inputs.values():  # the launcher fetches input artifacts first
            for artifact in artifacts:
                target = self.local(artifact["uri"])
                if target.exists() or not storage.exists(artifact["uri"]):
                    continue
                if storage.list_uris(artifact["uri"]):
                    storage.download_dir(artifact["uri"], target)
                else:
                    storage.download(artifact["uri"], target)
        out_artifacts = {
            name: {"artifacts": [{"name": name, "type": {"schemaTitle": title},
                                  "uri": f"gs://{BUCKET}/root/{task}/{name}", "metadata": {}}]}
            for name, title in outputs.items()
        }  # fmt: skip
        for entry in out_artifacts.values():
            self.local(entry["artifacts"][0]["uri"]).parent.mkdir(parents=True, exist_ok=True)
        executor_input = {
            "inputs": {
                "parameterValues": params,
                "artifacts": {name: {"artifacts": artifacts} for name, artifacts in inputs.items()},
            },
            "outputs": {
                "artifacts": out_artifacts,
                "parameters": {name: {"outputFile": str(task_dir / f"param-{name}")} for name in out_params},
                "outputFile": str(task_dir / "executor_output.json"),
            },
        }
        env = dict(self.env, PATH=f"{self.bin_dir}:{os.environ['PATH']}", FIDELITY_GCS_MOUNT=str(self.mount),
                   PYTHONPATH=str(self.workdir / "launcher"), POD_NAME=f"pod-{task}", POD_UID=f"uid-{task}")  # fmt: skip
        started = time.monotonic()
        # cwd outside the checkout: only what the venv installed is importable, as in the image.
        command = compiled_command(component, executor_input)
        done = subprocess.run(command, cwd=task_dir, env=env, capture_output=True, text=True)
        (task_dir / "log.txt").write_text(done.stdout + done.stderr)
        if expect_failure:
            seconds = time.monotonic() - started
            if done.returncode == 0 or expect_failure not in done.stdout + done.stderr:
                self.results[task] = "failed"
                tail = (done.stdout + done.stderr)[-3000:]
                raise RuntimeError(f"{task} ({component}) did not refuse with {expect_failure!r}:\n{tail}")
            self.results[task] = f"ok {seconds:.1f}s"
            print(f"  {task}: refused as expected ({seconds:.1f} s)", flush=True)
            return {"seconds": seconds}
        if done.returncode != 0:
            self.results[task] = "failed"
            tail = (done.stdout + done.stderr)[-3000:]
            raise RuntimeError(f"{task} ({component}) exited {done.returncode}:\n{tail}")
        executor_output = {}
        if (task_dir / "executor_output.json").is_file():
            executor_output = json.loads((task_dir / "executor_output.json").read_text())
        result_artifacts = {}
        for name, entry in out_artifacts.items():  # the launcher uploads outputs after
            artifact = entry["artifacts"][0]
            local = self.local(artifact["uri"])
            if local.is_dir() and any(local.iterdir()):
                storage.upload_dir(local, artifact["uri"])
            elif local.is_file():
                storage.upload(local, artifact["uri"])
            written = executor_output.get("artifacts", {}).get(name, {}).get("artifacts", [{}])[0]
            artifact = dict(artifact, metadata=written.get("metadata", {}))
            result_artifacts[name] = artifact
        parameters = {}
        for name, entry in executor_input["outputs"]["parameters"].items():
            path = Path(entry["outputFile"])
            parameters[name] = path.read_text() if path.is_file() else None
        parameters.update(executor_output.get("parameterValues", {}))
        self.results[task] = f"ok {time.monotonic() - started:.1f}s"
        print(f"  {task}: ok ({time.monotonic() - started:.1f} s)", flush=True)
        return {"artifacts": result_artifacts, "parameters": parameters}


def job_runner(bin_dir: Path, env: dict[str, str], workdir: Path):
    """A fake Training Operator: runs a created PyTorchJob's container command in the venv."""
    from fake_kube import condition_status

    def controller(fake, collection: str, obj: dict) -> None:
        if not collection.endswith("/pytorchjobs") or obj.get("status"):
            return
        obj["status"] = condition_status("Running")
        name = obj["metadata"]["name"]
        (container,) = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        # What the Training Operator sets for torchrun (one node here), on a free rendezvous port.
        job_env = dict(env, PATH=f"{bin_dir}:{os.environ['PATH']}", PET_NNODES="1", PET_NODE_RANK="0",
                       PET_NPROC_PER_NODE=obj["spec"]["nprocPerNode"], PET_MASTER_ADDR="127.0.0.1",
                       PET_MASTER_PORT=str(free_port()))  # fmt: skip
        job_env.update({e["name"]: e["value"] for e in container.get("env", [])})

        def run() -> None:
            cwd = workdir / "jobs" / name
            cwd.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(container["command"], cwd=cwd, env=job_env, capture_output=True, text=True)
            (cwd / "log.txt").write_text(done.stdout + done.stderr)
            state = "Succeeded" if done.returncode == 0 else "Failed"
            fake.set_status(collection, name, condition_status(state, done.stderr[-500:]))

        threading.Thread(target=run, daemon=True).start()

    return controller


def run_chain(launcher: Launcher, fake, raw_uri: str, chain: dict) -> None:
    """fingerprint_data -> preprocess -> meta_train + meta_train_pytorchjob -> evaluate -> select ->
    package -> deploy, each step's outputs feeding the next; ``chain["dataset"]`` gets the data set."""
    from fake_kube import INFERENCESERVICES

    ids = {"run_id": "fidelity-run", "task_id": ""}
    fp = launcher.run("fingerprint", "fingerprint_data", {"data_uri": raw_uri}, {}, {})
    prep = launcher.run(
        "preprocess", "preprocess",
        {"data_uri": raw_uri, "dataset_config": "synthetic", "config": "{}",
         "data_fingerprint": fp["parameters"]["Output"]},
        {}, {"dataset": "system.Dataset"},
    )  # fmt: skip
    dataset = [prep["artifacts"]["dataset"]]
    train = launcher.run(
        "meta-train-maml", "meta_train",
        {"method": "maml", "config": json.dumps(TINY_TRAIN), "device": "cpu", "cpu_threads": 1,
         "checkpoint_root": "", **ids, "task_id": "task-maml"},
        {"dataset": dataset}, {"model": "system.Model", "metrics": "system.Metrics"},
    )  # fmt: skip
    job = launcher.run(
        "meta-train-fomaml-job", "meta_train_pytorchjob",
        {"image": "fidelity/metarec-components:local", "method": "fomaml", "config": json.dumps(TINY_TRAIN),
         "namespace": NAMESPACE, "num_nodes": 1, "gpus_per_node": 0, "cpu_request": "1",
         "memory_request": "1Gi", "timeout_s": 600, "poll_interval_s": 1, **ids, "task_id": "task-fomaml"},
        {"dataset": dataset}, {"model": "system.Model"},
    )  # fmt: skip
    models = [train["artifacts"]["model"], job["artifacts"]["model"]]
    chain.update(dataset=prep["artifacts"]["dataset"], models=models)
    scores = launcher.run(
        "evaluate", "evaluate", {"config": json.dumps(TINY_EVALUATE)},
        {"dataset": dataset, "models": models},
        {"metrics": "system.Metrics", "report": "system.Markdown", "evaluation": "system.Artifact"},
    )  # fmt: skip
    chosen = launcher.run(
        "select-model", "select_model", {"metric": "ndcg@3", "scenario": "user_cold", "fail_if_worse": False},
        {"evaluation": [scores["artifacts"]["evaluation"]], "models": models},
        {"selected_model": "system.Model", "selection": "system.Artifact", "metrics": "system.Metrics"},
    )  # fmt: skip
    # The gate is exercised by the tests; tiny data need not beat the baselines, so publish regardless.
    packaged = launcher.run(
        "package-model", "package_model",
        {"model_name": "metarec", "serving_config": "{}", "output_uri": f"gs://{BUCKET}/models",
         "publish_if_worse": True, "version": "fidelity-run"},
        {"model": [chosen["artifacts"]["selected_model"]], "evaluation": [scores["artifacts"]["evaluation"]],
         "selection": [chosen["artifacts"]["selection"]], "dataset": dataset},
        {"archive": "system.Model"},
    )  # fmt: skip
    isvc = yaml.safe_load((REPO / "manifests/serving/overlays/kserve/inferenceservice.yaml").read_text())
    isvc["metadata"]["namespace"] = NAMESPACE
    fake.put(INFERENCESERVICES.format(namespace=NAMESPACE), isvc)
    launcher.run(
        "deploy-model", "deploy_model",
        {"target": "inferenceservice", "name": isvc["metadata"]["name"], "namespace": NAMESPACE,
         "canary_percent": 10, "timeout_s": 60, "poll_interval_s": 1},
        {"archive": [packaged["artifacts"]["archive"]]}, {},
    )  # fmt: skip
    served = fake.get(INFERENCESERVICES.format(namespace=NAMESPACE), isvc["metadata"]["name"])
    uri = served["spec"]["predictor"]["model"]["storageUri"]
    if uri != packaged["artifacts"]["archive"]["metadata"]["published_uri"]:
        raise RuntimeError(f"deploy_model left storageUri at {uri}")
    chain["model_uri"] = uri  # what the serving pod's fetch-model init container downloads (MODEL_URI)


def tiny_sentence_model(folder: Path) -> Path:
    """Saves a real sentence-transformers model (word embeddings + mean pooling) small enough for CI."""
    import torch
    from csv_release import GENRE_WORDS, TAG_WORDS
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, WordEmbeddings
    from sentence_transformers.sentence_transformer.modules.tokenizer import WhitespaceTokenizer

    vocab = ["the", *(w.lower() for w in GENRE_WORDS), *TAG_WORDS]
    words = WordEmbeddings(
        tokenizer=WhitespaceTokenizer(vocab=vocab, do_lower_case=True),
        embedding_weights=torch.randn(len(vocab), 8, generator=torch.Generator().manual_seed(0)),
        update_embeddings=False,
    )
    SentenceTransformer(modules=[words, Pooling(8, pooling_mode="mean")], device="cpu").save(str(folder))
    return folder


def katib_trial_command(dataset_uri: str, output: Path) -> tuple[list[str], str]:
    """The trial container command of ``manifests/katib/experiment.yaml``, as Katib substitutes it (the
    first value of each parameter's feasible space), on ``dataset_uri``, with a tiny training budget; and
    the metrics collector's format (the regex Katib reads the trial's metrics with)."""
    experiment = yaml.safe_load((REPO / "manifests/katib/experiment.yaml").read_text())
    first = {}
    for parameter in experiment["spec"]["parameters"]:
        space = parameter["feasibleSpace"]
        first[parameter["name"]] = space["list"][0] if "list" in space else space["min"]
    references = {
        t["name"]: first[t["reference"]] for t in experiment["spec"]["trialTemplate"]["trialParameters"]
    }
    spec = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = []
    for argument in container["command"]:
        for name, value in references.items():
            argument = argument.replace(f"${{trialParameters.{name}}}", str(value))
        command.append(dataset_uri if argument.startswith("gs://PIPELINE_ROOT_BUCKET/") else argument)
    command[command.index("--output") + 1] = str(output)
    for key, value in TINY_TRAIN.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command, experiment["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"][0]


def run_options(launcher: Launcher, dataset: dict, models: list[dict]) -> None:
    """The documented non-default options of the components image, each through its entry point.

    Args:
        launcher: The chain's launcher (same venv, emulator and artifact layout).
        dataset: The chain's preprocess output artifact (a gs:// data set).
        models: The chain's trained model artifacts.
    """
    import re

    import pandas as pd
    from csv_release import write_csv_release

    from metarec import storage
    from metarec.data.config import CONFIGS_DIR

    # Preprocess: Parquet ratings, tags, and the sentence encoder of a text feature, config and model in
    # gs:// (the text extra); fingerprint_data reads the same config.
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_csv_release(Path(tmp) / "raw", n_users=60, n_movies=40)
        pd.read_csv(raw / "ratings.csv").to_parquet(raw / "ratings.parquet")
        (raw / "ratings.csv").unlink()
        storage.upload_dir(raw, f"gs://{BUCKET}/csv-release")
        storage.upload_dir(tiny_sentence_model(Path(tmp) / "model"), f"gs://{BUCKET}/models/tiny-sentence")
        config = yaml.safe_load((CONFIGS_DIR / "movielens-csv.yaml").read_text())
        config["ratings"]["file"] = "ratings.parquet"
        text = next(f for f in config["items"]["features"] if f["kind"] == "text")
        text.update(encoder="sentence", model=f"gs://{BUCKET}/models/tiny-sentence", dim=4)
        (Path(tmp) / "sentence.yaml").write_text(yaml.safe_dump(config))
        storage.upload(Path(tmp) / "sentence.yaml", f"gs://{BUCKET}/configs/sentence.yaml")
    source = {
        "data_uri": f"gs://{BUCKET}/csv-release",
        "dataset_config": f"gs://{BUCKET}/configs/sentence.yaml",
    }
    fp = launcher.run("option-fingerprint-parquet", "fingerprint_data", source, {}, {})
    prep = launcher.run(
        "option-preprocess-sentence", "preprocess",
        {**source, "config": "{}", "data_fingerprint": fp["parameters"]["Output"]},
        {}, {"dataset": "system.Dataset"},
    )  # fmt: skip
    schema = json.loads(
        launcher.local(prep["artifacts"]["dataset"]["uri"]).joinpath("schema.json").read_text()
    )
    (entry,) = [f for f in schema["item_features"] if f["kind"] == "text"]
    if entry.get("encoder") != "sentence" or entry.get("embedding_dim") != 8:
        raise RuntimeError(f"preprocess did not use the sentence encoder: {entry}")

    # The Katib trial: the manifest's container command, in the components image, on a gs:// data set.
    command, metrics_format = katib_trial_command(dataset["uri"], launcher.workdir / "katib-model")
    env = dict(launcher.env, PATH=f"{launcher.bin_dir}:{os.environ['PATH']}")
    started = time.monotonic()
    done = subprocess.run(command, cwd=launcher.workdir, env=env, capture_output=True, text=True)
    found = dict((m.group(1), m.group(2)) for m in re.finditer(metrics_format, done.stdout))
    if done.returncode != 0 or set(found) != {"val_ndcg@3", "val_mae"}:
        launcher.results["katib-trial"] = "failed"
        raise RuntimeError(f"Katib trial exited {done.returncode}, metrics {found}:\n{done.stderr[-3000:]}")
    launcher.results["katib-trial"] = f"ok {time.monotonic() - started:.1f}s"
    print(f"  katib-trial: ok ({time.monotonic() - started:.1f} s)", flush=True)

    # The bench extra is in no image: these must refuse before any work, naming it.
    launcher.run(
        "option-evaluate-peers", "evaluate", {"config": json.dumps({**TINY_EVALUATE, "peers": ["lightfm"]})},
        {"dataset": [dataset], "models": models},
        {"metrics": "system.Metrics", "report": "system.Markdown", "evaluation": "system.Artifact"},
        expect_failure="from the 'bench' extra",
    )  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        ["metarec", "tune", "--data", "synthetic:tiny", "--trials", "1", "--output", "tune"],
        cwd=launcher.workdir, env=env, capture_output=True, text=True,
    )  # fmt: skip
    refused = done.returncode == 1 and "from the 'bench' extra" in done.stderr
    refused = refused and not (launcher.workdir / "tune").exists()  # nothing preprocessed first
    launcher.results["metarec-tune"] = f"ok {time.monotonic() - started:.1f}s" if refused else "failed"
    if not refused:
        raise RuntimeError(f"metarec tune did not refuse at once:\n{done.stderr[-3000:]}")
    print(f"  metarec-tune: refused as expected ({time.monotonic() - started:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Builds the venvs, runs the chain, the options and the serving phase, prints the JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="build/fidelity", help="scratch folder (venv, artifacts)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the dependency layers too")
    args = parser.parse_args(argv)
    from fake_kube import FakeKube, kserve_raw_controller
    from gcs_emulator import start_emulator, stop_emulator, use_emulator

    from metarec import storage
    from metarec.components.build import COMPONENT_NAMES
    from metarec.data.synthetic import generate_synthetic

    started = time.monotonic()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = workdir / "venv" / "bin"
    build_venv(workdir, fresh=args.fresh)
    print(f"venv with the {IMAGE} image's content ready ({time.monotonic() - started:.0f} s)", flush=True)
    serving: dict[str, str] = {}
    serving_started = time.monotonic()
    try:
        build_venv(workdir / "serving", image=SERVING_IMAGE, fresh=args.fresh)
        serving["serving-venv"] = f"ok {time.monotonic() - serving_started:.1f}s"
        print(
            f"venv with the {SERVING_IMAGE} image's content ready ({serving['serving-venv'][3:]})", flush=True
        )
    except subprocess.CalledProcessError as error:
        serving["serving-venv"] = "failed"
        print(f"serving venv: {error}", file=sys.stderr)
    shutil.rmtree(workdir / "gcs", ignore_errors=True)
    shutil.rmtree(workdir / "jobs", ignore_errors=True)
    emulator = start_emulator()
    launcher = None
    try:
        use_emulator(emulator.url)
        storage.get_client().create_bucket(BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            raw = generate_synthetic(Path(tmp) / "raw", preset="tiny")
            storage.upload_dir(raw, f"gs://{BUCKET}/raw")
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(STORAGE_EMULATOR_HOST=emulator.url, KUBECONFIG=str(workdir / "kubeconfig"))

        def controller(fake, collection, obj):
            jobs(fake, collection, obj)
            kserve_raw_controller(fake, collection, obj)  # the shipped overlay's RawDeployment mode

        jobs = job_runner(bin_dir, env, workdir)
        with FakeKube(controller) as fake:
            fake.kubeconfig(workdir / "kubeconfig")
            launcher = Launcher(workdir, bin_dir, env)
            chain = {}
            try:
                run_chain(launcher, fake, f"gs://{BUCKET}/raw", chain)
            except RuntimeError as error:
                print(error, file=sys.stderr)
            if "models" in chain:
                try:
                    run_options(launcher, chain["dataset"], chain["models"])
                except RuntimeError as error:
                    print(error, file=sys.stderr)
            if "model_uri" in chain and serving.get("serving-venv", "").startswith("ok"):
                serving_started = time.monotonic()
                try:
                    run_serving(workdir, env, chain["model_uri"], serving)
                except RuntimeError as error:
                    print(error, file=sys.stderr)
                print(f"serving phase: {time.monotonic() - serving_started:.1f} s", flush=True)
    finally:
        use_emulator(None)
        stop_emulator(emulator)
    results = launcher.results if launcher else {}
    failed = [name for name in COMPONENT_NAMES if not results.get(TASKS.get(name, ""), "").startswith("ok")]
    options = {name: results.get(name, "not-run").split(" ")[0] for name in OPTIONS}
    served = {name: serving.get(name, "not-run").split(" ")[0] for name in SERVING}
    summary = {
        "components": len(COMPONENT_NAMES),
        "ran": len(COMPONENT_NAMES) - len(failed),
        "failed": failed
        + [name for name, result in options.items() if result != "ok"]
        + [f"serving:{name}" for name, result in served.items() if result != "ok"],
        "options": options,
        "serving": served,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
