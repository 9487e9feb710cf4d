"""Parsing one route's request object into a validated request for the Recommender.

Requests (one JSON object each; a KServe v1 body ``{"instances": [...]}`` carries several,
:func:`metarec.serving.bodies.split_instances`):

* recommend (route ``""``): ``{"user_id": "42"}`` (a known user) or ``{"user": {"age": 25}}`` (a new
  user described by features); optional ``k``, ``candidates`` (item ids to rank), ``exclude``.
* adapt (route ``"adapt"``): ``{"support": [{"item_id": "7", "rating": 5}, ...]}`` plus optional
  ``user`` or ``user_id``, ``steps``, ``k``, ``candidates``, ``exclude``.
* feedback (route ``"feedback"``): ``{"user_id": "42", "ratings": [...]}`` (docs/realtime.md).
* forget (route ``"forget"``): ``{"user_id": "42"}``: erases the user's stored ratings and state.

Every request is validated before it reaches the model, so one request can only fail itself: numbers
must be finite and numeric user features within ``feature_z_limit`` standard deviations of their
training mean, and error messages quote at most ``max_quote_chars`` of any input. Unknown category
values are accepted (encoded as "unknown", as in training) and the answer says so under ``"notes"``.
Limits: :class:`metarec.serving_settings.RequestLimits`. The body is decoded before
(:mod:`metarec.serving.bodies`); a batch is answered by :mod:`metarec.serving.routes`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from metarec.explain import EXPLAIN_MODE
from metarec.features import EncodedFeatures
from metarec.recommender import AdaptRequest, FeedbackRequest, ForgetRequest, Recommender, RecommendRequest
from metarec.serving.errors import RequestError, json_type, quote, quote_keys
from metarec.serving_settings import RequestLimits
from metarec.state import Rating

RECOMMEND_FIELDS = frozenset({"user_id", "user", "k", "candidates", "exclude", "include_rated", "explain"})
ADAPT_FIELDS = RECOMMEND_FIELDS | {"support", "steps"}
FEEDBACK_FIELDS = RECOMMEND_FIELDS | {"ratings"}
SUPPORT_FIELDS = frozenset({"item_id", "rating"})
FEEDBACK_RATING_FIELDS = SUPPORT_FIELDS | {"timestamp"}
FORGET_FIELDS = frozenset({"user_id"})
# Why a server has no store, and how to give it one (the serving manifests' default is none).
NO_STATE_HINT = (
    "METAREC_STATE_URL=none; give every replica one shared store, e.g. "
    "manifests/serving/overlays/gke-cpu-redis"
)
# C0 and C1 control characters (a user id is a key in the store and a word in the log lines).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RequestParser:
    """Turns decoded JSON requests into validated requests for one :class:`Recommender`.

    Args:
        recommender: The model, catalogue and encoder the requests refer to.
        limits: Request limits.
    """

    def __init__(self, recommender: Recommender, limits: RequestLimits):
        self.recommender = recommender
        self.limits = limits
        self.user_features = {f["name"]: f for f in recommender.schema.get("user_features") or []}
        # Slot of each categorical feature in EncodedFeatures.cat (code 0 = not in the vocabulary).
        cat_features = [
            f for f in recommender.schema.get("user_features") or [] if f["kind"] in ("categorical", "hashed")
        ]
        self.cat_slot = {f["name"]: slot for slot, f in enumerate(cat_features)}
        self.vocab = {
            f["name"]: set(f["vocab"]) for f in self.user_features.values() if f["kind"] == "multi_hot"
        }

    def _quote(self, value: Any) -> str:
        return quote(value, self.limits.max_quote_chars)

    def _item_indices(self, values: Any, field: str, allow_empty: bool) -> list[int]:
        """Maps a list of raw item ids to item indices, naming unknown ids."""
        if not isinstance(values, list):
            raise RequestError(400, f"'{field}' must be a list of item ids, got {json_type(values)}")
        if not values and not allow_empty:
            raise RequestError(400, f"'{field}' must not be empty")
        bad_type = [value for value in values if not (isinstance(value, str) or _is_int(value))]
        if bad_type:
            raise RequestError(
                400,
                f"'{field}' item ids must be strings or integers, got {quote_keys(bad_type, self.limits.max_quote_chars)}",
            )
        index = self.recommender.item_index
        unknown = [value for value in values if str(value) not in index]
        if unknown:
            raise RequestError(
                400,
                f"unknown item id(s) in '{field}': {quote_keys(unknown, self.limits.max_quote_chars, 10)}",
            )
        return [index[str(value)] for value in values]

    def _check_number(self, name: str, value: Any) -> float:
        """A numeric user feature: finite and within ``feature_z_limit`` std of its training mean."""
        feature = self.user_features[name]
        where = f"user.{name}"
        if isinstance(value, str):
            if len(value) > self.limits.max_number_chars:
                raise RequestError(400, f"{where} must be a number, got {self._quote(value)}")
            try:
                value = float(value)
            except ValueError as error:
                raise RequestError(400, f"{where} must be a number, got {self._quote(value)}") from error
        if not _is_number(value):
            raise RequestError(400, f"{where} must be a number, got {json_type(value)}")
        try:
            number = float(value)
        except OverflowError as error:
            raise RequestError(400, f"{where} is out of range") from error
        mean, std = float(feature["mean"]), float(feature["std"])
        bound = self.limits.feature_z_limit * std
        if not math.isfinite(number) or abs(number - mean) > bound:
            raise RequestError(
                400,
                f"{where} {self._quote(value)} is outside the range the model was trained on "
                f"[{mean - bound:.4g}, {mean + bound:.4g}] (mean ± {self.limits.feature_z_limit:g} std)",
            )
        return number

    def _parse_features(self, values: Any) -> tuple[EncodedFeatures, list[str]]:
        """Validates and encodes a new user's features; returns notes on values the model never saw."""
        if not isinstance(values, dict):
            raise RequestError(400, f"'user' must be a JSON object of features, got {json_type(values)}")
        unknown = [key for key in values if key not in self.user_features]
        if unknown:
            raise RequestError(
                400,
                f"unknown user feature(s) {quote_keys(unknown, self.limits.max_quote_chars)}; "
                f"known: {sorted(self.user_features)}",
            )
        clean: dict[str, Any] = {}
        for name, value in values.items():
            kind = self.user_features[name]["kind"]
            if value is None:
                clean[name] = None
            elif kind == "numeric":
                clean[name] = self._check_number(name, value)
            elif kind == "multi_hot":
                labels = value.split("|") if isinstance(value, str) else value
                if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
                    raise RequestError(
                        400,
                        f"user.{name} must be a list of strings or a '|'-joined string, got {json_type(value)}",
                    )
                clean[name] = labels
            else:
                if not (isinstance(value, str) or _is_number(value)) or (
                    isinstance(value, float) and not math.isfinite(value)
                ):
                    raise RequestError(
                        400, f"user.{name} must be a string or a number, got {json_type(value)}"
                    )
                clean[name] = value
        try:
            encoded = self.recommender.encoder.encode_user_dict(clean)
        except ValueError as error:
            raise RequestError(400, f"bad 'user' features: {str(error)[:200]}") from error
        notes = []
        for name, value in clean.items():
            kind = self.user_features[name]["kind"]
            if value is None:
                continue
            if kind == "categorical" and int(encoded.cat[0, self.cat_slot[name]]) == 0:
                notes.append(
                    f"user.{name} {self._quote(value)} is not a value the model was trained on; encoded as unknown"
                )
            elif kind == "multi_hot":
                unseen = [
                    label.strip()
                    for label in value
                    if label.strip() and label.strip() not in self.vocab[name]
                ]
                if unseen:
                    notes.append(
                        f"user.{name}: {quote_keys(unseen, self.limits.max_quote_chars)} not seen in training; ignored"
                    )
        # Encoded on the CPU; the model may serve on a GPU (known users' rows already live there).
        return encoded.to(self.recommender.device), notes

    def _parse_user(
        self, request: dict[str, Any], required: bool, allow_new: bool = False
    ) -> tuple[EncodedFeatures, str | None, list[str], bool]:
        """The user's features, raw id, notes and whether ``user`` features were given.

        A ``user_id`` the user table does not know is accepted when the Recommender keeps per-user
        state and either ``allow_new`` (adapt, feedback: a new user, optionally described by ``user``
        features) or the store already holds that user.
        """
        has_id, has_features = "user_id" in request, "user" in request
        user_id = None
        if has_id:
            user_id = self._check_user_id(request["user_id"])
            features = self.recommender.known_user(user_id)
            if features is not None:
                if has_features:
                    raise RequestError(
                        400, "give either 'user_id' (a known user) or 'user' (features), not both"
                    )
                return features, user_id, [], False
            keeps_state = self.recommender.keeps_state
            if not (keeps_state and (allow_new or self.recommender.has_state(user_id))):
                if self.recommender.user_features is None and not keeps_state:
                    raise RequestError(
                        404, "this model has no user table; describe the user with 'user' features"
                    )
                raise RequestError(404, f"unknown user_id {self._quote(user_id)}")
        if has_id or has_features or not required:
            features, notes = self._parse_features(request.get("user", {}))
            return features, user_id, notes, has_features
        raise RequestError(
            400, "missing field: give 'user_id' (a known user) or 'user' (features of a new user)"
        )

    def _check_user_id(self, value: Any) -> str:
        """A request's ``user_id`` (a JSON string or integer) as a user id the stores can hold: non-empty
        text of at most ``max_user_id_chars`` characters, encodable as UTF-8 (JSON admits lone surrogates
        such as ``"\\ud800"``, which SQLite and Redis cannot encode) and without control characters."""
        if not (isinstance(value, str) or _is_int(value)):
            raise RequestError(400, f"'user_id' must be a string or an integer, got {json_type(value)}")
        user_id = str(value)
        limit = self.limits.max_user_id_chars
        if not user_id:
            raise RequestError(400, "'user_id' must not be empty")
        if len(user_id) > limit:
            raise RequestError(400, f"'user_id' has {len(user_id)} characters; at most {limit} allowed")
        try:
            user_id.encode("utf-8")
        except UnicodeEncodeError as error:
            raise RequestError(
                400,
                f"'user_id' {self._quote(user_id)} is not valid Unicode text (a lone surrogate at {error.start})",
            ) from error
        if _CONTROL_CHARACTER.search(user_id):
            raise RequestError(400, f"'user_id' {self._quote(user_id)} holds control characters")
        return user_id

    def _check_fields(self, request: Any, fields: frozenset[str]) -> None:
        """A request must be a JSON object holding no field outside ``fields``."""
        if not isinstance(request, dict):
            raise RequestError(400, f"a request must be a JSON object, got {json_type(request)}")
        unknown = sorted((key for key in request if key not in fields), key=str)
        if unknown:
            raise RequestError(
                400,
                f"unknown field(s) {quote_keys(unknown, self.limits.max_quote_chars)}; allowed: {sorted(fields)}",
            )

    def _parse_common(
        self, request: Any, fields: frozenset[str], user_required: bool, allow_new: bool = False
    ):
        self._check_fields(request, fields)
        features, user_id, notes, described = self._parse_user(request, user_required, allow_new)
        flags = {"described": described}
        for flag in ("include_rated", "explain"):
            value = request.get(flag, False)
            if not isinstance(value, bool):
                raise RequestError(400, f"'{flag}' must be true or false, got {json_type(value)}")
            flags[flag] = value
        if flags["explain"] and self.recommender.adapt_mode != EXPLAIN_MODE:
            raise RequestError(
                400,
                f"'explain' needs a model adapted in mode {EXPLAIN_MODE!r}; "
                f"this one adapts in {self.recommender.adapt_mode!r}",
            )
        k = request.get("k", self.limits.default_k)
        if not _is_int(k) or k <= 0:
            raise RequestError(400, f"'k' must be a positive integer, got {self._quote(k)}")
        if k > self.limits.max_k:
            raise RequestError(400, f"'k' is {k}; at most {self.limits.max_k} allowed")
        n_items = len(self.recommender.item_ids)
        mask = torch.ones(n_items, dtype=torch.bool)
        if "candidates" in request:
            mask[:] = False
            mask[self._item_indices(request["candidates"], "candidates", allow_empty=False)] = True
        if "exclude" in request:
            mask[self._item_indices(request["exclude"], "exclude", allow_empty=True)] = False
        return features, user_id, k, mask, notes, flags

    def parse_recommend(self, request: Any) -> tuple[RecommendRequest, list[str]]:
        """Validates one recommend request.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request and notes for the answer (unknown category values).

        Raises:
            RequestError: 400 for a malformed request, 404 for an unknown ``user_id``.
        """
        features, user_id, k, mask, notes, flags = self._parse_common(request, RECOMMEND_FIELDS, True)
        if not mask.any():
            raise RequestError(400, "no item left to rank after 'candidates' and 'exclude'")
        return RecommendRequest(features, user_id, k, mask.to(self.recommender.device), **flags), notes

    def parse_adapt(self, request: Any) -> tuple[AdaptRequest, list[str]]:
        """Validates one adapt request.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request (steps capped by ``max_steps``) and notes for the answer.

        Raises:
            RequestError: 400 for a malformed request or support set, 404 for an unknown
                ``user_id``, 413 for a support set larger than ``max_support``.
        """
        (features, user_id, k, mask, notes, flags), (items, indices, ratings, _) = self._parse_rated(
            request, ADAPT_FIELDS, False, "support", SUPPORT_FIELDS, self.limits.max_support
        )
        if len(set(indices)) != len(indices):
            seen, duplicates = set(), []
            for value, index in zip(items, indices, strict=True):
                if index in seen:
                    duplicates.append(value)
                seen.add(index)
            raise RequestError(
                400,
                f"duplicate item id(s) in 'support': {quote_keys(duplicates, self.limits.max_quote_chars, 10)}",
            )
        steps = request.get("steps", self.recommender.default_steps)
        if not _is_int(steps) or steps < 0:
            raise RequestError(400, f"'steps' must be a non-negative integer, got {self._quote(steps)}")
        # Items the user just rated are not recommended back (unless asked for).
        if not flags["include_rated"]:
            mask[indices] = False
        if not mask.any():
            raise RequestError(
                400, "no item left to rank after 'candidates', 'exclude' and the support items"
            )
        request_out = AdaptRequest(
            features,
            user_id,
            k,
            mask.to(self.recommender.device),
            **flags,
            support_items=torch.tensor(indices, dtype=torch.long),
            support_ratings=torch.tensor(ratings, dtype=torch.float32),
            steps=min(steps, self.limits.max_steps),
            support_ids=[str(item) for item in items],
        )
        return request_out, notes

    def parse_feedback(self, request: Any) -> tuple[FeedbackRequest, list[str]]:
        """Validates one feedback request: ``user_id``, ``ratings`` [{item_id, rating, timestamp}], ``k``.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request (nothing is stored before every rating passed) and notes.

        Raises:
            RequestError: 400 for a malformed request, an unknown item or an out-of-scale rating, 404
                when the server keeps no per-user state, 413 for more than ``max_feedback`` ratings.
        """
        if not self.recommender.keeps_state:
            raise RequestError(
                404, f"feedback needs a state store; this server was started without one ({NO_STATE_HINT})"
            )
        if isinstance(request, dict) and "user_id" not in request:
            raise RequestError(400, "missing field 'user_id': feedback belongs to a user")
        (features, user_id, k, mask, notes, flags), (items, _, ratings, stamps) = self._parse_rated(
            request, FEEDBACK_FIELDS, True, "ratings", FEEDBACK_RATING_FIELDS, self.limits.max_feedback
        )
        if not mask.any():
            raise RequestError(400, "no item left to rank after 'candidates' and 'exclude'")
        validated = FeedbackRequest(
            features,
            user_id,
            k,
            mask.to(self.recommender.device),
            **flags,
            ratings=[Rating(str(i), r, t) for i, r, t in zip(items, ratings, stamps, strict=True)],
            answer_items="k" in request,
        )
        return validated, notes

    def parse_forget(self, request: Any) -> tuple[ForgetRequest, list[str]]:
        """Validates one forget request: ``{"user_id": ...}`` and nothing else.

        Any well-formed id is accepted, known or not (forgetting is idempotent: ``deleted`` says whether
        anything was held), so the answer does not tell whether a user exists beyond that.

        Args:
            request: The decoded JSON request object.

        Returns:
            The validated request and no notes.

        Raises:
            RequestError: 400 for a missing, malformed or unacceptable ``user_id`` or another field, 404
                when the server keeps no per-user state.
        """
        if not self.recommender.keeps_state:
            raise RequestError(
                404, f"forget needs a state store; this server was started without one ({NO_STATE_HINT})"
            )
        self._check_fields(request, FORGET_FIELDS)
        if "user_id" not in request:
            raise RequestError(400, "missing field 'user_id': the user to forget")
        return ForgetRequest(self._check_user_id(request["user_id"])), []

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
            raise RequestError(400, f"'{field}' must be a list of {shape} objects, got {json_type(entries)}")
        if not entries:
            raise RequestError(400, f"'{field}' must not be empty: give at least one rating")
        if len(entries) > limit:
            raise RequestError(413, f"'{field}' holds {len(entries)} ratings; at most {limit} allowed")
        low, high = self.recommender.rating_min, self.recommender.rating_max
        items, ratings, stamps = [], [], []
        for position, entry in enumerate(entries):
            where = f"{field}[{position}]"
            if not isinstance(entry, dict):
                raise RequestError(400, f"{where} must be an object {shape}, got {json_type(entry)}")
            missing = sorted(SUPPORT_FIELDS - set(entry))
            if missing:
                raise RequestError(400, f"{where} is missing field(s) {missing}")
            extra = sorted((key for key in entry if key not in allowed), key=str)
            if extra:
                raise RequestError(
                    400, f"{where} has unknown field(s) {quote_keys(extra, self.limits.max_quote_chars)}"
                )
            ratings.append(self._check_rating(where, entry["rating"], low, high))
            stamp = entry.get("timestamp")
            if stamp is not None and not (_is_number(stamp) and self._finite(stamp)):
                raise RequestError(
                    400, f"{where}.timestamp must be a finite number (seconds), got {self._quote(stamp)}"
                )
            items.append(entry["item_id"])
            stamps.append(None if stamp is None else float(stamp))
        return items, self._item_indices(items, field, allow_empty=False), ratings, stamps

    def _check_rating(self, where: str, rating: Any, low: float, high: float) -> float:
        if not _is_number(rating):
            raise RequestError(400, f"{where}.rating must be a number, got {json_type(rating)}")
        if not self._finite(rating):
            raise RequestError(400, f"{where}.rating must be finite, got {self._quote(rating)}")
        if not low <= rating <= high:
            raise RequestError(
                400, f"{where}.rating {self._quote(rating)} is outside the trained range [{low:g}, {high:g}]"
            )
        step = self.recommender.rating_step
        # As the data set's own ratings are checked (metarec.data.ratings): 4.5 on a whole-star scale is
        # not a rating the model was trained on.
        if step and abs((rating - low) / step - round((rating - low) / step)) > 1e-6:
            raise RequestError(
                400,
                f"{where}.rating {self._quote(rating)} is not on the trained scale: steps of {step:g} from {low:g}",
            )
        return float(rating)

    @staticmethod
    def _finite(number: Any) -> bool:
        try:
            return math.isfinite(number)
        except OverflowError:  # an integer too large for a float
            return False
