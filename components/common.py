"""Helpers shared by the KFP components, imported inside component bodies (they run in the image).

Kept free of kfp imports so that the core image and the tests can use them without a pipeline. The
components pass step configuration as JSON strings (a pipeline parameter type every KFP backend
accepts); these helpers turn them into the dicts the step functions take.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<target>[^)\s]+)\)")
# What every model folder holds (meta_train, meta_train_pytorchjob).
MODEL_FILES = ("model.json", "model.pt")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def parse_config(config: str | dict | None, step: str) -> dict | None:
    """Parses a step configuration given as a JSON object string.

    Args:
        config: JSON object text (``"{}"`` or empty for the step's defaults), or an already parsed dict.
        step: Step name used in the error message (``"preprocess"``, ``"train"`` ...).

    Returns:
        The configuration dict, or None when it is empty (the step function then uses its DEFAULTS).

    Raises:
        ValueError: The text is not JSON or not a JSON object.
    """
    if config is None:
        return None
    if isinstance(config, dict):
        return config or None
    text = config.strip()
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{step} config is not valid JSON ({error.msg} at char {error.pos}): {text[:80]!r}"
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{step} config must be a JSON object, got {type(parsed).__name__}")
    return parsed or None


def model_method(model_dir: str | Path, metadata: dict | None = None) -> str:
    """Names the meta-learning method that trained a model directory.

    Args:
        model_dir: Model directory written by ``run_meta_training`` (holds ``model.json``).
        metadata: The KFP artifact metadata, which the meta_train component fills with ``method``.

    Returns:
        The method name (``maml``, ``fomaml``, ``reptile`` ...).

    Raises:
        ValueError: Neither the metadata nor ``model.json`` names the method.
    """
    if metadata and metadata.get("method"):
        return str(metadata["method"])
    model_json = Path(model_dir) / "model.json"
    if model_json.is_file():
        method = read_json_artifact(model_json, "model.json").get("method")
        if method:
            return str(method)
    raise ValueError(f"cannot tell which method trained the model in {model_dir} (no 'method' in model.json)")


def read_json_artifact(path: str | Path, what: str) -> dict:
    """Reads the JSON object an input artifact holds.

    Args:
        path: The artifact's local path (a file).
        what: What it should be, for the error message (``"evaluation (output of evaluate)"``).

    Returns:
        The parsed JSON object.

    Raises:
        ValueError: The file is missing, is not JSON, or is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        state = "a folder" if path.is_dir() else "missing"
        raise ValueError(f"{what}: expected a JSON file at {path}, found it {state}")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what}: {path} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{what}: {path} holds a JSON {type(document).__name__}, not an object")
    return document


