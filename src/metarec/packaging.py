"""Package a trained model as a TorchServe archive in KServe's TorchServe-runtime layout.

``build_archive`` writes::

    <output_dir>/config/config.properties      TorchServe settings; model_snapshot registers the model
    <output_dir>/model-store/<name>.mar        model.pt, model.json, schema.json, items.parquet,
                                               users.parquet, model_card.json, model-config.yaml and
                                               the handler entry file (serving/mar_entry.py)

The handler code itself is not copied into the archive: the entry file (:data:`HANDLER_ENTRY`)
subclasses the installed ``metarec.serving.handler.MetaRecHandler`` (the serving image / local venv
has ``metarec`` installed, the same interpreter TorchServe's workers run). ``config/<name>.mar.sha256``
records the archive's checksum; ``metarec serve`` checks it before starting.

``config.properties`` comes from :mod:`metarec.torchserve_config` (security settings there and in
docs/serving.md): inference on 127.0.0.1, REST management on a Unix socket, no model or workflow
registration, token authorisation off by default (``token_auth: false``) because KServe's
model-server wrapper and Kubernetes probes cannot present TorchServe's keys; authentication belongs
to the mesh / ingress in front of the InferenceService.
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
from pathlib import Path
from typing import Any

import yaml

import metarec
from metarec import storage
from metarec.metrics import METRIC_NAMES
from metarec.realtime import HISTORY_FILE, write_history
from metarec.recommender import ITEMS_FILE, MODEL_CARD_FILE, USERS_FILE
from metarec.serving_settings import ServingSettings, check_model_name
from metarec.torchserve_config import (
    DEPLOYED_MANAGEMENT_SOCKET,
    DEPLOYED_WORKFLOW_STORE,
    format_properties,
    server_properties,
)

MODEL_FILES = ("model.pt", "model.json", "schema.json")
MODEL_CONFIG_FILE = "model-config.yaml"
SCORE_KEYS = METRIC_NAMES


HANDLER_ENTRY_FILE = "mar_entry.py"
# TorchServe takes the one class *defined in* the handler file as the handler, so the installed
# handler is subclassed rather than re-exported; the code stays in the installed package.
HANDLER_ENTRY = '''"""MetaRec handler entry packed into the .mar; the code is the installed metarec.serving.handler."""

from metarec.serving.handler import MetaRecHandler


class MetaRecArchiveHandler(MetaRecHandler):
    """The installed MetaRecHandler, unchanged."""
'''
CHECKSUM_SUFFIX = ".sha256"


def resolve_serving_config(config: dict[str, Any] | ServingSettings | None) -> ServingSettings:
    """Parses ``package.serving`` settings (strict: unknown keys are named).

    Args:
        config: Overrides of the :class:`~metarec.serving_settings.ServingSettings` defaults.

    Returns:
        The settings.

    Raises:
        ValueError: Unknown keys or invalid values.
    """
    if isinstance(config, ServingSettings):
        return config
    return ServingSettings.from_dict(config)


def checksum_path(archive_dir: str | os.PathLike, model_name: str) -> Path:
    """Where packaging records the archive's SHA-256 (``config/<name>.mar.sha256``)."""
    return Path(archive_dir) / "config" / f"{model_name}.mar{CHECKSUM_SUFFIX}"


def model_config_yaml(settings: ServingSettings) -> dict[str, Any]:
    """Returns the archive's ``model-config.yaml`` document.

    Args:
        settings: Serving settings.

    Returns:
        TorchServe's model-level keys plus the ``handler:`` section (the request limits) the
        handler reads.
    """
    return {
        "minWorkers": settings.min_workers,
        "maxWorkers": settings.max_workers,
        "batchSize": settings.batch_size,
        "maxBatchDelay": settings.max_batch_delay_ms,
        "responseTimeout": settings.response_timeout_s,
        "handler": settings.limits().to_dict(),
    }


def config_properties(settings: ServingSettings, model_name: str) -> dict[str, Any]:
    """Returns the ``config/config.properties`` entries for KServe's TorchServe runtime layout.

    Args:
        settings: Serving settings.
        model_name: Model name (and ``.mar`` file stem).

    Returns:
        Ordered property mapping (``model_snapshot`` registers the model at start-up).
    """
    worker_keys = model_config_yaml(settings)
    worker_keys.pop("handler")
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            model_name: {
                settings.version: {"defaultVersion": True, "marName": f"{model_name}.mar", **worker_keys}
            }
        },
    }
    return server_properties(
        inference_address=f"http://127.0.0.1:{settings.inference_port}",
        # Prometheus scrapes from outside the pod; the metrics API is read-only.
        metrics_address=f"http://0.0.0.0:{settings.metrics_port}",
        management_socket=DEPLOYED_MANAGEMENT_SOCKET,
        model_store=settings.model_store,
        workflow_store=DEPLOYED_WORKFLOW_STORE,
        token_auth=settings.token_auth,
        limits=settings.limits(),
        extra={"job_queue_size": settings.job_queue_size, "model_snapshot": snapshot},
    )


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
    settings: ServingSettings,
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
        "version": settings.version,
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
                "adapt": f"POST /predictions/{model_name}/{settings.version}/adapt",
                "model_card": f"GET /models/{model_name}?customized=true (management API)",
            },
            "limits": settings.limits().to_dict(),
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
        raise RuntimeError("torch-model-archiver is not installed (pip install metarec[archive])")
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
    serving_config: dict[str, Any] | ServingSettings | None = None,
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
        serving_config: ``package.serving`` settings (:class:`~metarec.serving_settings.ServingSettings`).
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
    check_model_name(model_name)
    if storage.is_gcs(output_dir):
        with storage.local_output(output_dir, promote_last=True) as local_out:
            summary = build_archive(
                model_dir, evaluation_json, str(local_out), model_name, serving_config, preprocessed_dir
            )
        final = str(output_dir).rstrip("/")
        return summary | {
            "output_dir": final,
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
            write_history(interactions.parent, stage / HISTORY_FILE, settings.state_window)

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
        handler_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="metarec-entry-")))
        (handler_dir / HANDLER_ENTRY_FILE).write_text(HANDLER_ENTRY)
        archive = run_archiver(
            model_name,
            settings.version,
            handler_dir / HANDLER_ENTRY_FILE,
            output / "model-store",
            serialized_file=stage / "model.pt",
            extra_files=[path for path in extra if path.is_file()],
            config_file=stage / MODEL_CONFIG_FILE,
        )
        files = sorted(path.name for path in stage.iterdir()) + [HANDLER_ENTRY_FILE]

    config_dir = output / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    properties_path = config_dir / "config.properties"
    properties_path.write_text(format_properties(config_properties(settings, model_name)))
    digest = _sha256(archive)
    # sha256sum's format: `sha256sum -c` verifies it too.
    checksum_path(output, model_name).write_text(f"{digest}  {archive.name}\n")
    return {
        "output_dir": str(output),
        "archive": str(archive),
        "config_properties": str(properties_path),
        "model_name": model_name,
        "version": settings.version,
        "method": card["evaluation"]["method"] or model_json.get("method"),
        "files": files,
        "archive_bytes": archive.stat().st_size,
        "archive_sha256": digest,
    }
