"""Training checkpoints on a local folder or a ``gs://`` prefix, written atomically, for resume.

A checkpoint is one ``torch.save`` file ``ckpt-<step>.pt`` holding whatever state dict the trainer
passes (model, optimizer, RNG states, step, ...). Files are written whole (temp file + rename locally,
a single verified upload on GCS), so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"(?:^|/)ckpt-(\d{8})\.pt$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read back (truncated or otherwise damaged)."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint taken after ``step`` completed meta-steps."""
    return f"ckpt-{step:08d}.pt"


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """Lists the checkpoints in a folder or ``gs://`` prefix.

    Args:
        directory: local folder or ``gs://bucket/prefix``.

    Returns:
        ``[(step, uri), ...]`` sorted by step (empty when there is none or the folder is missing).
    """
    from metarec import storage  # lazy: pulls google-cloud-storage

    found = []
    for uri in storage.list_uris(directory):
        match = _NAME.search(uri)
        if match:
            found.append((int(match.group(1)), uri))
    return sorted(found)


def save_checkpoint(directory: str, step: int, state: dict[str, Any], keep_last: int = 2) -> str:
    """Writes a checkpoint and (locally) prunes older ones.

    Args:
        directory: local folder or ``gs://bucket/prefix``.
        step: completed meta-steps; orders the checkpoints.
        state: anything ``torch.save`` can write (tensors should be on the CPU).
        keep_last: local checkpoints to keep (older ones are deleted after the new one is in place);
            ``gs://`` checkpoints are never deleted (a bucket lifecycle rule does that better).

    Returns:
        The URI of the written checkpoint.
    """
    from metarec import storage

    buffer = io.BytesIO()
    torch.save(state, buffer)
    uri = storage.join(directory, checkpoint_name(step))
    storage.write_bytes(uri, buffer.getvalue())
    if not storage.is_gcs(str(directory)) and keep_last > 0:
        for _, old in list_checkpoints(str(directory))[:-keep_last]:
            Path(old).unlink(missing_ok=True)
    return uri


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads one checkpoint.

    Args:
        uri: path or ``gs://`` URI of a checkpoint file.
        map_location: device for the tensors.

    Returns:
        The state dict that was saved.

    Raises:
        CorruptCheckpointError: The file is not a whole checkpoint.
    """
    from metarec import storage

    data = storage.read_bytes(uri)  # storage errors (permission, missing bucket) are not corruption
    try:
        # weights_only=False: the state holds numpy / python RNG states, and checkpoints are our own files.
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CorruptCheckpointError(f"checkpoint {uri} is unreadable ({len(data)} bytes): {err}") from err


def load_latest(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """Reads the checkpoint with the highest step.

    Args:
        directory: local folder or ``gs://bucket/prefix``.
        map_location: device for the tensors.

    Returns:
        The state dict, or None when there is no checkpoint. An unreadable newest checkpoint is skipped
        (with a warning) for the next older one.

    Raises:
        CorruptCheckpointError: Every checkpoint there is unreadable.
    """
    checkpoints = list_checkpoints(directory)
    for index, (_, uri) in enumerate(reversed(checkpoints)):
        try:
            return load_checkpoint(uri, map_location=map_location)
        except CorruptCheckpointError as err:
            # The write is atomic against a killed process, but a node that loses power after the rename
            # (no fsync) can leave a truncated file: every retry would fail on it, while the previous
            # checkpoint (kept for this) resumes the same run to the same weights.
            if index + 1 == len(checkpoints):
                raise
            warnings.warn(f"{err}; resuming from the previous checkpoint", stacklevel=2)
    return None
