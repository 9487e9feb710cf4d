"""A user's adapted state as the store's blob: its tensors, the model version, and the user's features.

The blob is tagged with the model version so a state computed by another model is never used (only its
user features, by a model that encodes features the same way: see :func:`decode_features`).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metarec.features import EncodedFeatures

Params = dict[str, torch.Tensor]

# A stored state: this magic, a 4-byte big-endian header length, a JSON header, then each tensor's raw
# bytes. torch.save/torch.load of the same document cost ~0.5 / ~1 ms per user, which a feedback batch
# paid per request; this format costs tens of microseconds. Blobs written by torch.save (before this
# format) are still read.
STATE_MAGIC = b"MRSTATE1"
_STATE_DTYPES = {
    str(dtype): dtype
    for dtype in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.bool,
    )
}
# The dtypes numpy also has: their bytes come from one numpy copy (see _raw_bytes).
_NUMPY_DTYPES = frozenset(dtype for dtype in _STATE_DTYPES.values() if dtype is not torch.bfloat16)


# Feature sets of other encodings a blob carries along (see carried_features): one per encoding, newest
# first, so a rolling update or a rollback across several retrained models keeps each one's features.
MAX_CARRIED = 4


@dataclass(frozen=True)
class CarriedFeatures:
    """A user's encoded features for another encoding than the writer's, kept verbatim in its blob.

    Attributes:
        features_key: the encoding they belong to (:attr:`FeatureEncoder.user_fingerprint`).
        tensors: ``[dtype, shape, size]`` of each tensor, in order.
        payload: their raw bytes, concatenated.
    """

    features_key: str
    tensors: list
    payload: bytes


def encode_state(
    adapted: Params,
    model_version: str,
    features: EncodedFeatures | None = None,
    features_key: str | None = None,
    carried: Sequence[CarriedFeatures] = (),
) -> bytes:
    """Serialises an adapted state (tensors by name, leading dimension 1) for the store.

    Args:
        adapted: the output of :meth:`Personaliser.adapt`.
        model_version: the version of the model that computed it.
        features: the user's encoded features it was adapted with (kept so that a new user is scored
            with them later), or None.
        features_key: what fixes the features' encoding (:attr:`FeatureEncoder.user_fingerprint`),
            so that another model encoding features the same way may read them (:func:`decode_features`).
        carried: the user's features in other encodings, from the blob this one replaces
            (:func:`carried_features`), kept after the blob's own tensors.

    Returns:
        The blob.
    """
    tensors = [("params", name, tensor) for name, tensor in adapted.items()]
    if features is not None:
        tensors += [("features", str(position), tensor) for position, tensor in enumerate(features)]
    entries, payload = [], []
    for group, name, tensor in tensors:
        data = tensor.detach().cpu()
        raw = _raw_bytes(data)
        entries.append([group, name, str(data.dtype), list(data.shape), len(raw)])
        payload.append(raw)
    fields = {"model_version": model_version, "features": features is not None, "tensors": entries}
    if features_key is not None:
        fields["features_key"] = features_key
    if carried:
        fields["carried"] = [{"features_key": c.features_key, "tensors": c.tensors} for c in carried]
        payload += [c.payload for c in carried]
    header = json.dumps(fields).encode()
    return b"".join([STATE_MAGIC, struct.pack(">I", len(header)), header, *payload])


def carried_features(blob: bytes | None, features_key: str | None) -> list[CarriedFeatures]:
    """The feature sets of other encodings than ``features_key`` that a stored blob holds: its own
    features (when written under another key) and those it carries, newest first, at most
    :data:`MAX_CARRIED`.

    A model that cannot read a user's features (another encoding: a retrained model, whose
    standardisation or vocabularies were refitted) used to replace the blob with its own, which held
    none, so the other model serving beside it in a rolling update, or rolled back to, lost a described
    new user's features for good. Kept verbatim in the new blob, they stay readable by the model whose
    encoding they are (:func:`decode_features`).

    Args:
        blob: the stored blob about to be replaced, or None.
        features_key: the writer's :attr:`FeatureEncoder.user_fingerprint` (its own features need no carry).

    Returns:
        What to pass to :func:`encode_state` as ``carried`` (empty for an unreadable or older blob).
    """
    if blob is None or not blob.startswith(STATE_MAGIC):
        return []
    try:
        header, data = _split(blob)
        found: list[CarriedFeatures] = []
        offset, entries, parts = 0, [], []
        for group, _, dtype, shape, size in header["tensors"]:
            if group == "features":
                entries.append([dtype, shape, size])
                parts.append(data[offset : offset + size])
            offset += size
        key = header.get("features_key")
        if header.get("features") and key is not None:
            found.append(CarriedFeatures(key, entries, b"".join(parts)))
        for group in header.get("carried") or []:
            size = sum(int(entry[2]) for entry in group["tensors"])
            found.append(
                CarriedFeatures(group["features_key"], group["tensors"], data[offset : offset + size])
            )
            offset += size
        if offset != len(data):
            return []  # not a blob this code wrote: carry nothing rather than bytes of unknown meaning
    except Exception:  # noqa: BLE001 - an unreadable blob has nothing to carry
        return []
    kept: list[CarriedFeatures] = []
    for entry in found:
        if entry.features_key != features_key and all(k.features_key != entry.features_key for k in kept):
            kept.append(entry)
    return kept[:MAX_CARRIED]


def _split(blob: bytes) -> tuple[dict, bytes]:
    """A blob of the current format as its JSON header and the bytes after it."""
    start = len(STATE_MAGIC) + 4
    (length,) = struct.unpack(">I", blob[len(STATE_MAGIC) : start])
    return json.loads(blob[start : start + length]), blob[start + length :]


def _raw_bytes(data: torch.Tensor) -> bytes:
    """A CPU tensor's elements in row-major order as bytes, whatever its strides."""
    if data.dtype in _NUMPY_DTYPES:
        return data.numpy().tobytes()  # one copy, in C order (a slice with odd strides included)
    # numpy has no such dtype (bfloat16): copy into a fresh tensor, whose plain strides allow the view.
    flat = torch.empty(data.numel(), dtype=data.dtype).copy_(data.reshape(-1))
    return flat.view(torch.uint8).numpy().tobytes()


