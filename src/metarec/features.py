"""Feature encoding shared by preprocessing, training and serving.

A schema (``schema.json`` written by preprocessing) describes every user and item feature; the
encoder turns raw values into three tensors so that a new user's request is encoded exactly as the
training data was.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch


class EncodedFeatures(NamedTuple):
    """Encoded features of N entities.

    Attributes:
        cat: Long[N, C] one slot per categorical or hashed feature (0 = missing / out of vocabulary).
        num: Float[N, D] standardised numeric features and text vectors (missing = 0).
        multi: Float[N, M] concatenated multi-hot features.
    """

    cat: torch.Tensor
    num: torch.Tensor
    multi: torch.Tensor

    def to(self, device: torch.device | str) -> EncodedFeatures:
        """The same features on ``device`` (encoding runs on the CPU; a model may serve on a GPU)."""
        return EncodedFeatures(*(tensor.to(device) for tensor in self))


def stack_features(features: Sequence[EncodedFeatures]) -> EncodedFeatures:
    """Several entities' encoded features (each with its own leading dimension) as one batch."""
    return EncodedFeatures(*(torch.cat(parts, dim=0) for parts in zip(*features, strict=True)))


class FeatureDims(NamedTuple):
    """Sizes a model needs to embed one entity type.

    Attributes:
        cat_sizes: embedding-table size of each categorical slot (vocabulary + 1 for index 0).
        n_num: number of numeric columns (one per numeric feature, ``dim`` per text feature).
        n_multi: total width of the multi-hot features.
    """

    cat_sizes: list[int]
    n_num: int
    n_multi: int


# Version of how a schema's user features become tensors (see FeatureEncoder.user_fingerprint).
USER_ENCODING_VERSION = 1
FEATURE_KINDS = ("categorical", "hashed", "multi_hot", "numeric", "text")
MULTI_SEP = "|"
_MISSING_TEXT = {""}  # "none" is a real MovieLens occupation


def stable_hash_bucket(value: str, buckets: int) -> int:
    """Maps a string to 1..buckets with a hash that is the same in every process (crc32).

    Args:
        value: the raw value as a string.
        buckets: number of buckets.

    Returns:
        The bucket index in 1..buckets (0 is reserved for missing).
    """
    return zlib.crc32(value.encode("utf-8")) % buckets + 1


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_TEXT


def canonical_text(value: Any) -> str | None:
    """Canonical text of a categorical value: ints and integral floats print without a decimal part.

    Used by the loaders as well, so a value read from a file gets the text a request's value gets.

    Args:
        value: a raw value (str, number, None or NaN).

    Returns:
        The stripped text, or None when the value is missing.
    """
    if _is_missing(value):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _labels(value: Any) -> list[str]:
    if _is_missing(value):
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(MULTI_SEP) if p.strip()]
    return [str(v).strip() for v in value if not _is_missing(v)]


def vector_column(name: str) -> str:
    """Name of the ``items.parquet`` column holding the stored vectors of text feature ``name``."""
    return f"{name}_vector"


def _vectors(values: Sequence[Any], dim: int) -> np.ndarray:
    """Stacks per-entity text vectors (arrays, lists or None) into Float[N, dim] with NaN for missing."""
    out = np.full((len(values), dim), np.nan, dtype=np.float64)
    for row, value in enumerate(values):
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[row] = np.asarray(value, dtype=np.float64)
    return out


