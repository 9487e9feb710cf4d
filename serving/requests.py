"""The HTTP / KServe request protocol: decode and validate each request, then answer a batch together.

Requests (one JSON object each; a KServe v1 body ``{"instances": [...]}`` carries several):

* recommend (route ``""``): ``{"user_id": "42"}`` (a known user) or ``{"user": {"age": 25}}`` (a new
  user described by features); optional ``k``, ``candidates`` (item ids to rank), ``exclude``.
* adapt (route ``"adapt"``): ``{"support": [{"item_id": "7", "rating": 5}, ...]}`` plus optional
  ``user`` or ``user_id``, ``steps``, ``k``, ``candidates``, ``exclude``.
* feedback (route ``"feedback"``): ``{"user_id": "42", "ratings": [...]}`` (docs/realtime.md).
* forget (route ``"forget"``): ``{"user_id": "42"}``: erases the user's stored ratings and state.

Every request is validated before it reaches the model, so one request can only fail itself: body
size, JSON nesting depth and number-literal length are checked before or while parsing (no
``RecursionError``, no ``OverflowError``), numbers must be finite and numeric user features within
``feature_z_limit`` standard deviations of their training mean, answers are serialised with
``allow_nan=False`` and error messages quote at most ``max_quote_chars`` of any input. Unknown
category values are accepted (encoded as "unknown", as in training) and the answer says so under
``"notes"``. Limits: :class:`metarec.serving_settings.RequestLimits`.

While the user-state store is unavailable, a request that needs it (feedback; recommend for a named
user) is answered 503 with the store's error, and the rest of the batch as usual; an adapt request
naming a new user is answered with ``"stored": false`` and a note (docs/realtime.md).

A new route is one entry in :data:`ROUTES`: its parser (JSON object -> validated request) and the
:class:`~metarec.recommender.Recommender` method that answers a list of them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metarec.explain import EXPLAIN_MODE
from metarec.features import EncodedFeatures
from metarec.recommender import AdaptRequest, FeedbackRequest, ForgetRequest, Recommender, RecommendRequest
from metarec.serving_settings import RequestLimits
from metarec.state import Rating, StoreUnavailableError

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
# Longest error message sent back, whatever it quotes (TorchServe frames answers; keep them small).
MAX_MESSAGE_CHARS = 600
# JSON string literals (possessive: linear time on any input), removed before counting brackets.
_STRING_LITERAL = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_OPEN_ARRAY, _OPEN_OBJECT, _CLOSE_ARRAY, _CLOSE_OBJECT = b"[{]}"
logger = logging.getLogger(__name__)
# C0 and C1 control characters (a user id is a key in the store and a word in the log lines).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status to answer.

    Args:
        status: HTTP status code (4xx).
        message: What is wrong, naming the field; cut to ``MAX_MESSAGE_CHARS``.
    """

    def __init__(self, status: int, message: str):
        message = message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."
        super().__init__(message)
        self.status = int(status)
        self.message = message

    def to_body(self) -> dict[str, Any]:
        """Returns the JSON error document (same keys as TorchServe's own errors)."""
        return {"code": self.status, "type": "RequestError", "message": self.message}

    def within(self, prefix: str) -> RequestError:
        """Returns the same error with its message prefixed (e.g. ``instances[3]: ``)."""
        return RequestError(self.status, prefix + self.message)


