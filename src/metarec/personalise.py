"""One user's personalisation for serving: ratings window -> support set -> adapted state -> scores.

The only place the real-time loop touches the meta-learning API (:class:`metarec.meta.Adapter`): the
inner loop that training and evaluation use, run on one user's ratings, and scoring with its result. The adapted state
(the per-user tensors the inner loop produces, by name) is serialised into the store's blob, tagged with
the model version so a state computed by another model is never used (only its user features, by a
model that encodes features the same way: see :func:`decode_features`).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence

import torch

from metarec.features import EncodedFeatures, stack_features
from metarec.meta import Adapter, select_users
from metarec.state import Rating
from metarec.tasks import build_task_batch

Params = dict[str, torch.Tensor]


class Personaliser:
    """Adapts one model to single users and scores items with the adapted state.

    Args:
        adapter: the model's :class:`metarec.meta.Adapter` (the one adapt/score API of training,
            evaluation and serving).
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.model = adapter.model

    def adapt(self, user: EncodedFeatures, items: torch.Tensor, ratings: torch.Tensor, steps: int) -> Params:
        """Runs the meta-learned inner loop on one user's ratings.

        Args:
            user: the user's encoded features (leading dimension 1).
            items: Long[S] rated items (S >= 1).
            ratings: Float[S] their ratings.
            steps: inner steps.

        Returns:
            The adapted state (tensors by name, leading dimension 1).
        """
        ratings = ratings.reshape(1, -1).float()
        return self.adapter.adapt(user, items.reshape(1, -1), ratings, torch.ones_like(ratings), steps)

    def adapt_many(
        self,
        users: Sequence[EncodedFeatures],
        supports: Sequence[tuple[Sequence[int], Sequence[float]]],
        steps: int,
    ) -> list[Params]:
        """Runs the inner loop for several users in one batched :meth:`Adapter.adapt` call.

        The supports are padded to the longest one and masked (padding rows change nothing), so each
        user gets what :meth:`adapt` gives them alone (up to float rounding).

        Args:
            users: each user's encoded features (leading dimension 1).
            supports: each user's ``(item indices, ratings)``, at least one rating each.
            steps: inner steps.

        Returns:
            Each user's adapted state (tensors by name, leading dimension 1), in order.
        """
        if not users:
            return []
        device = next(self.model.parameters()).device
        empty = [(torch.zeros(0, dtype=torch.long), torch.zeros(0))] * len(supports)
        batch = build_task_batch(stack_features(users), supports, empty).to(device)
        stacked = EncodedFeatures(batch.user_cat, batch.user_num, batch.user_multi)
        state = self.adapter.adapt(
            stacked, batch.support_items, batch.support_ratings, batch.support_mask, steps
        )
        # Views of each user's rows (blobs copy the bytes; a clone per tensor and user cost more than
        # the batch's state takes in memory).
        return [select_users(state, row) for row in range(len(supports))]

    def score(self, user: EncodedFeatures, adapted: Params | None, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of items for one user.

        Args:
            user: the user's encoded features (leading dimension 1).
            adapted: the output of :meth:`adapt`, or None for the un-adapted prior.
            items: Long[N] items.

        Returns:
            Float[N] predicted ratings.
        """
        state = self.adapter.prior_state(1) if adapted is None else adapted
        return self.adapter.score(user, state, items.reshape(1, -1))[0]


def support_from_window(
    window: Sequence[Rating], item_index: dict[str, int]
) -> tuple[list[int], list[float]]:
    """The support set of a ratings window: the latest rating of each item still in the catalogue.

    Args:
        window: ratings, oldest first.
        item_index: raw item id -> item index of the serving catalogue.

    Returns:
        ``(item indices, ratings)`` in order of each item's latest rating.
    """
    latest: dict[int, float] = {}
    for entry in window:
        index = item_index.get(entry.item_id)
        if index is None:
            continue  # an item the current model no longer has
        latest.pop(index, None)
        latest[index] = float(entry.rating)
    return list(latest), list(latest.values())


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


def encode_state(
    adapted: Params,
    model_version: str,
    features: EncodedFeatures | None = None,
    features_key: str | None = None,
) -> bytes:
    """Serialises an adapted state (tensors by name, leading dimension 1) for the store.

    Args:
        adapted: the output of :meth:`Personaliser.adapt`.
        model_version: the version of the model that computed it.
        features: the user's encoded features it was adapted with (kept so that a new user is scored
            with them later), or None.
        features_key: what fixes the features' encoding (:attr:`FeatureEncoder.user_fingerprint`),
            so that another model encoding features the same way may read them (:func:`decode_features`).

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
    header = json.dumps(fields).encode()
    return b"".join([STATE_MAGIC, struct.pack(">I", len(header)), header, *payload])


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
        start = len(STATE_MAGIC) + 4
        (length,) = struct.unpack(">I", blob[len(STATE_MAGIC) : start])
        header = json.loads(blob[start : start + length])
        if header.get("features_key") != features_key:
            return None
        document = _decode_raw(blob, header["model_version"], device, read_params=False)
    except Exception:  # noqa: BLE001 - unreadable: the features are unknown, as without a blob
        return None
    return None if document is None else document["features"]


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
    if offset != len(data):
        raise ValueError("trailing bytes in a state blob")
    return {
        "model_version": model_version,
        "params": params,
        "features": features if header["features"] else None,
    }
