"""The error a refused request is answered with, and how its message quotes the input it names.

An error message quotes at most ``limit`` characters of any input (:func:`quote`; the parsers pass
``max_quote_chars``) and is cut to :data:`MAX_MESSAGE_CHARS`, so an error answer stays small whatever
the request held. Both the body decoding (:mod:`metarec.serving.bodies`) and the request parser
(:mod:`metarec.serving.requests`) raise :class:`RequestError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Longest error message sent back, whatever it quotes (TorchServe frames answers; keep them small).
MAX_MESSAGE_CHARS = 600


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
        return f"a {json_type(value)[2:]} of {len(value)} entries"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_type(value: Any) -> str:
    """Names a decoded JSON value's type for an error message ("an object", "a number", ...)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def quote_keys(keys: Sequence[Any], limit: int = 40, count: int = 5) -> str:
    """Quotes the first ``count`` of ``keys`` (each cut to ``limit`` characters) and how many more there are."""
    shown = [quote(key, limit) for key in list(keys)[:count]]
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return "[" + ", ".join(shown) + "]" + more