def quote(value: Any, limit: int) -> str:
    """Quotes an input value for an error message: its repr, cut to ``limit`` characters.

    Args:
        value: Any decoded JSON value (possibly megabytes long).
        limit: Most characters of the value shown.

    Returns:
        ``repr`` of the value, or of its first ``limit`` characters plus the total length.
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (list, dict)) and len(value) > 5:
        return f"a {_json_type(value)[2:]} of {len(value)} entries"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_depth(text: str) -> int:
    """Deepest array/object nesting of a JSON text, counted without recursion (strings skipped).

    Args:
        text: The JSON text (valid or not).

    Returns:
        The maximum number of open ``[``/``{`` at any point (0 for a scalar).
    """
    skeleton = np.frombuffer(_STRING_LITERAL.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    # Comparisons with the four bracket bytes (np.isin costs tens of microseconds on a small body).
    opens = (skeleton == _OPEN_ARRAY) | (skeleton == _OPEN_OBJECT)
    closes = (skeleton == _CLOSE_ARRAY) | (skeleton == _CLOSE_OBJECT)
    steps = opens.astype(np.int32) - closes.astype(np.int32)
    return int(np.cumsum(steps).max()) if steps.size else 0


# Media types TorchServe decodes as a form (Netty's HttpPostRequestDecoder) instead of passing the body.
FORM_MEDIA_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


@dataclass(frozen=True)
class FormFields:
    """A TorchServe request that arrived as a form (``application/x-www-form-urlencoded``, curl's
    default for ``-d``, or ``multipart/form-data`` without a part named ``data``/``body``) or with
    query parameters only. TorchServe passes the form's fields, not the body, and a JSON text that
    holds no ``=`` is dropped altogether (seen on TorchServe 0.12: an empty row), so the JSON cannot be
    rebuilt (form decoding also turns ``+`` into a space and splits at ``&``); it is refused with 415.

    Attributes:
        fields: How many fields TorchServe passed (often 0).
        media_type: The request's Content-Type without parameters ("" when none).
    """

    fields: int
    media_type: str


def row_body(row: dict[str, Any], content_type: str | None = None) -> Any:
    """The body of one request of a TorchServe batch (``data`` in ``handle(data, context)``).

    Args:
        row: TorchServe's ``{parameter name: value}`` for one request: ``body`` for a raw body,
            ``data``/``body`` for a form part of that name, other names for other form fields and
            query parameters.
        content_type: The request's Content-Type header, if any.

    Returns:
        The raw body; :class:`FormFields` for a form or parameters without a body; None for an
        empty request.
    """
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if row or media_type in FORM_MEDIA_TYPES:
        return FormFields(len(row), media_type)
    return None


def decode_body(body: Any, limits: RequestLimits) -> Any:
    """Decodes one request body into JSON values, within the limits.

    Args:
        body: bytes / bytearray / str holding JSON, or an already decoded value.
        limits: Body size, nesting depth and number-literal length limits.

    Returns:
        The decoded value (numbers finite, at most ``max_number_chars`` characters each).

    Raises:
        RequestError: 415 for :class:`FormFields`; 413 for a body over ``max_body_bytes``; 400 for an empty body, bad UTF-8,
            invalid JSON, nesting deeper than ``max_json_depth``, NaN/Infinity or a number literal
            too long or out of float range.
    """
    if body is None:
        raise RequestError(400, "invalid JSON: empty request body")
    if isinstance(body, FormFields):
        raise RequestError(
            415,
            f"no JSON body: the request was sent as {body.media_type or 'form fields or query parameters'}, "
            "which TorchServe splits into form fields; send the JSON as the body with "
            "Content-Type: application/json (curl -d needs -H 'Content-Type: application/json')",
        )
    if isinstance(body, (bytes, bytearray)):
        if len(body) > limits.max_body_bytes:
            raise RequestError(
                413, f"request body of {len(body)} bytes; at most {limits.max_body_bytes} allowed"
            )
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(400, f"invalid JSON: body is not UTF-8 (byte {error.start})") from error
    if not isinstance(body, str):
        return body
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            413, f"request body of {len(body)} characters; at most {limits.max_body_bytes} allowed"
        )
    if not body.strip():
        raise RequestError(400, "invalid JSON: empty request body")
    # Nesting is never deeper than the number of '[' and '{' (strings included), counted in C: most
    # requests have too few for the exact count to be needed.
    if body.count("[") + body.count("{") > limits.max_json_depth:
        depth = json_depth(body)
        if depth > limits.max_json_depth:
            raise RequestError(
                400, f"invalid JSON: nested {depth} levels deep; at most {limits.max_json_depth}"
            )

    def number(text: str, parse: Callable[[str], Any]) -> Any:
        if len(text) > limits.max_number_chars:
            raise RequestError(
                400, f"number {quote(text, 20)} has {len(text)} characters; at most {limits.max_number_chars}"
            )
        value = parse(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(400, f"number {quote(text, 20)} is out of range")
        return value

    def constant(name: str) -> Any:
        raise RequestError(400, f"invalid JSON: {name} is not a number")

    try:
        return json.loads(
            body,
            parse_int=lambda text: number(text, int),
            parse_float=lambda text: number(text, float),
            parse_constant=constant,
        )
    except ValueError as error:
        if isinstance(error, RequestError):
            raise
        raise RequestError(400, f"invalid JSON: {str(error)[:120]}") from error


def split_instances(body: Any, max_instances: int) -> tuple[list[Any], bool]:
    """Splits a decoded body into requests.

    Args:
        body: Decoded JSON: one request object, or a KServe v1 ``{"instances": [...]}`` object.
        max_instances: Most instances accepted in one KServe body.

    Returns:
        ``(requests, is_kserve)``.

    Raises:
        RequestError: 400 for a body that is not an object or a bad ``instances`` list, 413 for
            too many instances.
    """
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {_json_type(body)}")
    if "instances" not in body:
        return [body], False
    extra = sorted(set(body) - {"instances"})
    if extra:
        raise RequestError(
            400, f"a KServe v1 body holds only 'instances'; unexpected field(s) {_quote_keys(extra)}"
        )
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, "'instances' must be a non-empty list of request objects")
    if len(instances) > max_instances:
        raise RequestError(
            413, f"'instances' holds {len(instances)} requests; at most {max_instances} allowed"
        )
    return instances, True


def check_explained(instances: Sequence[Any], max_explained: int) -> None:
    """Bounds the explanations one body asks for (each costs tens of milliseconds of a worker's time).

    Args:
        instances: The body's request objects (one for a plain body).
        max_explained: Most of them that may set ``"explain": true``.

    Raises:
        RequestError: 413 when more instances ask for ``explain``.
    """
    explained = sum(
        1 for instance in instances if isinstance(instance, dict) and instance.get("explain") is True
    )
    if explained > max_explained:
        raise RequestError(
            413,
            f"{explained} instances ask for 'explain'; at most {max_explained} per body "
            "(send the others without it, or in further requests)",
        )


def _quote_keys(keys: Sequence[Any], limit: int = 40, count: int = 5) -> str:
    shown = [quote(key, limit) for key in list(keys)[:count]]
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return "[" + ", ".join(shown) + "]" + more


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
            raise RequestError(400, f"'{field}' must be a list of item ids, got {_json_type(values)}")
        if not values and not allow_empty:
            raise RequestError(400, f"'{field}' must not be empty")
        bad_type = [value for value in values if not (isinstance(value, str) or _is_int(value))]
        if bad_type:
            raise RequestError(
                400,
                f"'{field}' item ids must be strings or integers, got {_quote_keys(bad_type, self.limits.max_quote_chars)}",
            )
        index = self.recommender.item_index
        unknown = [value for value in values if str(value) not in index]
        if unknown:
            raise RequestError(
                400,
                f"unknown item id(s) in '{field}': {_quote_keys(unknown, self.limits.max_quote_chars, 10)}",
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
            raise RequestError(400, f"{where} must be a number, got {_json_type(value)}")
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
            raise RequestError(400, f"'user' must be a JSON object of features, got {_json_type(values)}")
        unknown = [key for key in values if key not in self.user_features]
        if unknown:
            raise RequestError(
                400,
                f"unknown user feature(s) {_quote_keys(unknown, self.limits.max_quote_chars)}; "
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
                        f"user.{name} must be a list of strings or a '|'-joined string, got {_json_type(value)}",
                    )
                clean[name] = labels
            else:
                if not (isinstance(value, str) or _is_number(value)) or (
                    isinstance(value, float) and not math.isfinite(value)
                ):
                    raise RequestError(
                        400, f"user.{name} must be a string or a number, got {_json_type(value)}"
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
                        f"user.{name}: {_quote_keys(unseen, self.limits.max_quote_chars)} not seen in training; ignored"
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
            raise RequestError(400, f"'user_id' must be a string or an integer, got {_json_type(value)}")
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
            raise RequestError(400, f"a request must be a JSON object, got {_json_type(request)}")
        unknown = sorted((key for key in request if key not in fields), key=str)
        if unknown:
            raise RequestError(
                400,
                f"unknown field(s) {_quote_keys(unknown, self.limits.max_quote_chars)}; allowed: {sorted(fields)}",
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
                raise RequestError(400, f"'{flag}' must be true or false, got {_json_type(value)}")
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
                f"duplicate item id(s) in 'support': {_quote_keys(duplicates, self.limits.max_quote_chars, 10)}",
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
            raise RequestError(400, f"'{field}' must be a list of {shape} objects, got {_json_type(entries)}")
        if not entries:
            raise RequestError(400, f"'{field}' must not be empty: give at least one rating")
        if len(entries) > limit:
            raise RequestError(413, f"'{field}' holds {len(entries)} ratings; at most {limit} allowed")
        low, high = self.recommender.rating_min, self.recommender.rating_max
        items, ratings, stamps = [], [], []
        for position, entry in enumerate(entries):
            where = f"{field}[{position}]"
            if not isinstance(entry, dict):
                raise RequestError(400, f"{where} must be an object {shape}, got {_json_type(entry)}")
            missing = sorted(SUPPORT_FIELDS - set(entry))
            if missing:
                raise RequestError(400, f"{where} is missing field(s) {missing}")
            extra = sorted((key for key in entry if key not in allowed), key=str)
            if extra:
                raise RequestError(
                    400, f"{where} has unknown field(s) {_quote_keys(extra, self.limits.max_quote_chars)}"
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
            raise RequestError(400, f"{where}.rating must be a number, got {_json_type(rating)}")
        if not self._finite(rating):
            raise RequestError(400, f"{where}.rating must be finite, got {self._quote(rating)}")
        if not low <= rating <= high:
            raise RequestError(
                400, f"{where}.rating {self._quote(rating)} is outside the trained range [{low:g}, {high:g}]"
            )
        return float(rating)

    @staticmethod
    def _finite(number: Any) -> bool:
        try:
            return math.isfinite(number)
        except OverflowError:  # an integer too large for a float
            return False


@dataclass(frozen=True)
class Route:
    """One endpoint: how to validate a request object and which Recommender method answers a batch.

    Attributes:
        parse: ``(parser, request object) -> (validated request, notes)``.
        answer: ``(recommender, validated requests) -> one answer dict each``.
    """

    parse: Callable[[RequestParser, Any], tuple[Any, list[str]]]
    answer: Callable[[Recommender, list[Any]], list[dict[str, Any]]]


# URL suffix after /predictions/<model>/<version>/ -> route ("" = no suffix).
ROUTES: dict[str, Route] = {
    "": Route(RequestParser.parse_recommend, Recommender.recommend),
    "adapt": Route(RequestParser.parse_adapt, Recommender.adapt),
    "feedback": Route(RequestParser.parse_feedback, Recommender.feedback),
    # Last: a batch's forget runs after its feedback, so neither leaves the other's ratings behind.
    "forget": Route(RequestParser.parse_forget, Recommender.forget),
}


def dumps_strict(document: Any) -> str:
    """Serialises an answer as strict JSON (never NaN or Infinity).

    Raises:
        ValueError: The document holds a non-finite number.
    """
    return json.dumps(document, allow_nan=False, separators=(",", ":"))


def _internal_error(message: str) -> tuple[int, str]:
    return 500, dumps_strict({"code": 500, "type": "InternalError", "message": message})


def _unavailable(error: StoreUnavailableError) -> tuple[int, str]:
    message = f"{error}; retry later"
    return 503, dumps_strict({"code": 503, "type": "StoreUnavailable", "message": message})


def answer_batch(
    parser: RequestParser, bodies: Sequence[Any], routes: Sequence[str | None]
) -> list[tuple[int, str]]:
    """Answers a batch of HTTP requests: validates each, then runs all valid ones of a route together.

    A request that fails validation gets its own error answer, one that needed the unavailable user-state
    store a 503, and an answer that cannot be serialised strictly becomes a 500 for that request alone;
    so does any unexpected exception while reading one request (logged with its traceback): a bug the
    validation missed costs that request, not its batch neighbours.

    Args:
        parser: The request parser of the served Recommender.
        bodies: One raw body per HTTP request (bytes, str or decoded JSON).
        routes: The URL suffix of each request (``""``/None = recommend, ``"adapt"``, ...).

    Returns:
        One ``(http_status, json_text)`` per request, in order.
    """
    results: list[tuple[int, str] | None] = [None] * len(bodies)
    # (request position, instance position, validated request, notes) per route.
    parsed: dict[str, list[tuple[int, int, Any, list[str]]]] = {name: [] for name in ROUTES}
    layouts: dict[int, tuple[bool, int]] = {}
    for position, (body, route) in enumerate(zip(bodies, routes, strict=True)):
        route = (route or "").strip("/")
        try:
            if route not in ROUTES:
                raise RequestError(404, f"unknown endpoint {quote(route, 40)}; routes: {sorted(ROUTES)}")
            instances, is_kserve = split_instances(
                decode_body(body, parser.limits), parser.limits.max_instances
            )
            check_explained(instances, parser.limits.max_explained)
            requests = []
            for instance_position, instance in enumerate(instances):
                try:
                    requests.append(ROUTES[route].parse(parser, instance))
                except RequestError as error:
                    if not is_kserve:
                        raise
                    raise error.within(f"instances[{instance_position}]: ") from error
        except RequestError as error:
            results[position] = (error.status, dumps_strict(error.to_body()))
            continue
        except StoreUnavailableError as error:  # asked whether the store knows a user_id
            # Logged like the Recommender's refusals (the runbook's grep and the warning-based alert):
            # a user only the store knows is refused here, before the Recommender sees the request.
            logger.warning("request for a stored user refused (route %r): %s", route, error)
            results[position] = _unavailable(error)
            continue
        except Exception:  # noqa: BLE001 - an unforeseen failure on one request must not fail its batch
            logger.exception("request %d of the batch (route %r) could not be read", position, route)
            results[position] = _internal_error("unexpected error while reading this request")
            continue
        layouts[position] = (is_kserve, len(requests))
        parsed[route].extend((position, i, request, notes) for i, (request, notes) in enumerate(requests))

    answers: dict[tuple[int, int], dict[str, Any]] = {}
    for route, entries in parsed.items():
        if not entries:
            continue
        run = ROUTES[route].answer(parser.recommender, [entry[2] for entry in entries])
        for (position, instance, _, notes), answer in zip(entries, run, strict=True):
            if notes and isinstance(answer, dict):
                answer = {**answer, "notes": [*notes, *answer.get("notes", [])]}
            answers[(position, instance)] = answer
    for position, (is_kserve, count) in layouts.items():
        parts = [answers[(position, i)] for i in range(count)]
        failed = next((part for part in parts if isinstance(part, StoreUnavailableError)), None)
        if failed is not None:  # a KServe body fails as a whole, as with an invalid instance
            results[position] = _unavailable(failed)
            continue
        document: Any = {"predictions": parts} if is_kserve else parts[0]
        try:
            results[position] = (200, dumps_strict(document))
        except ValueError:
            results[position] = _internal_error("the model produced a non-finite score for this request")
    return results
