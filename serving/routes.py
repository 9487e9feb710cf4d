"""The route table, and answering a batch of HTTP requests through it.

Each request of a TorchServe batch is decoded (:mod:`metarec.serving.bodies`) and each of its request
objects validated by its route's parser (:mod:`metarec.serving.requests`); then all valid requests of a
route are answered together by the Recommender. One request can only fail itself: an invalid one gets
its own error answer, and answers are serialised with ``allow_nan=False`` (a non-finite score is a 500
for that request alone).

While the user-state store is unavailable, a request that needs it (feedback; recommend for a named
user) is answered 503 with the store's error, and the rest of the batch as usual; an adapt request
naming a new user is answered with ``"stored": false`` and a note (docs/realtime.md).

A new route is one entry in :data:`ROUTES`: its parser (JSON object -> validated request) and the
:class:`~metarec.recommender.Recommender` method that answers a list of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from metarec.recommender import Recommender
from metarec.serving.bodies import check_explained, decode_body, split_instances
from metarec.serving.errors import RequestError, quote
from metarec.serving.requests import RequestParser
from metarec.state import StoreUnavailableError

logger = logging.getLogger(__name__)


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
