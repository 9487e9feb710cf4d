"""Package a trained model as a TorchServe archive in KServe's TorchServe-runtime layout.

``build_archive`` writes::

    <output_dir>/config/config.properties      TorchServe settings; model_snapshot registers the model
    <output_dir>/model-store/<name>.mar        model.pt, model.json, schema.json, items.parquet,
                                               users.parquet, model_card.json, model-config.yaml and
                                               the handler entry file (serving/mar_entry.py)

The handler code itself is not copied into the archive: ``mar_entry.py`` subclasses the installed
``metarec.serving.handler.MetaRecHandler`` (the serving image / local venv has ``metarec``
installed, the same interpreter TorchServe's workers run).

Security choices in the generated ``config.properties`` (see docs/serving.md): the inference and
management APIs listen on 127.0.0.1 only (inside the pod only KServe's model-server wrapper reaches
them), registering models through the management API is off (``enable_model_api=false``), and
token authorisation is off by default there (``token_auth: false``) because the only client is that
wrapper, which cannot present TorchServe's generated keys, and Kubernetes probes cannot either;
authentication belongs to the InferenceService ingress. ``token_auth: true`` turns it on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

import metarec
from metarec import storage
from metarec.realtime import HISTORY_FILE, write_history
from metarec.recommender import DEFAULT_SETTINGS, ITEMS_FILE, MODEL_CARD_FILE, USERS_FILE
from metarec.serve_local import format_properties

DEFAULTS: dict[str, Any] = {
    "version": "1.0",  # model version in TorchServe (URL /predictions/<name>/<version>/adapt)
    # TorchServe worker and batching settings (model-config.yaml and model_snapshot).
    "min_workers": 2,  # one worker per core on a 2-core pod; workers are separate processes
    "max_workers": 2,
    "batch_size": 8,  # requests handed to one handler call (adapted together in one vmapped pass)
    "max_batch_delay_ms": 5,  # how long a worker waits to fill a batch (added latency when idle)
    "response_timeout_s": 30,
    "job_queue_size": 100,
    # Handler limits (model-config.yaml ``handler:`` section).
    "max_support": DEFAULT_SETTINGS["max_support"],
    "max_steps": DEFAULT_SETTINGS["max_steps"],
    "default_k": DEFAULT_SETTINGS["default_k"],
    "max_k": DEFAULT_SETTINGS["max_k"],
    "max_instances": DEFAULT_SETTINGS["max_instances"],
    "max_feedback": DEFAULT_SETTINGS["max_feedback"],
    "state_window": DEFAULT_SETTINGS["state_window"],
    "torch_threads": 1,
    # config.properties for KServe's TorchServe runtime (storageUri mounted at /mnt/models).
    "model_store": "/mnt/models/model-store",
    "inference_port": 8085,
    "management_port": 8081,
    "metrics_port": 8082,
    "token_auth": False,
}
INTEGER_KEYS = (
    "min_workers", "max_workers", "batch_size", "max_batch_delay_ms", "response_timeout_s", "job_queue_size",
    "max_support", "max_steps", "default_k", "max_k", "max_instances", "max_feedback", "state_window",
    "torch_threads", "inference_port",
    "management_port", "metrics_port",
)  # fmt: skip
MODEL_FILES = ("model.pt", "model.json", "schema.json")
MODEL_CONFIG_FILE = "model-config.yaml"
SCORE_KEYS = ("mae", "rmse", "ndcg@1", "ndcg@3", "ndcg@5")


def resolve_serving_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Merges ``package.serving`` settings over :data:`DEFAULTS`.

    Args:
        config: Overrides (None = defaults).

    Returns:
        The full settings.

    Raises:
        ValueError: Unknown keys or invalid values (non-positive integers, max_workers < min_workers).
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"package serving config: unknown key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
    full = {**DEFAULTS, **config}
    for key in INTEGER_KEYS:
        value = full[key]
        minimum = 0 if key == "max_batch_delay_ms" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"package serving config: {key} must be an integer >= {minimum}, got {value!r}")
    if full["max_workers"] < full["min_workers"]:
        raise ValueError("package serving config: max_workers must be >= min_workers")
    if not isinstance(full["token_auth"], bool):
        raise ValueError("package serving config: token_auth must be true or false")
    full["version"] = str(full["version"])
    return full


def _handler_entry() -> Path:
    """The handler file packed into the archive (installed next to ``metarec.serving``)."""
    import metarec.serving

    return Path(metarec.serving.__file__).resolve().parent / "mar_entry.py"


def model_config_yaml(settings: dict[str, Any]) -> dict[str, Any]:
    """Returns the archive's ``model-config.yaml`` document.

    Args:
        settings: Resolved serving settings.

    Returns:
        TorchServe's model-level keys plus the ``handler:`` section the handler reads.
    """
    return {
        "minWorkers": settings["min_workers"],
        "maxWorkers": settings["max_workers"],
        "batchSize": settings["batch_size"],
        "maxBatchDelay": settings["max_batch_delay_ms"],
        "responseTimeout": settings["response_timeout_s"],
        "handler": {key: settings[key] for key in (*DEFAULT_SETTINGS, "torch_threads")},
    }


def config_properties(settings: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Returns the ``config/config.properties`` entries for KServe's TorchServe runtime.

    Args:
        settings: Resolved serving settings.
        model_name: Model name (and ``.mar`` file stem).

    Returns:
        Ordered property mapping (``model_snapshot`` registers the model at start-up).
    """
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            model_name: {
                settings["version"]: {
                    "defaultVersion": True,
                    "marName": f"{model_name}.mar",
                    "minWorkers": settings["min_workers"],
                    "maxWorkers": settings["max_workers"],
                    "batchSize": settings["batch_size"],
                    "maxBatchDelay": settings["max_batch_delay_ms"],
                    "responseTimeout": settings["response_timeout_s"],
                }
            }
        },
    }
    return {
        "inference_address": f"http://127.0.0.1:{settings['inference_port']}",
        "management_address": f"http://127.0.0.1:{settings['management_port']}",
        # Prometheus scrapes from outside the pod; the metrics API is read-only.
        "metrics_address": f"http://0.0.0.0:{settings['metrics_port']}",
        "metrics_mode": "prometheus",
        "enable_metrics_api": True,
        "enable_model_api": False,
        "disable_token_authorization": not settings["token_auth"],
        "install_py_dep_per_model": False,
        "job_queue_size": settings["job_queue_size"],
        "model_store": settings["model_store"],
        "model_snapshot": snapshot,
    }