def fresh_output_dir(path: str | Path) -> Path:
    """Empties a folder output before a step writes it, so nothing of an earlier attempt stays in it.

    An output path can hold a previous attempt's files (a retry on a FUSE-mounted pipeline root, a rerun
    into the same location); the step functions only overwrite the files they write, so a stale file of
    another configuration (another model name's archive, another method's model) would travel on.

    Args:
        path: The output artifact's local path.

    Returns:
        The path, now an empty folder.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_location(uri: str, what: str) -> str:
    """Refuses a location that is neither ``gs://`` (with a bucket) nor a local path, naming the input.

    The storage helpers refuse one too, but only when first used, which for an output comes after the
    step's work.

    Args:
        uri: A ``gs://`` URI or a local path (may be empty).
        what: The parameter's name, for the error message.

    Returns:
        The URI unchanged.

    Raises:
        ValueError: The URI has another scheme, or is a ``gs://`` URI without a bucket.
    """
    from metarec.storage import StorageError, is_gcs, split_gcs_uri

    try:
        if is_gcs(uri):
            split_gcs_uri(str(uri))
    except StorageError as error:
        raise ValueError(f"{what}: {error}") from None
    return uri


def model_dirs_by_method(models: list) -> dict[str, str]:
    """Maps method name to model directory for a list of KFP Model artifacts.

    Args:
        models: Artifacts with ``.path`` and ``.metadata`` (e.g. a ``dsl.Collected`` input).

    Returns:
        ``{method: local model directory}``.

    Raises:
        ValueError: No model, a model folder without ``model.json`` or ``model.pt``, or two models
            trained with the same method.
    """
    if not models:
        raise ValueError("no candidate model was given")
    dirs: dict[str, str] = {}
    for model in models:
        # A candidate without its files (an upstream step that wrote nothing) would fail deep inside the
        # evaluation or be copied as the selected model.
        missing = [name for name in MODEL_FILES if not (Path(model.path) / name).is_file()]
        if missing:
            raise ValueError(
                f"candidate model {model.path} has no {', '.join(missing)}: expected meta_train's model folder"
            )
        method = model_method(model.path, getattr(model, "metadata", None))
        if method in dirs:
            raise ValueError(
                f"two candidate models were trained with method {method!r}: list each method once"
            )
        dirs[method] = model.path
    return dirs


def numeric_items(values: dict, prefix: str = "") -> dict[str, float]:
    """Flattens the finite numbers of a nested dict into ``{"a.b": number}`` (for Metrics artifacts).

    Args:
        values: A (possibly nested) dict as returned by a step function.
        prefix: Key prefix for the flattened names.

    Returns:
        Every finite int/float leaf (booleans excluded), keyed by its dotted path.
    """
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(numeric_items(value, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def embed_images(markdown: str, base_dir: str | Path) -> str:
    """Inlines the local images a Markdown text links to as base64 data URIs.

    The KFP UI renders a Markdown artifact on its own, so relative image links would break.

    Args:
        markdown: Markdown text, e.g. ``report.md`` from the evaluation.
        base_dir: Directory relative image links are resolved against.

    Returns:
        The text with every resolvable ``![alt](file.png)`` replaced by ``![alt](data:image/png;base64,...)``;
        links to missing files or remote URLs are left as they are.
    """

    def inline(match: re.Match) -> str:
        target = match.group("target")
        path = Path(base_dir) / target
        mime = IMAGE_TYPES.get(path.suffix.lower())
        if "://" in target or target.startswith("data:") or mime is None or not path.is_file():
            return match.group(0)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{match.group('alt')}](data:{mime};base64,{encoded})"

    return IMAGE_LINK.sub(inline, markdown)


def write_json(path: str | Path, document: Any) -> None:
    """Writes ``document`` as indented JSON, creating parent directories.

    Args:
        path: Destination file.
        document: JSON-serialisable value.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def checkpoint_dir(root: str, output_uri: str, run_id: str, task_id: str, method: str) -> str:
    """Returns the checkpoint location of one training task: unique to run, task and method.

    A KFP retry keeps the run and task ids, so it resumes; a later run or a parallel method never
    reads another's checkpoints.

    Args:
        root: Durable prefix (``gs://`` or a folder); empty: the folder above ``output_uri``.
        output_uri: URI of the task's model artifact.
        run_id: KFP run id.
        task_id: KFP task id.
        method: Meta-learning method.

    Returns:
        ``<root>/checkpoints/<run_id>/<task_id>/<method>``.

    Raises:
        ValueError: An id is empty or an unfilled KFP placeholder.
    """
    from metarec import storage

    for label, value in (("run_id", run_id), ("task_id", task_id)):
        if not value or "{{" in value:
            raise ValueError(f"{label} is {value!r}: checkpoints need the run and task ids KFP fills in")
    base = root or str(output_uri).rstrip("/").rsplit("/", 1)[0]
    return storage.join(base, "checkpoints", run_id, task_id, method)


def publish_version(local_dir: str, output_uri: str, version: str, gate: dict, publish_if_worse: bool) -> str:
    """Publishes an archive under ``<output_uri>/<version>`` once it passed the quality gate.

    Args:
        local_dir: The archive folder (KServe's TorchServe layout).
        output_uri: Prefix holding one folder per published version.
        version: This version's folder name (the KFP run id by default).
        gate: select_model's selection document (``beats_baseline``, ``message``).
        publish_if_worse: Publish even when the model loses to the best baseline.

    Returns:
        The URI of the published version.

    Raises:
        ValueError: The model failed the gate, the version is empty, or it was already published: the
            target holds a completion manifest (versions are immutable: a live model is never
            overwritten in place). A target without one, left by an attempt killed mid-promote, is
            promoted again, so a retried run can still publish.
    """
    from metarec import storage

    if not gate.get("beats_baseline") and not publish_if_worse:
        raise ValueError(
            f"quality gate: not publishing, the selected model does not beat the best baseline "
            f"({gate.get('message', 'no message')}); set publish_if_worse to override"
        )
    if not version or "{{" in version or "/" in version:
        raise ValueError(f"version must be a plain non-empty name, got {version!r}")
    target = storage.join(output_uri, version)
    # promote writes the completion manifest last: a version holding one was published (and may be
    # served), even if its files were changed since. Files without a manifest are what an attempt killed
    # mid-copy left behind; nobody reads them (serving requires the manifest), so a retry of the same
    # run (same version) promotes again, and promote deletes the files the archive does not have.
    if storage.read_manifest(target) is not None:
        state = "complete" if storage.is_complete(target) else "published, but its files changed since"
        raise ValueError(
            f"{target} already exists ({state}): versions are never overwritten, choose a new version"
        )
    if storage.exists(target):
        print(f"{target} holds an incomplete earlier attempt (no completion manifest): publishing it again")
    storage.promote(local_dir, target)
    return target