def fit_feature_schema(
    frame: pd.DataFrame, specs: Sequence[Any], text: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Fits vocabularies and numeric statistics on training rows only.

    Args:
        frame: raw feature columns of the TRAINING entities (train users or warm items), one column per
            feature name (as written by ``metarec.data.entities.read_entities``); a text feature's vectors
            are in its ``vector_column``.
        specs: the FeatureSpec list from the data-set config.
        text: text feature name -> encoder description (``metarec.text_features.text_vectors``),
            recorded in its schema entry.

    Returns:
        The schema feature list (``user_features`` / ``item_features`` entries of schema.json).
    """
    schema: list[dict[str, Any]] = []
    for spec in specs:
        if spec.kind == "text":
            column = vector_column(spec.name)
            values = frame[column].tolist() if column in frame.columns else []
            vectors = _vectors(values, int(spec.dim))
            present = vectors[~np.isnan(vectors).any(axis=1)]
            mean = present.mean(axis=0) if len(present) else np.zeros(spec.dim)
            std = present.std(axis=0) if len(present) else np.ones(spec.dim)
            schema.append(
                {"name": spec.name, "kind": "text", "dim": int(spec.dim), "vector_column": column,
                 "sources": {"columns": list(spec.columns), "tags": bool(spec.tags)}}
                | dict((text or {}).get(spec.name, {}))
                | {"mean": [float(m) for m in mean], "std": [float(s) if s > 1e-12 else 1.0 for s in std]}
            )  # fmt: skip
            continue
        values = frame[spec.name] if spec.name in frame.columns else pd.Series([], dtype=object)
        if spec.kind == "categorical":
            vocab = sorted({t for t in (canonical_text(v) for v in values.tolist()) if t is not None})
            schema.append({"name": spec.name, "kind": "categorical", "vocab": vocab})
        elif spec.kind == "hashed":
            schema.append({"name": spec.name, "kind": "hashed", "buckets": int(spec.buckets)})
        elif spec.kind == "multi_hot":
            if spec.columns:
                vocab = list(spec.labels)  # declared flag labels keep their declared order
            else:
                vocab = sorted({label for v in values.tolist() for label in _labels(v)})
            schema.append({"name": spec.name, "kind": "multi_hot", "vocab": vocab})
        elif spec.kind == "numeric":
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            numbers = numbers[~np.isnan(numbers)]
            mean = float(numbers.mean()) if numbers.size else 0.0
            std = float(numbers.std()) if numbers.size else 1.0
            schema.append(
                {"name": spec.name, "kind": "numeric", "mean": mean, "std": std if std > 1e-12 else 1.0}
            )
        else:
            raise ValueError(f"feature {spec.name!r}: unknown kind {spec.kind!r}")
    return schema


class _EntityEncoder:
    """Encoder for one entity type (users or items) from its schema feature list."""

    def __init__(self, features: Sequence[dict[str, Any]], entity: str):
        self.entity = entity
        self.features = [dict(f) for f in features]
        self.by_name: dict[str, dict[str, Any]] = {}
        self.cat_sizes: list[int] = []
        self.n_num = 0
        self.n_multi = 0
        self._index: dict[str, dict[str, int]] = {}
        for feature in self.features:
            name, kind = feature.get("name"), feature.get("kind")
            if kind not in FEATURE_KINDS:
                raise ValueError(f"schema {entity} feature {name!r}: unknown kind {kind!r}")
            self.by_name[name] = feature
            if kind == "categorical":
                self._index[name] = {v: i + 1 for i, v in enumerate(feature["vocab"])}
                self.cat_sizes.append(len(feature["vocab"]) + 1)
            elif kind == "hashed":
                self.cat_sizes.append(int(feature["buckets"]) + 1)
            elif kind == "multi_hot":
                self._index[name] = {v: i for i, v in enumerate(feature["vocab"])}
                self.n_multi += len(feature["vocab"])
            elif kind == "text":
                self.n_num += int(feature["dim"])
            else:
                self.n_num += 1

    @property
    def dims(self) -> FeatureDims:
        return FeatureDims(list(self.cat_sizes), self.n_num, self.n_multi)

    def encode_columns(self, columns: dict[str, Sequence[Any]], n: int) -> EncodedFeatures:
        cat = np.zeros((n, len(self.cat_sizes)), dtype=np.int64)
        num = np.zeros((n, self.n_num), dtype=np.float32)
        multi = np.zeros((n, self.n_multi), dtype=np.float32)
        cat_slot = num_slot = multi_offset = 0
        for feature in self.features:
            name, kind = feature["name"], feature["kind"]
            values = columns.get(name)
            if kind in ("categorical", "hashed"):
                if values is not None:
                    if kind == "categorical":
                        index = self._index[name]
                        codes = [
                            index.get(t, 0) if (t := canonical_text(v)) is not None else 0 for v in values
                        ]
                    else:
                        buckets = int(feature["buckets"])
                        codes = [
                            stable_hash_bucket(t, buckets) if (t := canonical_text(v)) is not None else 0
                            for v in values
                        ]
                    cat[:, cat_slot] = codes
                cat_slot += 1
            elif kind == "multi_hot":
                index = self._index[name]
                if values is not None:
                    for row, value in enumerate(values):
                        for label in _labels(value):
                            position = index.get(label)
                            if position is not None:
                                multi[row, multi_offset + position] = 1.0
                multi_offset += len(index)
            elif kind == "text":
                dim = int(feature["dim"])
                if values is not None:
                    vectors = _vectors(list(values), dim)
                    standard = (vectors - np.asarray(feature["mean"])) / np.asarray(feature["std"])
                    num[:, num_slot : num_slot + dim] = np.where(np.isnan(standard), 0.0, standard)
                num_slot += dim
            else:
                if values is not None:
                    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce")
                    numbers = numbers.to_numpy(dtype=np.float64)
                    standard = (numbers - float(feature["mean"])) / float(feature["std"])
                    num[:, num_slot] = np.where(np.isnan(standard), 0.0, standard)
                num_slot += 1
        return EncodedFeatures(torch.from_numpy(cat), torch.from_numpy(num), torch.from_numpy(multi))

    def encode_frame(self, frame: pd.DataFrame) -> EncodedFeatures:
        # A text feature is read from its stored vectors, not re-encoded from its text.
        source = {f["name"]: f.get("vector_column", f["name"]) for f in self.features}
        columns = {name: frame[col].tolist() for name, col in source.items() if col in frame.columns}
        return self.encode_columns(columns, len(frame))

    def encode_dict(self, values: dict[str, Any]) -> EncodedFeatures:
        if not isinstance(values, dict):
            raise ValueError(f"{self.entity} features must be a JSON object, got {type(values).__name__}")
        for key, value in values.items():
            feature = self.by_name.get(key)
            if feature is None:
                raise ValueError(
                    f"unknown {self.entity} feature {key!r}; known features: {sorted(self.by_name)}"
                )
            self._check_type(feature, value)
        return self.encode_columns({k: [v] for k, v in values.items()}, 1)

    def _check_type(self, feature: dict[str, Any], value: Any) -> None:
        name, kind = feature["name"], feature["kind"]
        if value is None:
            return
        if kind in ("categorical", "hashed"):
            ok = isinstance(value, str | int | float) and not isinstance(value, bool)
            expected = "a string or number"
        elif kind == "multi_hot":
            ok = isinstance(value, str) or (
                isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
            )
            expected = "a list of strings or a '|'-joined string"
        elif kind == "text":
            ok = (
                isinstance(value, list | tuple)
                and len(value) == int(feature["dim"])
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            )
            expected = f"its encoded vector ({feature['dim']} numbers, as stored in the catalogue)"
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if isinstance(value, str):
                try:
                    float(value)
                    ok = True
                except ValueError:
                    ok = False
            expected = "a number"
        if not ok:
            raise ValueError(f"{self.entity} feature {name!r} ({kind}) must be {expected}, got {value!r}")


class FeatureEncoder:
    """Turns raw user and item features into tensors exactly as preprocessing did.

    Args:
        schema: the schema.json mapping (only ``user_features`` and ``item_features`` are used).
    """

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self._users = _EntityEncoder(schema.get("user_features") or [], "user")
        self._items = _EntityEncoder(schema.get("item_features") or [], "item")

    @property
    def user_fingerprint(self) -> str:
        """What fixes how user features are encoded: a digest of the schema's ``user_features`` (kinds,
        vocabularies, buckets, standardisation, text encoders) and of this encoding's version. Two models
        whose fingerprints match encode a user's raw features into the same tensors, so features encoded
        for one (kept with a stored state) are valid for the other. Bump ``USER_ENCODING_VERSION`` when
        the encoding code changes what a schema yields."""
        spec = {"encoding": USER_ENCODING_VERSION, "user_features": self.schema.get("user_features") or []}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def fit(
        cls,
        train_users: pd.DataFrame | None,
        warm_items: pd.DataFrame,
        user_specs: Sequence[Any],
        item_specs: Sequence[Any],
        item_text: dict[str, dict[str, Any]] | None = None,
    ) -> FeatureEncoder:
        """Fits vocabularies and numeric statistics on training entities only.

        Args:
            train_users: raw feature columns of train users (None when there are no user features).
            warm_items: raw feature columns of warm items (with text vectors, see
                ``fit_feature_schema``).
            user_specs: user FeatureSpecs from the data-set config.
            item_specs: item FeatureSpecs.
            item_text: text feature name -> encoder description, recorded in schema.json.

        Returns:
            An encoder whose ``schema`` holds ``user_features`` and ``item_features``.
        """
        users = train_users if train_users is not None else pd.DataFrame()
        return cls(
            {
                "user_features": fit_feature_schema(users, user_specs),
                "item_features": fit_feature_schema(warm_items, item_specs, item_text),
            }
        )

    @property
    def user_dims(self) -> FeatureDims:
        """Sizes of the encoded user features."""
        return self._users.dims

    @property
    def item_dims(self) -> FeatureDims:
        """Sizes of the encoded item features."""
        return self._items.dims

    def encode_users(self, frame: pd.DataFrame) -> EncodedFeatures:
        """Encodes users.

        Args:
            frame: one row per user with raw feature columns named as the features; absent columns and
                missing values encode as missing.

        Returns:
            EncodedFeatures with N = len(frame).
        """
        return self._users.encode_frame(frame)

    def encode_items(self, frame: pd.DataFrame) -> EncodedFeatures:
        """Encodes items (see ``encode_users``).

        Args:
            frame: one row per item with raw feature columns.

        Returns:
            EncodedFeatures with N = len(frame).
        """
        return self._items.encode_frame(frame)

    def encode_user_dict(self, values: dict[str, Any]) -> EncodedFeatures:
        """Encodes one user given as a mapping (a serving request).

        Args:
            values: feature name -> raw value; absent keys and None are missing. Categorical/hashed
                values are strings or numbers, numeric values numbers, multi-hot values a list of labels
                or a ``|``-joined string.

        Returns:
            EncodedFeatures with leading dimension 1.

        Raises:
            ValueError: an unknown feature key (named) or a value of the wrong type.
        """
        return self._users.encode_dict(values)

    def encode_item_dict(self, values: dict[str, Any]) -> EncodedFeatures:
        """Encodes one item given as a mapping (see ``encode_user_dict``).

        Args:
            values: feature name -> raw value.

        Returns:
            EncodedFeatures with leading dimension 1.

        Raises:
            ValueError: an unknown feature key or a value of the wrong type.
        """
        return self._items.encode_dict(values)
