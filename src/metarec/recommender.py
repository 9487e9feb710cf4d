"""Framework-neutral serving logic: load a model directory, validate requests, recommend and adapt.

The TorchServe handler (``metarec.serving.handler``) is a thin adapter over :class:`Recommender`;
everything here runs without TorchServe, so the whole request path is unit-testable.

Requests (one JSON object each; a KServe v1 body ``{"instances": [...]}`` carries several):

* recommend: ``{"user_id": "42"}`` (a known user, features from the catalogue in the model
  directory) or ``{"user": {"age": 25, "gender": "F"}}`` (a new user, prior from features alone);
  optional ``k``, ``candidates`` (item ids to rank instead of the whole catalogue), ``exclude``.
* adapt: ``{"support": [{"item_id": "7", "rating": 5}, ...]}`` plus optional ``user`` or
  ``user_id``, ``steps``, ``k``, ``candidates``, ``exclude``. The support items are never
  recommended back. All adapt requests of a batch that take the same number of steps are adapted
  together in one batched pass (padded supports, masks): :class:`metarec.meta.fast_adapt.FastAdapter`
  in modes "decision"/"head", otherwise the vmapped :func:`metarec.meta.adapt`. Both compute the same.

Every validation failure raises :class:`RequestError` with an HTTP status and a message naming the
problem; :meth:`Recommender.answer_batch` turns them into per-request error answers.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metarec.explain import EXPLAIN_MODE, Explainer, explanation_documents
from metarec.features import EncodedFeatures, FeatureEncoder
from metarec.meta import adapt as meta_adapt
from metarec.meta import masked_mse
from metarec.meta import predict as meta_predict
from metarec.meta.fast_adapt import FastAdapter, supports_fast_path
from metarec.model import PreferenceModel, read_model_json
from metarec.personalise import Personaliser
from metarec.realtime import HISTORY_FILE, RealtimeUsers, UserView, read_history
from metarec.state import Rating, UserStateStore, open_store
from metarec.state.store import DEFAULT_WINDOW
from metarec.tasks import TaskBatch, build_task_batch

logger = logging.getLogger(__name__)

ROUTE_RECOMMEND = ""
ROUTE_ADAPT = "adapt"
ROUTE_FEEDBACK = "feedback"
ROUTES = (ROUTE_RECOMMEND, ROUTE_ADAPT, ROUTE_FEEDBACK)
MODEL_CARD_FILE = "model_card.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"

# Serving limits; model-config.yaml's ``handler:`` section overrides them.
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_support": 100,  # ratings per adapt request (larger -> 413)
    "max_steps": 10,  # inner steps per adapt request (a larger request is capped)
    "default_k": 10,  # items returned when a request gives no k
    "max_k": 100,  # largest k accepted
    "max_instances": 64,  # requests in one KServe v1 body
    "max_feedback": 100,  # ratings in one feedback request (larger -> 413)
    "state_window": DEFAULT_WINDOW,  # ratings kept per user in the state store (the support set bound)
}
RECOMMEND_FIELDS = frozenset({"user_id", "user", "k", "candidates", "exclude", "include_rated", "explain"})
ADAPT_FIELDS = RECOMMEND_FIELDS | {"support", "steps"}
FEEDBACK_FIELDS = RECOMMEND_FIELDS | {"ratings"}
SUPPORT_FIELDS = frozenset({"item_id", "rating"})
FEEDBACK_RATING_FIELDS = SUPPORT_FIELDS | {"timestamp"}
EXPLAIN_TOP_RATINGS = 5  # ratings named per explained item (the rest are summed)


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status to answer.

    Args:
        status: HTTP status code (4xx).
        message: What is wrong, naming the field or value.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message

    def to_body(self) -> dict[str, Any]:
        """Returns the JSON error document (same keys as TorchServe's own errors)."""
        return {"code": self.status, "type": "RequestError", "message": self.message}


@dataclass
class RecommendRequest:
    """One validated recommend request.

    Attributes:
        user_features: Encoded features of the user (leading dimension 1).
        user_id: Raw id of a known user, None for a user described by features.
        k: Number of items to return.
        candidate_mask: Bool[n_items] items that may be returned (candidates minus exclusions).
        include_rated: Keep the items the user has rated (excluded by default).
        explain: Add an ``explanation`` to every returned item.
        described: The request gave ``user`` features (with a new ``user_id``).
    """

    user_features: EncodedFeatures
    user_id: str | None
    k: int
    candidate_mask: torch.Tensor
    include_rated: bool = False
    explain: bool = False
    described: bool = False


@dataclass
class FeedbackRequest(RecommendRequest):
    """One validated feedback request: ratings to append to a user's state.

    Attributes:
        ratings: The validated ratings (catalogue items, in range), in request order.
        answer_items: Whether to answer the new top-k (the request gave ``k``).
    """

    ratings: list[Rating] = None
    answer_items: bool = False


@dataclass
class AdaptRequest(RecommendRequest):
    """One validated adapt request (a recommend request plus a support set).

    Attributes:
        support_items: Long[S] item indices of the support ratings.
        support_ratings: Float[S] the ratings.
        steps: Inner steps to take (already capped by ``max_steps``).
        support_ids: The raw item ids of the support ratings.
    """

    support_items: torch.Tensor = None
    support_ratings: torch.Tensor = None
    steps: int = 0
    support_ids: list[str] = None


def decode_body(body: Any) -> Any:
    """Decodes a request body into JSON values.

    Args:
        body: bytes / bytearray / str holding JSON, or an already decoded value (TorchServe decodes
            ``application/json`` bodies itself).

    Returns:
        The decoded value.

    Raises:
        RequestError: 400 when the body is empty or not valid UTF-8 JSON.
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(400, f"invalid JSON: body is not UTF-8 ({error})") from error
    if isinstance(body, str):
        if not body.strip():
            raise RequestError(400, "invalid JSON: empty request body")
        try:
            return json.loads(body)
        except ValueError as error:
            raise RequestError(400, f"invalid JSON: {error}") from error
    if body is None:
        raise RequestError(400, "invalid JSON: empty request body")
    return body


def split_instances(body: Any, max_instances: int) -> tuple[list[Any], bool]:
    """Splits a decoded body into requests.

    Args:
        body: Decoded JSON: one request object, or a KServe v1 ``{"instances": [...]}`` object.
        max_instances: Most instances accepted in one KServe body.

    Returns:
        ``(requests, is_kserve)``.

    Raises:
        RequestError: 400 for a body that is not an object, or a bad ``instances`` list.
    """
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {_json_type(body)}")
    if "instances" not in body:
        return [body], False
    extra = sorted(set(body) - {"instances"})
    if extra:
        raise RequestError(400, f"a KServe v1 body holds only 'instances'; unexpected field(s) {extra}")
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "'instances' must be a non-empty list of request objects")
    if len(instances) > max_instances:
        raise RequestError(
            413, f"'instances' holds {len(instances)} requests; at most {max_instances} allowed"
        )
    return instances, True


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Recommender:
    """A meta-learned recommender ready to serve: model, catalogue, feature encoder, limits.

    Args:
        model: The trained PreferenceModel (catalogue buffers included).
        schema: The preprocessing ``schema.json`` mapping.
        items: ``items.parquet`` table (``item_idx``, raw ``item_id``, raw features), one row per
            catalogue item in model order.
        users: ``users.parquet`` table (``user_idx``, raw ``user_id``, raw features) or None.
        adapt_settings: ``mode``, ``inner_steps`` and ``inner_lr`` from ``model.json``.
        settings: Serving limits (keys of ``DEFAULT_SETTINGS``).
        model_card: The model card shown by ``describe`` (None when the directory has none).
        device: Torch device to run on.
        fast_adapt: Adapt with :class:`metarec.meta.fast_adapt.FastAdapter` (no autograd, same math)
            when it supports the model's adapt mode; False always uses the generic
            :func:`metarec.meta.adapt` / :func:`metarec.meta.predict`.
        store: The per-user state store (feedback, stored adapted states); None serves known users
            from their history without caching and refuses feedback.
        history: Raw user id -> known ratings (the archive's ``history.parquet``).
    """

    def __init__(
        self,
        model: PreferenceModel,
        schema: dict[str, Any],
        items: pd.DataFrame,
        users: pd.DataFrame | None,
        adapt_settings: dict[str, Any],
        settings: dict[str, Any] | None = None,
        model_card: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        fast_adapt: bool = True,
        store: UserStateStore | None = None,
        history: dict[str, list[Rating]] | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.schema = schema
        self.encoder = FeatureEncoder(schema)
        self.settings = resolve_settings(settings)
        self.model_card = model_card
        # Echoed in every answer so a caller can tell which model ranked for it.
        self.model_version = str((model_card or {}).get("version", "unversioned"))
        self.adapt_mode = str(adapt_settings.get("mode", "decision"))
        self.inner_lr = float(adapt_settings.get("inner_lr", 0.01))
        self.default_steps = min(int(adapt_settings.get("inner_steps", 5)), self.settings["max_steps"])
        self.rating_min = float(schema.get("rating_min", model.rating_min))
        self.rating_max = float(schema.get("rating_max", model.rating_max))

        items = items.sort_values("item_idx").reset_index(drop=True)
        if len(items) != model.n_items or not np.array_equal(
            items["item_idx"].to_numpy(), np.arange(len(items))
        ):
            raise ValueError(
                f"items table has {len(items)} rows with item_idx not 0..n-1; model has {model.n_items}"
            )
        self.item_ids = [str(item_id) for item_id in items["item_id"]]
        self.item_index = {item_id: idx for idx, item_id in enumerate(self.item_ids)}
        self.item_display = display_fields(items)
        self.all_items = torch.arange(model.n_items, device=self.device)

        self.user_index: dict[str, int] = {}
        self.user_features: EncodedFeatures | None = None
        if users is not None:
            users = users.sort_values("user_idx").reset_index(drop=True)
            self.user_index = {str(user_id): row for row, user_id in enumerate(users["user_id"])}
            encoded = self.encoder.encode_users(users)
            self.user_features = EncodedFeatures(*(tensor.to(self.device) for tensor in encoded))
        # Single requests are dominated by torch.func dispatch overhead: adapt by hand when possible.
        self.fast_adapter: FastAdapter | None = None
        if fast_adapt and supports_fast_path(self.model, self.adapt_mode):
            self.fast_adapter = FastAdapter(self.model, self.adapt_mode)
        self.personaliser = Personaliser(self.model, self.adapt_mode, self.inner_lr, self.fast_adapter)
        self.store = store
        self.users = (
            RealtimeUsers(self.personaliser, store, self.item_index, history or {}, self.model_version,
                          self.default_steps)
            if store is not None
            else None
        )  # fmt: skip
        self.history = history or {}
        self._explainer: Explainer | None = None

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        catalogue_dir: str | Path | None = None,
        fast_adapt: bool = True,
        state_url: str | None = None,
        **settings: Any,
    ) -> Recommender:
        """Loads a model directory (or an unpacked archive).

        Args:
            model_dir: Directory holding ``model.pt``, ``model.json``, ``schema.json`` and, for an
                archive, ``items.parquet``/``users.parquet``/``model_card.json``.
            device: Torch device.
            catalogue_dir: Where to find ``items.parquet``/``users.parquet`` when ``model_dir`` lacks
                them (a preprocessing output directory).
            fast_adapt: See :class:`Recommender`.
            state_url: The per-user state store (``sqlite:///path`` or ``redis://host:port/db``, see
                :func:`metarec.state.open_store`); None: no store (no feedback, no cached states).
            **settings: Serving limits overriding ``DEFAULT_SETTINGS`` (``max_support``,
                ``max_steps``, ``default_k``, ``max_k``, ``max_instances``, ``max_feedback``,
                ``state_window``).

        Returns:
            The Recommender.

        Raises:
            FileNotFoundError: A required file is missing.
        """
        model_dir = Path(model_dir)
        search = [model_dir] + ([Path(catalogue_dir)] if catalogue_dir is not None else [])

        def find(name: str, required: bool) -> Path | None:
            for folder in search:
                if (folder / name).is_file():
                    return folder / name
            if required:
                raise FileNotFoundError(f"{name} not found in {', '.join(str(f) for f in search)}")
            return None

        schema = json.loads(find("schema.json", True).read_text())
        model = PreferenceModel.from_dir(model_dir, map_location=device)
        document = read_model_json(model_dir)
        items = pd.read_parquet(find(ITEMS_FILE, True))
        users_path = find(USERS_FILE, False)
        users = pd.read_parquet(users_path) if users_path is not None else None
        card_path = find(MODEL_CARD_FILE, False)
        card = json.loads(card_path.read_text()) if card_path is not None else None
        adapt_settings = document.get("adapt") or {}
        history = read_history(find(HISTORY_FILE, False))
        window = int(settings.get("state_window", DEFAULT_SETTINGS["state_window"]))
        store = open_store(state_url, window) if state_url is not None else None
        return cls(
            model, schema, items, users, adapt_settings, settings, card, device, fast_adapt, store, history
        )

    # ----------------------------------------------------------------------------------- parsing

    def _item_indices(self, values: Any, field: str, allow_empty: bool) -> list[int]:
        """Maps a list of raw item ids to item indices, naming unknown ids."""
        if not isinstance(values, list):
            raise RequestError(400, f"'{field}' must be a list of item ids, got {_json_type(values)}")
        if not values and not allow_empty:
            raise RequestError(400, f"'{field}' must not be empty")
        bad_type = [value for value in values if not (isinstance(value, str) or _is_int(value))]
        if bad_type:
            raise RequestError(400, f"'{field}' item ids must be strings or integers, got {bad_type[:5]}")
        unknown = [value for value in values if str(value) not in self.item_index]
        if unknown:
            raise RequestError(400, f"unknown item id(s) in '{field}': {unknown[:10]}")
        return [self.item_index[str(value)] for value in values]

    def _parse_user(
        self, request: dict[str, Any], required: bool, allow_new: bool = False
    ) -> tuple[EncodedFeatures, str | None, bool]:
        """The user's features, raw id and whether ``user`` features were given.

        A ``user_id`` the catalogue does not know is accepted when ``allow_new`` (adapt, feedback: a new
        user, described by optional ``user`` features) or when the state store holds that user.
        """
        has_id, has_features = "user_id" in request, "user" in request
        user_id = None
        if has_id:
            user_id = request["user_id"]
            if not (isinstance(user_id, str) or _is_int(user_id)):
                raise RequestError(
                    400, f"'user_id' must be a string or an integer, got {_json_type(user_id)}"
                )
            user_id = str(user_id)
            row = self.user_index.get(user_id)
            if row is not None:
                if has_features:
                    raise RequestError(
                        400, "give either 'user_id' (a known user) or 'user' (features), not both"
                    )
                return self.user_encoding(user_id), user_id, False
            if not (allow_new and self.users is not None) and not self._has_state(user_id):
                if self.user_features is None and self.users is None:
                    raise RequestError(
                        404, "this model has no user table; describe the user with 'user' features"
                    )
                raise RequestError(404, f"unknown user_id {user_id!r}")
        if has_id or has_features or not required:
            try:
                encoded = self.encoder.encode_user_dict(request.get("user", {}))
            except ValueError as error:
                raise RequestError(400, f"bad 'user' features: {error}") from error
            return EncodedFeatures(*(tensor.to(self.device) for tensor in encoded)), user_id, has_features
        raise RequestError(400, "missing field: give 'user_id' (a known user) or 'user' (a feature object)")

    def user_encoding(self, user_id: str) -> EncodedFeatures:
        """The catalogue features of a known user (leading dimension 1).

        Raises:
            KeyError: a user the catalogue does not know.
        """
        row = self.user_index[str(user_id)]
        return EncodedFeatures(*(tensor[row : row + 1] for tensor in self.user_features))

    def _has_state(self, user_id: str) -> bool:
        return self.users is not None and self.store.get(user_id) is not None

    def _parse_common(
        self, request: Any, allowed: frozenset[str], user_required: bool, allow_new: bool = False
    ) -> tuple[EncodedFeatures, str | None, int, torch.Tensor, dict[str, bool]]:
        if not isinstance(request, dict):
            raise RequestError(400, f"a request must be a JSON object, got {_json_type(request)}")
        unknown = sorted(set(request) - allowed)
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        features, user_id, described = self._parse_user(request, user_required, allow_new)
        flags = {"described": described}
        for flag in ("include_rated", "explain"):
            value = request.get(flag, False)
            if not isinstance(value, bool):
                raise RequestError(400, f"'{flag}' must be true or false, got {_json_type(value)}")
            flags[flag] = value
        if flags["explain"] and self.adapt_mode != EXPLAIN_MODE:
            raise RequestError(
                400,
                f"'explain' needs a model adapted in mode {EXPLAIN_MODE!r}; this one adapts in {self.adapt_mode!r}",
            )
        k = request.get("k", self.settings["default_k"])
        if not _is_int(k) or k <= 0:
            raise RequestError(400, f"'k' must be a positive integer, got {k!r}")
        if k > self.settings["max_k"]:
            raise RequestError(400, f"'k' is {k}; at most {self.settings['max_k']} allowed")
        mask = torch.ones(self.model.n_items, dtype=torch.bool)
        if "candidates" in request:
            mask[:] = False
            mask[self._item_indices(request["candidates"], "candidates", allow_empty=False)] = True
        if "exclude" in request:
            mask[self._item_indices(request["exclude"], "exclude", allow_empty=True)] = False
        return features, user_id, k, mask, flags

    def parse_recommend(self, request: Any) -> RecommendRequest:
        """Validates one recommend request.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request.

        Raises:
            RequestError: 400 for a malformed request, 404 for an unknown ``user_id``.
        """
        features, user_id, k, mask, flags = self._parse_common(request, RECOMMEND_FIELDS, user_required=True)
        if not mask.any():
            raise RequestError(400, "no item left to rank after 'candidates' and 'exclude'")
        return RecommendRequest(features, user_id, k, mask.to(self.device), **flags)

    def parse_adapt(self, request: Any) -> AdaptRequest:
        """Validates one adapt request.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request (steps capped by ``max_steps``).

        Raises:
            RequestError: 400 for a malformed request or support set, 404 for an unknown
                ``user_id``, 413 for a support set larger than ``max_support``.
        """
        (features, user_id, k, mask, flags), (items, indices, ratings, _) = self._parse_rated(
            request, ADAPT_FIELDS, False, "support", SUPPORT_FIELDS, self.settings["max_support"]
        )
        if len(set(indices)) != len(indices):
            seen, duplicates = set(), []
            for value, index in zip(items, indices, strict=True):
                if index in seen:
                    duplicates.append(value)
                seen.add(index)
            raise RequestError(400, f"duplicate item id(s) in 'support': {duplicates[:10]}")
        steps = request.get("steps", self.default_steps)
        if not _is_int(steps) or steps < 0:
            raise RequestError(400, f"'steps' must be a non-negative integer, got {steps!r}")
        # Items the user just rated are not recommended back (unless asked for).
        if not flags["include_rated"]:
            mask[indices] = False
        if not mask.any():
            raise RequestError(
                400, "no item left to rank after 'candidates', 'exclude' and the support items"
            )
        return AdaptRequest(
            features,
            user_id,
            k,
            mask.to(self.device),
            **flags,
            support_items=torch.tensor(indices, dtype=torch.long),
            support_ratings=torch.tensor(ratings, dtype=torch.float32),
            steps=min(steps, self.settings["max_steps"]),
            support_ids=[str(item) for item in items],
        )

    def parse_feedback(self, request: Any) -> FeedbackRequest:
        """Validates one feedback request: ``user_id``, ``ratings`` [{item_id, rating, timestamp}], ``k``.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request; nothing is stored before every rating passed.

        Raises:
            RequestError: 400 for a malformed request, an unknown item or an out-of-scale rating, 404
                when the server has no state store, 413 for more than ``max_feedback`` ratings.
        """
        if self.users is None:
            raise RequestError(404, "feedback needs a state store; this server was started without one")
        if isinstance(request, dict) and "user_id" not in request:
            raise RequestError(400, "missing field 'user_id': feedback belongs to a user")
        (features, user_id, k, mask, flags), (items, _, ratings, stamps) = self._parse_rated(
            request, FEEDBACK_FIELDS, True, "ratings", FEEDBACK_RATING_FIELDS, self.settings["max_feedback"]
        )
        if not mask.any():
            raise RequestError(400, "no item left to rank after 'candidates' and 'exclude'")
        return FeedbackRequest(
            features,
            user_id,
            k,
            mask.to(self.device),
            **flags,
            ratings=[Rating(str(i), r, t) for i, r, t in zip(items, ratings, stamps, strict=True)],
            answer_items="k" in request,
        )

    def _parse_rated(self, request, fields, user_required, field, allowed, limit) -> tuple[tuple, tuple]:
        """The common fields (new users allowed) and the rating list under ``field`` of a request."""
        common = self._parse_common(request, fields, user_required, allow_new=True)
        if field not in request:
            shape = "{" + ", ".join(sorted(allowed)) + "}"
            raise RequestError(400, f"missing field '{field}': a list of {shape} objects")
        return common, self._parse_ratings(request[field], field, allowed, limit)

    def _parse_ratings(
        self, entries: Any, field: str, allowed: frozenset[str], limit: int
    ) -> tuple[list, list[int], list[float], list[float | None]]:
        """Validates a list of rating objects (``item_id``, ``rating`` and, where allowed, ``timestamp``).

        Returns:
            ``(raw item ids, item indices, ratings, timestamps)``.
        """
        shape = "{" + ", ".join(sorted(allowed)) + "}"
        if not isinstance(entries, list):
            raise RequestError(400, f"'{field}' must be a list of {shape} objects, got {_json_type(entries)}")
        if not entries:
            raise RequestError(400, f"'{field}' must not be empty: give at least one rating")
        if len(entries) > limit:
            raise RequestError(413, f"'{field}' holds {len(entries)} ratings; at most {limit} allowed")
        items, ratings, stamps = [], [], []
        for position, entry in enumerate(entries):
            where = f"{field}[{position}]"
            if not isinstance(entry, dict):
                raise RequestError(400, f"{where} must be an object {shape}, got {_json_type(entry)}")
            missing = sorted(SUPPORT_FIELDS - set(entry))
            if missing:
                raise RequestError(400, f"{where} is missing field(s) {missing}")
            extra = sorted(set(entry) - allowed)
            if extra:
                raise RequestError(400, f"{where} has unknown field(s) {extra}")
            rating = entry["rating"]
            if not _is_number(rating):
                raise RequestError(400, f"{where}.rating must be a number, got {_json_type(rating)}")
            if not math.isfinite(rating):
                raise RequestError(400, f"{where}.rating must be finite, got {rating}")
            if not self.rating_min <= rating <= self.rating_max:
                raise RequestError(
                    400,
                    f"{where}.rating {rating} is outside the trained range [{self.rating_min:g}, {self.rating_max:g}]",
                )
            stamp = entry.get("timestamp")
            if stamp is not None and not (_is_number(stamp) and math.isfinite(stamp)):
                raise RequestError(400, f"{where}.timestamp must be a finite number (seconds), got {stamp!r}")
            items.append(entry["item_id"])
            ratings.append(float(rating))
            stamps.append(None if stamp is None else float(stamp))
        return items, self._item_indices(items, field, allow_empty=False), ratings, stamps

    # ------------------------------------------------------------------------------- inference

    def _top_k(
        self, scores: torch.Tensor, request: RecommendRequest, mask: torch.Tensor | None = None
    ) -> list[dict[str, Any]]:
        mask = request.candidate_mask if mask is None else mask
        masked = scores.masked_fill(~mask, -math.inf)
        k = min(request.k, int(mask.sum()))
        values, indices = torch.topk(masked, k)
        return [
            {"item_id": self.item_ids[index], "score": round(float(value), 4), **self.item_display[index]}
            for value, index in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def _stack_users(self, requests: Sequence[RecommendRequest]) -> EncodedFeatures:
        return EncodedFeatures(
            *(torch.cat(parts, dim=0) for parts in zip(*(r.user_features for r in requests), strict=True))
        )

    def recommend(self, requests: Sequence[RecommendRequest]) -> list[dict[str, Any]]:
        """Ranks the catalogue for a batch of users.

        Users with a state (known users with history, users who sent feedback or adapted with a
        ``user_id``) are scored with their adapted state, their rated items excluded unless
        ``include_rated``; the others share one forward pass of the un-adapted model.

        Args:
            requests: Validated recommend requests.

        Returns:
            One answer per request: ``{"user": {...}, "items": [{"item_id", "score"}, ...],
            "model_version": ...}``, items by descending predicted rating; for a named user also
            ``personalised``, and with a state ``state_version`` and ``support_size``.
        """
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        prior_rows = []
        for position, request in enumerate(requests):
            view = self._view(request)
            if view is None:
                prior_rows.append(position)
            else:
                answers[position] = self._personal_answer(request, view)
        if prior_rows:
            users = self._stack_users([requests[p] for p in prior_rows])
            items = self.all_items.expand(len(prior_rows), -1)
            with torch.no_grad():
                scores = self.model.forward_batch(users.cat, users.num, users.multi, items)
            for row, position in enumerate(prior_rows):
                request = requests[position]
                answer = {"user": _user_field(request), "items": self._top_k(scores[row], request)}
                if request.user_id is not None:
                    answer["personalised"] = False
                if request.explain:
                    self._explain(answer["items"], request.user_features, [], [])
                answers[position] = {**answer, "model_version": self.model_version}
        return answers

    def _view(self, request: RecommendRequest) -> UserView | None:
        if self.users is None or request.user_id is None:
            return None
        view = self.users.view(request.user_id, request.user_features, self._authoritative(request))
        if view is not None:
            logger.info("realtime user=%s route=recommend version=%d", request.user_id, view.version)
        return view

    def _authoritative(self, request: RecommendRequest) -> bool:
        """Whether the request's features are the user's (catalogue or given), not a stand-in."""
        return request.described or request.user_id in self.user_index

    def _personal_answer(self, request: RecommendRequest, view: UserView) -> dict[str, Any]:
        """Top-k of a user with a state: scored with it, rated items excluded unless asked for."""
        scores = self.personaliser.score(view.features, view.adapted, self.all_items)
        mask = request.candidate_mask.clone()
        if not request.include_rated:
            mask[view.support_items] = False
        items = self._top_k(scores, request, mask) if mask.any() else []
        if request.explain and items:
            self._explain(items, view.features, view.support_items, view.support_ratings)
        return {
            "user": _user_field(request),
            "items": items,
            "personalised": view.adapted is not None,
            "state_version": view.version,
            "support_size": len(view.support_items),
            "model_version": self.model_version,
        }

    def _explain(
        self, items: list[dict[str, Any]], user: EncodedFeatures, support_items, support_ratings, steps=None
    ) -> None:
        """Adds an ``explanation`` to each returned item (see docs/explanations.md)."""
        if self._explainer is None:
            self._explainer = Explainer(self.model, self.adapt_mode, self.inner_lr, self.schema)
        indices = [self.item_index[entry["item_id"]] for entry in items]
        documents = explanation_documents(
            self._explainer, tuple(tensor[0].cpu() for tensor in user), list(support_items), list(support_ratings),
            indices, self.default_steps if steps is None else steps, self.item_ids, EXPLAIN_TOP_RATINGS,
        )  # fmt: skip
        for entry, document in zip(items, documents, strict=True):
            entry["explanation"] = document

    def feedback(self, requests: Sequence[FeedbackRequest]) -> list[dict[str, Any]]:
        """Appends each request's ratings to its user's state, re-adapts and stores it.

        The user is re-adapted from the meta-learned initialisation on their history plus all their
        feedback (the same inner loop and steps as evaluation), never from the previous state.

        Args:
            requests: Validated feedback requests.

        Returns:
            One answer per request: ``{"user", "stored": true, "state_version", "support_size",
            "model_version"}`` and, when the request gave ``k``, the new top-k ``items``.
        """
        answers = []
        for request in requests:
            view = self.users.record(
                request.user_id, request.ratings, request.user_features, self._authoritative(request)
            )
            logger.info("realtime user=%s route=feedback version=%d", request.user_id, view.version)
            answer = self._personal_answer(request, view) if request.answer_items else {
                "user": _user_field(request), "state_version": view.version,
                "support_size": len(view.support_items), "model_version": self.model_version,
            }  # fmt: skip
            answers.append({**answer, "stored": True})
        return answers

    def adapt(self, requests: Sequence[AdaptRequest]) -> list[dict[str, Any]]:
        """Adapts the model to a batch of new users on their support ratings and ranks for each.

        Requests taking the same number of steps share one batched pass of the meta-learning inner
        loop (supports padded and masked): the autograd-free :class:`~metarec.meta.fast_adapt.FastAdapter`
        when it supports the adapt mode, else :func:`metarec.meta.adapt` vmapped over the users.

        Args:
            requests: Validated adapt requests.

        Returns:
            One answer per request: ``{"items": [...], "steps": n, "support_size": s,
            "support_loss_before": mse, "support_loss_after": mse, "model_version": ...}`` (mean squared error on the
            support ratings before and after adaptation).
        """
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        by_steps: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            by_steps.setdefault(request.steps, []).append(position)
        for steps, positions in by_steps.items():
            group = [requests[p] for p in positions]
            for position, answer in zip(positions, self._adapt_group(group, steps), strict=True):
                answers[position] = answer
        for request, answer in zip(requests, answers, strict=True):
            if request.explain:
                self._explain(answer["items"], request.user_features, request.support_items.tolist(),
                              request.support_ratings.tolist(), request.steps)  # fmt: skip
            if self._is_new_user(request.user_id):
                # A new user's next plain recommend is personalised: keep their ratings and state.
                ratings = [
                    Rating(i, r)
                    for i, r in zip(request.support_ids, request.support_ratings.tolist(), strict=True)
                ]
                view = self.users.record(
                    request.user_id, ratings, request.user_features, self._authoritative(request)
                )
                logger.info("realtime user=%s route=adapt version=%d", request.user_id, view.version)
                answer.update(stored=True, state_version=view.version)
        return answers

    def _is_new_user(self, user_id: str | None) -> bool:
        """A named user the server knows nothing about yet (no history, no stored state)."""
        if self.users is None or user_id is None or user_id in self.history:
            return False
        return self.store.get(user_id) is None

    def _adapt_group(self, requests: Sequence[AdaptRequest], steps: int) -> list[dict[str, Any]]:
        users = self._stack_users(requests)
        supports = [(r.support_items, r.support_ratings) for r in requests]
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        batch = build_task_batch(users, supports, [empty] * len(requests)).to(self.device)
        n_support = batch.support_items.shape[1]
        with torch.no_grad():
            if self.fast_adapter is not None:
                before, after = self._fast_adapt_group(users, batch, steps)
            else:
                before, after = self._generic_adapt_group(users, batch, steps)
        answers = []
        for row, request in enumerate(requests):
            mask = batch.support_mask[row]
            loss_before = masked_mse(before[row], batch.support_ratings[row], mask)
            loss_after = masked_mse(after[row, :n_support], batch.support_ratings[row], mask)
            answers.append(
                {
                    "items": self._top_k(after[row, n_support:], request),
                    "steps": steps,
                    "support_size": int(mask.sum()),
                    "support_loss_before": round(float(loss_before), 6),
                    "support_loss_after": round(float(loss_after), 6),
                    "model_version": self.model_version,
                }
            )
        return answers

    def _fast_adapt_group(
        self, users: EncodedFeatures, batch: TaskBatch, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Support predictions before adaptation and [support, catalogue] predictions after (fast path)."""
        result = self.fast_adapter.adapt_and_score(
            users.cat,
            users.num,
            users.multi,
            batch.support_items,
            batch.support_ratings,
            batch.support_mask,
            steps,
            self.inner_lr,
        )
        return result.support_before, torch.cat([result.support_after, result.scores], dim=1)

    def _generic_adapt_group(
        self, users: EncodedFeatures, batch: TaskBatch, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`_fast_adapt_group`, with the generic ``torch.func`` inner loop (any adapt mode)."""
        before = self.model.forward_batch(users.cat, users.num, users.multi, batch.support_items)
        adapted = meta_adapt(
            self.model, None, batch, steps, self.inner_lr, self.adapt_mode, create_graph=False
        )
        # Support rows and the whole catalogue scored in one pass with each user's parameters.
        items = torch.cat([batch.support_items, self.all_items.expand(len(batch), -1)], dim=1)
        after = meta_predict(self.model, adapted, users.cat, users.num, users.multi, items, self.adapt_mode)
        return before, after

    # ---------------------------------------------------------------------------------- batches

    def answer_batch(self, bodies: Sequence[Any], routes: Sequence[str | None]) -> list[tuple[int, Any]]:
        """Answers a batch of HTTP requests: validates each, then runs all valid ones together.

        All recommend requests of the batch (instances of KServe bodies included) share one forward
        pass; all adapt requests share one vectorised adaptation per step count. A request that
        fails validation gets its own error answer and does not affect the others.

        Args:
            bodies: One raw body per HTTP request (bytes, str or decoded JSON).
            routes: The URL suffix of each request (``""``/None = recommend, ``"adapt"``).

        Returns:
            One ``(http_status, json_document)`` per request, in order.
        """
        results: list[tuple[int, Any] | None] = [None] * len(bodies)
        # (request position, instance position) of each parsed instance, per route.
        parsed: dict[str, list[tuple[int, int, RecommendRequest]]] = {route: [] for route in ROUTES}
        layouts: dict[int, tuple[bool, int]] = {}
        for position, (body, route) in enumerate(zip(bodies, routes, strict=True)):
            route = (route or "").strip("/")
            try:
                if route not in ROUTES:
                    raise RequestError(
                        404, f"unknown endpoint {route!r}; use '' (recommend), 'adapt' or 'feedback'"
                    )
                instances, is_kserve = split_instances(decode_body(body), self.settings["max_instances"])
                parse = {ROUTE_ADAPT: self.parse_adapt, ROUTE_FEEDBACK: self.parse_feedback}.get(
                    route, self.parse_recommend
                )
                requests = []
                for instance_position, instance in enumerate(instances):
                    try:
                        requests.append(parse(instance))
                    except RequestError as error:
                        if is_kserve:
                            error.message = f"instances[{instance_position}]: {error.message}"
                            error.args = (error.message,)
                        raise
            except RequestError as error:
                results[position] = (error.status, error.to_body())
                continue
            layouts[position] = (is_kserve, len(requests))
            parsed[route].extend((position, i, request) for i, request in enumerate(requests))

        answers: dict[tuple[int, int], dict[str, Any]] = {}
        for route, entries in parsed.items():
            if not entries:
                continue
            run = {ROUTE_ADAPT: self.adapt, ROUTE_FEEDBACK: self.feedback}.get(route, self.recommend)
            for (position, instance, _), answer in zip(entries, run([e[2] for e in entries]), strict=True):
                answers[(position, instance)] = answer
        for position, (is_kserve, count) in layouts.items():
            if is_kserve:
                results[position] = (200, {"predictions": [answers[(position, i)] for i in range(count)]})
            else:
                results[position] = (200, answers[(position, 0)])
        return results

    def describe(self) -> dict[str, Any]:
        """Returns the model card (or a minimal description when the directory has no card)."""
        if self.model_card is not None:
            return self.model_card
        return {"n_items": self.model.n_items, "adapt": {"mode": self.adapt_mode, "inner_lr": self.inner_lr}}


# Keys of a returned item that a display field may not take.
RESERVED_ITEM_KEYS = frozenset({"item_id", "score", "explanation"})


def display_fields(items: pd.DataFrame) -> list[dict[str, Any]]:
    """Each catalogue item's display fields (``display_<name>`` columns of items.parquet), JSON-ready.

    Args:
        items: the items table in item-index order.

    Returns:
        One ``{name: value}`` per item (missing values left out; empty without display columns).
    """
    columns = [c for c in items.columns if c.startswith("display_") and c[8:] not in RESERVED_ITEM_KEYS]
    rows: list[dict[str, Any]] = [{} for _ in range(len(items))]
    for column in columns:
        for row, value in enumerate(items[column].tolist()):
            value = _plain(value)
            if value is not None:
                rows[row][column[len("display_") :]] = value
    return rows


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values; NaN as None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _user_field(request: RecommendRequest) -> dict[str, Any]:
    return {"user_id": request.user_id} if request.user_id is not None else {"features": True}


def resolve_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Merges serving limits over ``DEFAULT_SETTINGS``.

    Args:
        settings: Overrides (None = defaults).

    Returns:
        The full settings.

    Raises:
        ValueError: An unknown key or a value that is not a positive integer.
    """
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown serving setting(s) {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    full = {**DEFAULT_SETTINGS, **settings}
    for key, value in full.items():
        if not _is_int(value) or value <= 0:
            raise ValueError(f"serving setting {key!r} must be a positive integer, got {value!r}")
    return full