def _served_method(evaluation: dict[str, Any], model_json: dict[str, Any], model_dir: str) -> str | None:
    """Finds the evaluation entry of the packaged model (by model dir, else by method name)."""
    methods = evaluation.get("methods") or {}
    target = os.path.normpath(str(model_dir))
    for name, info in methods.items():
        if (
            isinstance(info, dict)
            and info.get("model_dir")
            and os.path.normpath(str(info["model_dir"])) == target
        ):
            return name
    scenarios = evaluation.get("scenarios") or {}
    method = model_json.get("method")
    if method and any(method in scores for scores in scenarios.values()):
        return method
    return evaluation.get("best_meta")


def build_model_card(
    model_json: dict[str, Any],
    schema: dict[str, Any],
    evaluation: dict[str, Any],
    model_name: str,
    settings: dict[str, Any],
    model_dir: str,
) -> dict[str, Any]:
    """Builds the model card served by ``GET /models/<name>?customized=true``.

    Args:
        model_json: The model directory's ``model.json``.
        schema: The preprocessing ``schema.json``.
        evaluation: The evaluation document (``evaluation.json``).
        model_name: Served model name.
        settings: Resolved serving settings.
        model_dir: Where the model came from (matched against the evaluation's ``methods``).

    Returns:
        The card: version, method and adaptation, training data, evaluation metrics of the model
        next to every baseline per scenario, feature schema, serving limits.
    """
    method = _served_method(evaluation, model_json, model_dir)
    kinds = {name: (info or {}).get("kind") for name, info in (evaluation.get("methods") or {}).items()}
    scenarios = {}
    for scenario, scores in (evaluation.get("scenarios") or {}).items():
        baselines = {
            name: {key: value for key, value in metrics.items() if key in SCORE_KEYS}
            for name, metrics in scores.items()
            if name != method and kinds.get(name, "baseline") == "baseline"
        }
        scenarios[scenario] = {
            "model": {key: value for key, value in (scores.get(method) or {}).items() if key in SCORE_KEYS},
            "baselines": baselines,
        }
    features = {
        entity: [
            {key: feature[key] for key in ("name", "kind") if key in feature}
            | ({"vocab_size": len(feature["vocab"])} if "vocab" in feature else {})
            | ({"buckets": feature["buckets"]} if "buckets" in feature else {})
            for feature in schema.get(entity) or []
        ]
        for entity in ("user_features", "item_features")
    }
    return {
        "model_name": model_name,
        "version": settings["version"],
        "metarec_version": metarec.__version__,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "method": model_json.get("method"),
        "adapt": model_json.get("adapt"),
        "architecture": model_json.get("config"),
        "training": model_json.get("training"),
        "training_data": {
            key: schema.get(key)
            for key in (
                "dataset",
                "n_users",
                "n_items",
                "n_warm_items",
                "global_mean",
                "splits",
                "tasks",
                "counts",
            )
        }
        | {"rating_range": [schema.get("rating_min"), schema.get("rating_max")]},
        "evaluation": {
            "dataset": evaluation.get("dataset"),
            "seeds": evaluation.get("seeds"),
            "method": method,
            "selection_metric": evaluation.get("selection_metric"),
            "best_baseline": evaluation.get("best_baseline"),
            "scenarios": scenarios,
            "kshot": {
                scenario: per_method.get(method)
                for scenario, per_method in (evaluation.get("kshot") or {}).items()
                if method in per_method
            },
        },
        "feature_schema": features,
        "serving": {
            "endpoints": {
                "recommend": f"POST /predictions/{model_name}",
                "adapt": f"POST /predictions/{model_name}/{settings['version']}/adapt",
                "model_card": f"GET /models/{model_name}?customized=true (management API)",
            },
            "limits": {key: settings[key] for key in DEFAULT_SETTINGS},
        },
    }


