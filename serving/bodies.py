"""Decoding one HTTP request body, within the limits, into the request objects it holds.

Body size, JSON nesting depth and number-literal length are checked before or while parsing (no
``RecursionError``, no ``OverflowError``) and numbers must be finite; a body TorchServe split into
form fields is refused (:class:`FormFields`). A KServe v1 body ``{"instances": [...]}`` carries
several request objects (:func:`split_instances`), and the explanations one body may ask for are
bounded (:func:`check_explained`). Limits: :class:`metarec.serving_settings.RequestLimits`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metarec.serving.errors import RequestError, json_type, quote, quote_keys
from metarec.serving_settings import RequestLimits

# JSON string literals (possessive: linear time on any input), removed before counting brackets.
_STRING_LITERAL = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_OPEN_ARRAY, _OPEN_OBJECT, _CLOSE_ARRAY, _CLOSE_OBJECT = b"[{]}"


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
        raise RequestError(400, f"request body must be a JSON object, got {json_type(body)}")
    if "instances" not in body:
        return [body], False
    extra = sorted(set(body) - {"instances"})
    if extra:
        raise RequestError(
            400, f"a KServe v1 body holds only 'instances'; unexpected field(s) {quote_keys(extra)}"
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