def decode_state(blob: bytes, model_version: str, device: torch.device, params: bool = True) -> dict | None:
    """Inverse of :func:`encode_state`; None when the blob is unreadable or from another model version.

    Args:
        blob: the stored bytes.
        model_version: the serving model's version.
        device: where to put the tensors.
        params: False reads only the features (a stale state whose user's features are needed):
            ``"params"`` is then empty for a blob of the current format.

    Returns:
        ``{"params": adapted state, "features": [cat, num, multi] or None}``, or None (the caller then
        recomputes the state from the user's ratings).
    """
    try:
        if not blob.startswith(STATE_MAGIC):
            document = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)  # older blobs
        else:
            document = _decode_raw(blob, model_version, device, params)
    except Exception:  # noqa: BLE001 - any unreadable blob is recomputed, never served
        return None
    if not isinstance(document, dict) or document.get("model_version") != model_version:
        return None
    return document


def decode_features(
    blob: bytes, model_version: str, device: torch.device, features_key: str | None = None
) -> list[torch.Tensor] | None:
    """The user features kept in a blob, without its parameters.

    Read from a state of this model (``model_version``), and also from one of another model (a model
    change) when both encode user features the same way: the blob was written with ``features_key``
    and it is this model's. Otherwise (another encoding, a blob without a key, an unreadable one) None:
    the features are not known to be valid here.

    Args:
        blob: the stored bytes.
        model_version: the serving model's state tag.
        device: where to put the tensors.
        features_key: the serving model's :attr:`FeatureEncoder.user_fingerprint`, or None.

    Returns:
        ``[cat, num, multi]``, or None.
    """
    document = decode_state(blob, model_version, device, params=False)
    if document is not None:
        return document.get("features")
    if features_key is None or not blob.startswith(STATE_MAGIC):
        return None
    try:
        header, _ = _split(blob)
        if header.get("features_key") != features_key:
            # Written by a model of another encoding, which may have carried this one's along.
            carried = next((c for c in carried_features(blob, None) if c.features_key == features_key), None)
            return None if carried is None else _tensors(carried.tensors, carried.payload, device)
        document = _decode_raw(blob, header["model_version"], device, read_params=False)
    except Exception:  # noqa: BLE001 - unreadable: the features are unknown, as without a blob
        return None
    return None if document is None else document["features"]


def _tensors(entries: list, payload: bytes, device: torch.device) -> list[torch.Tensor]:
    """Tensors from ``[dtype, shape, size]`` entries and their concatenated raw bytes."""
    data, tensors, offset = bytearray(payload), [], 0
    for dtype, shape, size in entries:
        kind = _STATE_DTYPES[dtype]
        raw = data[offset : offset + size]
        if len(raw) != size:
            raise ValueError("truncated carried features")
        offset += size
        tensor = torch.frombuffer(raw, dtype=kind) if size else torch.empty(0, dtype=kind)
        tensors.append(tensor.reshape(shape).to(device))
    if offset != len(data):
        raise ValueError("trailing bytes in carried features")
    return tensors


def _decode_raw(
    blob: bytes, model_version: str, device: torch.device, read_params: bool = True
) -> dict | None:
    start = len(STATE_MAGIC) + 4
    (length,) = struct.unpack(">I", blob[len(STATE_MAGIC) : start])
    header = json.loads(blob[start : start + length])
    if header["model_version"] != model_version:
        return None  # refused before reading any tensor
    data = bytearray(blob[start + length :])
    params: Params = {}
    features: list[torch.Tensor] = []
    offset = 0
    for group, name, dtype, shape, size in header["tensors"]:
        raw = data[offset : offset + size]
        if len(raw) != size:
            raise ValueError("truncated state blob")
        offset += size
        if group == "params" and not read_params:
            continue
        kind = _STATE_DTYPES[dtype]
        tensor = torch.frombuffer(raw, dtype=kind) if size else torch.empty(0, dtype=kind)
        tensor = tensor.reshape(shape).to(device)
        if group == "params":
            params[name] = tensor
        else:
            features.append(tensor)
    # The features carried for other encodings follow (see carried_features).
    offset += sum(int(entry[2]) for group in header.get("carried") or [] for entry in group["tensors"])
    if offset != len(data):
        raise ValueError("trailing bytes in a state blob")
    return {
        "model_version": model_version,
        "params": params,
        "features": features if header["features"] else None,
    }