def _evaluation_file(uri: str) -> str:
    """Accepts ``evaluation.json`` itself or the evaluation output directory holding it."""
    if storage.is_gcs(uri):
        return uri if uri.endswith(".json") else uri.rstrip("/") + "/evaluation.json"
    return str(Path(uri) / "evaluation.json") if Path(uri).is_dir() else uri


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_table(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


def _archiver_executable() -> str:
    beside = Path(sys.executable).parent / "torch-model-archiver"
    found = str(beside) if beside.is_file() else shutil.which("torch-model-archiver")
    if not found:
        raise RuntimeError("torch-model-archiver is not installed (pip install metarec[serving])")
    return found


def run_archiver(
    model_name: str,
    version: str,
    handler: Path,
    export_dir: Path,
    serialized_file: Path | None = None,
    extra_files: list[Path] | None = None,
    config_file: Path | None = None,
) -> Path:
    """Runs ``torch-model-archiver`` and returns the ``.mar`` it wrote.

    Args:
        model_name: Archive name (``<model_name>.mar``).
        version: Model version.
        handler: Handler file.
        export_dir: Directory the archive goes to (created).
        serialized_file: Weights file (optional for handlers that load nothing).
        extra_files: More files unpacked next to the handler.
        config_file: model-config.yaml.

    Returns:
        Path of the archive.

    Raises:
        RuntimeError: The archiver failed (its output is in the message).
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    command = [
        _archiver_executable(),
        "--model-name",
        model_name,
        "--version",
        version,
        "--handler",
        str(handler),
    ]
    command += ["--export-path", str(export_dir), "--force"]
    if serialized_file is not None:
        command += ["--serialized-file", str(serialized_file)]
    if extra_files:
        command += ["--extra-files", ",".join(str(path) for path in extra_files)]
    if config_file is not None:
        command += ["--config-file", str(config_file)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    archive = export_dir / f"{model_name}.mar"
    if done.returncode != 0 or not archive.is_file():
        raise RuntimeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr or done.stdout}")
    return archive


def build_archive(
    model_dir: str,
    evaluation_json: str | dict[str, Any] | None,
    output_dir: str,
    model_name: str = "metarec",
    serving_config: dict[str, Any] | None = None,
    preprocessed_dir: str | None = None,
) -> dict[str, Any]:
    """Builds the TorchServe archive and its ``config.properties`` in KServe's layout.

    Args:
        model_dir: Trained model directory (``model.pt``, ``model.json``, ``schema.json``), local or
            ``gs://``.
        evaluation_json: Path/URI of ``evaluation.json`` (or of the directory holding it), the
            parsed document, or None (the card then has no evaluation scores).
        output_dir: Local directory or ``gs://`` prefix to write ``config/`` and ``model-store/``
            into. A ``gs://`` output is written locally, uploaded to a staging prefix and promoted
            (manifest last), so readers never see half an archive; the staging prefix stays.
        model_name: Model name in TorchServe.
        serving_config: Overrides of :data:`DEFAULTS`.
        preprocessed_dir: Preprocessing output holding ``items.parquet``/``users.parquet`` (raw ids
            and features of the catalogue), needed when ``model_dir`` does not hold them.

    Returns:
        Summary: ``archive`` and ``config_properties`` paths (or URIs), ``model_name``,
        ``version``, ``files`` in the archive, ``archive_bytes``, ``archive_sha256``,
        ``method``, ``output_dir``.

    Raises:
        ValueError: Bad serving config or model name, or no items table anywhere.
        FileNotFoundError: A model file is missing.
        RuntimeError: The archiver failed.
    """
    settings = resolve_serving_config(serving_config)
    if not model_name or not model_name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"model_name must be letters, digits, '-' or '_', got {model_name!r}")
    if storage.is_gcs(output_dir):
        with tempfile.TemporaryDirectory(prefix="metarec-archive-") as local_out:
            summary = build_archive(
                model_dir, evaluation_json, local_out, model_name, serving_config, preprocessed_dir
            )
            final = str(output_dir).rstrip("/")
            staging = f"{final}.staging-{uuid.uuid4().hex[:8]}"
            storage.upload_dir(local_out, staging)
            storage.promote(staging, final)
        return summary | {
            "output_dir": final,
            "staging_uri": staging,
            "archive": f"{final}/model-store/{model_name}.mar",
            "config_properties": f"{final}/config/config.properties",
        }

    output = Path(output_dir)
    with contextlib.ExitStack() as stack:
        local_model = Path(stack.enter_context(storage.local_copy(model_dir)))
        stage = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="metarec-mar-")))
        for name in MODEL_FILES:
            if not (local_model / name).is_file():
                raise FileNotFoundError(f"model directory {model_dir} has no {name}")
            shutil.copyfile(local_model / name, stage / name)
        model_json = json.loads((stage / "model.json").read_text())
        schema = json.loads((stage / "schema.json").read_text())

        folders = [local_model]
        if preprocessed_dir:
            folders.append(Path(stack.enter_context(storage.local_copy(preprocessed_dir))))
        items = _find_table(ITEMS_FILE, folders)
        if items is None:
            raise ValueError(
                f"no {ITEMS_FILE} in {' or '.join(str(f) for f in folders)}: pass preprocessed_dir (the "
                "preprocessing output) so that the archive knows the catalogue's raw item ids"
            )
        shutil.copyfile(items, stage / ITEMS_FILE)
        users = _find_table(USERS_FILE, folders)
        if users is not None:
            shutil.copyfile(users, stage / USERS_FILE)
        # The known (training) users' recent ratings: the server personalises them from it.
        interactions = _find_table("interactions.parquet", folders)
        if interactions is not None:
            write_history(interactions.parent, stage / HISTORY_FILE, settings["state_window"])

        if isinstance(evaluation_json, dict) or evaluation_json is None:
            evaluation = evaluation_json or {}
        else:
            evaluation = json.loads(storage.read_bytes(_evaluation_file(str(evaluation_json))))
        card = build_model_card(model_json, schema, evaluation, model_name, settings, str(model_dir))
        (stage / MODEL_CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        (stage / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(model_config_yaml(settings), sort_keys=False))

        extra = [
            stage / name
            for name in ("model.json", "schema.json", ITEMS_FILE, USERS_FILE, HISTORY_FILE, MODEL_CARD_FILE)
        ]
        archive = run_archiver(
            model_name,
            settings["version"],
            _handler_entry(),
            output / "model-store",
            serialized_file=stage / "model.pt",
            extra_files=[path for path in extra if path.is_file()],
            config_file=stage / MODEL_CONFIG_FILE,
        )
        files = sorted(path.name for path in stage.iterdir()) + [_handler_entry().name]

    config_dir = output / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    properties_path = config_dir / "config.properties"
    properties_path.write_text(format_properties(config_properties(settings, model_name)))
    return {
        "output_dir": str(output),
        "archive": str(archive),
        "config_properties": str(properties_path),
        "model_name": model_name,
        "version": settings["version"],
        "method": card["evaluation"]["method"] or model_json.get("method"),
        "files": files,
        "archive_bytes": archive.stat().st_size,
        "archive_sha256": _sha256(archive),
    }


def build_noop_archive(output_dir: str | os.PathLike, model_name: str = "noop", serving_config=None) -> Path:
    """Builds an archive of the no-op handler with the same worker/batch settings (latency baseline).

    Args:
        output_dir: Directory; the archive goes to ``<output_dir>/model-store/<model_name>.mar``.
        model_name: Archive name.
        serving_config: Overrides of :data:`DEFAULTS` (only worker and batching keys matter).

    Returns:
        Path of the archive.
    """
    settings = resolve_serving_config(serving_config)
    import metarec.serving

    handler = Path(metarec.serving.__file__).resolve().parent / "noop_handler.py"
    with tempfile.TemporaryDirectory(prefix="metarec-noop-") as stage:
        config_file = Path(stage) / MODEL_CONFIG_FILE
        document = model_config_yaml(settings)
        document.pop("handler")
        config_file.write_text(yaml.safe_dump(document, sort_keys=False))
        return run_archiver(
            model_name,
            settings["version"],
            handler,
            Path(output_dir) / "model-store",
            config_file=config_file,
        )
