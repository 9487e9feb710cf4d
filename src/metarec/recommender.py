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
  together in one batched pass (padded supports, masks) of :class:`metarec.meta.Adapter` (autograd-free
  in modes "decision"/"head", otherwise the vmapped ``torch.func`` loop; both compute the same).

Every validation failure raises :class:`RequestError` with an HTTP status and a message naming the
problem; :meth:`Recommender.answer_batch` turns them into per-request error answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metarec.features import EncodedFeatures, FeatureEncoder
from metarec.meta import Adapter, AdaptSettings, masked_mse
from metarec.model import PreferenceModel, read_model_json
from metarec.tasks import build_task_batch

ROUTE_RECOMMEND = ""
ROUTE_ADAPT = "adapt"
ROUTES = (ROUTE_RECOMMEND, ROUTE_ADAPT)
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
}
RECOMMEND_FIELDS = frozenset({"user_id", "user", "k", "candidates", "exclude"})
ADAPT_FIELDS = RECOMMEND_FIELDS | {"support", "steps"}
SUPPORT_FIELDS = frozenset({"item_id", "rating"})


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
    """

    user_features: EncodedFeatures
    user_id: str | None
    k: int
    candidate_mask: torch.Tensor


@dataclass
class AdaptRequest(RecommendRequest):
    """One validated adapt request (a recommend request plus a support set).

    Attributes:
        support_items: Long[S] item indices of the support ratings.
        support_ratings: Float[S] the ratings.
        steps: Inner steps to take (already capped by ``max_steps``).
    """

    support_items: torch.Tensor = None
    support_ratings: torch.Tensor = None
    steps: int = 0


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
            when it supports the model's adapt mode; False always uses the generic ``torch.func`` loop
            (``Adapter(..., fast=False)``).
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
        self.all_items = torch.arange(model.n_items, device=self.device)

        self.user_index: dict[str, int] = {}
        self.user_features: EncodedFeatures | None = None
        if users is not None:
            users = users.sort_values("user_idx").reset_index(drop=True)
            self.user_index = {str(user_id): row for row, user_id in enumerate(users["user_id"])}
            encoded = self.encoder.encode_users(users)
            self.user_features = EncodedFeatures(*(tensor.to(self.device) for tensor in encoded))
        # Single requests are dominated by torch.func dispatch overhead: adapt by hand when possible.
        settings = AdaptSettings.from_dict(
            mode=self.adapt_mode, inner_steps=self.default_steps, inner_lr=self.inner_lr
        )
        self.adapter = Adapter(self.model, settings, fast=fast_adapt)

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        catalogue_dir: str | Path | None = None,
        fast_adapt: bool = True,
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
            **settings: Serving limits overriding ``DEFAULT_SETTINGS`` (``max_support``,
                ``max_steps``, ``default_k``, ``max_k``, ``max_instances``).

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
        return cls(model, schema, items, users, adapt_settings, settings, card, device, fast_adapt)

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

    def _parse_user(self, request: dict[str, Any], required: bool) -> tuple[EncodedFeatures, str | None]:
        has_id, has_features = "user_id" in request, "user" in request
        if has_id and has_features:
            raise RequestError(400, "give either 'user_id' (a known user) or 'user' (features), not both")
        if has_id:
            user_id = request["user_id"]
            if not (isinstance(user_id, str) or _is_int(user_id)):
                raise RequestError(
                    400, f"'user_id' must be a string or an integer, got {_json_type(user_id)}"
                )
            if self.user_features is None:
                raise RequestError(
                    404, "this model has no user table; describe the user with 'user' features"
                )
            row = self.user_index.get(str(user_id))
            if row is None:
                raise RequestError(404, f"unknown user_id {str(user_id)!r}")
            features = EncodedFeatures(*(tensor[row : row + 1] for tensor in self.user_features))
            return features, str(user_id)
        if has_features or not required:
            try:
                encoded = self.encoder.encode_user_dict(request.get("user", {}))
            except ValueError as error:
                raise RequestError(400, f"bad 'user' features: {error}") from error
            return EncodedFeatures(*(tensor.to(self.device) for tensor in encoded)), None
        raise RequestError(400, "missing field: give 'user_id' (a known user) or 'user' (a feature object)")

    def _parse_common(
        self, request: Any, allowed: frozenset[str], user_required: bool
    ) -> tuple[EncodedFeatures, str | None, int, torch.Tensor]:
        if not isinstance(request, dict):
            raise RequestError(400, f"a request must be a JSON object, got {_json_type(request)}")
        unknown = sorted(set(request) - allowed)
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        features, user_id = self._parse_user(request, user_required)
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
        return features, user_id, k, mask

    def parse_recommend(self, request: Any) -> RecommendRequest:
        """Validates one recommend request.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request.

        Raises:
            RequestError: 400 for a malformed request, 404 for an unknown ``user_id``.
        """
        features, user_id, k, mask = self._parse_common(request, RECOMMEND_FIELDS, user_required=True)
        if not mask.any():
            raise RequestError(400, "no item left to rank after 'candidates' and 'exclude'")
        return RecommendRequest(features, user_id, k, mask.to(self.device))

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
        features, user_id, k, mask = self._parse_common(request, ADAPT_FIELDS, user_required=False)
        if "support" not in request:
            raise RequestError(400, "missing field 'support': a list of {item_id, rating} objects")
        support = request["support"]
        if not isinstance(support, list):
            raise RequestError(
                400, f"'support' must be a list of {{item_id, rating}} objects, got {_json_type(support)}"
            )
        if not support:
            raise RequestError(400, "'support' must not be empty: adaptation needs at least one rating")
        if len(support) > self.settings["max_support"]:
            raise RequestError(
                413, f"'support' holds {len(support)} ratings; at most {self.settings['max_support']} allowed"
            )
        items, ratings = [], []
        for position, entry in enumerate(support):
            where = f"support[{position}]"
            if not isinstance(entry, dict):
                raise RequestError(
                    400, f"{where} must be an object {{item_id, rating}}, got {_json_type(entry)}"
                )
            missing = sorted(SUPPORT_FIELDS - set(entry))
            if missing:
                raise RequestError(400, f"{where} is missing field(s) {missing}")
            extra = sorted(set(entry) - SUPPORT_FIELDS)
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
            items.append(entry["item_id"])
            ratings.append(float(rating))
        indices = self._item_indices(items, "support", allow_empty=False)
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
        # Items the user just rated are not recommended back.
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
            support_items=torch.tensor(indices, dtype=torch.long),
            support_ratings=torch.tensor(ratings, dtype=torch.float32),
            steps=min(steps, self.settings["max_steps"]),
        )

    # ------------------------------------------------------------------------------- inference

    def _top_k(self, scores: torch.Tensor, request: RecommendRequest) -> list[dict[str, Any]]:
        masked = scores.masked_fill(~request.candidate_mask, -math.inf)
        k = min(request.k, int(request.candidate_mask.sum()))
        values, indices = torch.topk(masked, k)
        return [
            {"item_id": self.item_ids[index], "score": round(float(value), 4)}
            for value, index in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def _stack_users(self, requests: Sequence[RecommendRequest]) -> EncodedFeatures:
        return EncodedFeatures(
            *(torch.cat(parts, dim=0) for parts in zip(*(r.user_features for r in requests), strict=True))
        )

    def recommend(self, requests: Sequence[RecommendRequest]) -> list[dict[str, Any]]:
        """Ranks the catalogue for a batch of users without adaptation (one pass, the prior state).

        Args:
            requests: Validated recommend requests.

        Returns:
            One answer per request: ``{"user": {...}, "items": [{"item_id", "score"}, ...],
            "model_version": ...}``, items by descending predicted rating.
        """
        if not requests:
            return []
        users = self._stack_users(requests)
        items = self.all_items.expand(len(requests), -1)
        scores = self.adapter.score(users, self.adapter.prior_state(len(requests)), items)
        answers = []
        for row, request in enumerate(requests):
            user = {"user_id": request.user_id} if request.user_id is not None else {"features": True}
            answers.append(
                {
                    "user": user,
                    "items": self._top_k(scores[row], request),
                    "model_version": self.model_version,
                }
            )
        return answers

    def adapt(self, requests: Sequence[AdaptRequest]) -> list[dict[str, Any]]:
        """Adapts the model to a batch of new users on their support ratings and ranks for each.

        Requests taking the same number of steps share one batched :meth:`metarec.meta.Adapter.adapt`
        (supports padded and masked; autograd-free in modes "decision"/"head" unless ``fast_adapt``
        is off).

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
        return answers

    def _adapt_group(self, requests: Sequence[AdaptRequest], steps: int) -> list[dict[str, Any]]:
        users = self._stack_users(requests)
        supports = [(r.support_items, r.support_ratings) for r in requests]
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        batch = build_task_batch(users, supports, [empty] * len(requests)).to(self.device)
        n_support = batch.support_items.shape[1]
        before = self.adapter.score(users, self.adapter.prior_state(len(requests)), batch.support_items)
        state = self.adapter.adapt(
            users, batch.support_items, batch.support_ratings, batch.support_mask, steps
        )
        # Support rows and the whole catalogue scored in one pass with each user's state.
        items = torch.cat([batch.support_items, self.all_items.expand(len(batch), -1)], dim=1)
        after = self.adapter.score(users, state, items)
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
        parsed: dict[str, list[tuple[int, int, RecommendRequest]]] = {ROUTE_RECOMMEND: [], ROUTE_ADAPT: []}
        layouts: dict[int, tuple[bool, int]] = {}
        for position, (body, route) in enumerate(zip(bodies, routes, strict=True)):
            route = (route or "").strip("/")
            try:
                if route not in ROUTES:
                    raise RequestError(404, f"unknown endpoint {route!r}; use '' (recommend) or 'adapt'")
                instances, is_kserve = split_instances(decode_body(body), self.settings["max_instances"])
                parse = self.parse_adapt if route == ROUTE_ADAPT else self.parse_recommend
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
            run = self.adapt if route == ROUTE_ADAPT else self.recommend
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
