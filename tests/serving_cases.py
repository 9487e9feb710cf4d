"""Example requests against a model trained on the synthetic data (item ids "1".."80" in the tiny
preset, user ids "1".."120"): the good ones the docs show and every bad-input case the tests send
through the request protocol, the in-process handler and a real TorchServe; plus
:func:`answer_all`, the request protocol in one call.
"""

from __future__ import annotations

import json

from metarec.serving.requests import RequestParser
from metarec.serving.routes import answer_batch
from metarec.serving_settings import RequestLimits

GOOD_SUPPORT = [{"item_id": "1", "rating": 5}, {"item_id": "2", "rating": 1}, {"item_id": "3", "rating": 4}]


def _support(n: int) -> list[dict]:
    return [{"item_id": str(i), "rating": 4} for i in range(1, n + 1)]


# (case name, route, raw body, expected HTTP status, fragment the error message must contain).
# Bodies are bytes so that malformed JSON can be expressed; limits assume the default settings
# (max_support 100, max_steps 10, max_k 100, max_instances 64).
BAD_REQUESTS: list[tuple[str, str, bytes, int, str]] = [
    ("invalid_json", "", b'{"user_id": ', 400, "invalid JSON"),
    ("empty_body", "", b"", 400, "empty request body"),
    ("body_not_object", "", b"[1, 2]", 400, "must be a JSON object"),
    ("missing_user", "", b'{"k": 3}', 400, "missing field"),
    ("user_and_user_id", "", b'{"user_id": "1", "user": {}}', 400, "not both"),
    ("unknown_field", "", b'{"user_id": "1", "top": 3}', 400, "unknown field(s) ['top']"),
    ("unknown_user_id", "", b'{"user_id": "999999"}', 404, "unknown user_id '999999'"),
    ("bad_user_id_type", "", b'{"user_id": [1]}', 400, "'user_id' must be"),
    ("unknown_feature", "", b'{"user": {"shoe_size": 42}}', 400, "shoe_size"),
    ("feature_wrong_type", "", b'{"user": {"age": "old"}}', 400, "age"),
    ("user_not_object", "", b'{"user": 5}', 400, "JSON object"),
    ("k_zero", "", b'{"user_id": "1", "k": 0}', 400, "'k' must be a positive integer"),
    ("k_negative", "", b'{"user_id": "1", "k": -2}', 400, "'k' must be a positive integer"),
    ("k_float", "", b'{"user_id": "1", "k": 2.5}', 400, "'k' must be a positive integer"),
    ("k_string", "", b'{"user_id": "1", "k": "3"}', 400, "'k' must be a positive integer"),
    ("k_bool", "", b'{"user_id": "1", "k": true}', 400, "'k' must be a positive integer"),
    ("k_too_large", "", b'{"user_id": "1", "k": 101}', 400, "at most 100"),
    ("candidates_not_list", "", b'{"user_id": "1", "candidates": "1"}', 400, "'candidates' must be a list"),
    ("candidates_empty", "", b'{"user_id": "1", "candidates": []}', 400, "'candidates' must not be empty"),
    (
        "candidates_unknown",
        "",
        b'{"user_id": "1", "candidates": ["1", "nope"]}',
        400,
        "unknown item id(s) in 'candidates'",
    ),
    ("candidates_bad_type", "", b'{"user_id": "1", "candidates": [1.5]}', 400, "strings or integers"),
    ("exclude_unknown", "", b'{"user_id": "1", "exclude": ["nope"]}', 400, "unknown item id(s) in 'exclude'"),
    ("exclude_not_list", "", b'{"user_id": "1", "exclude": {"a": 1}}', 400, "'exclude' must be a list"),
    ("nothing_left", "", b'{"user_id": "1", "candidates": ["1"], "exclude": ["1"]}', 400, "no item left"),
    ("unknown_route", "explain", b'{"user_id": "1"}', 404, "unknown endpoint 'explain'"),
    ("kserve_empty", "", b'{"instances": []}', 400, "non-empty list"),
    ("kserve_extra_field", "", b'{"instances": [{"user_id": "1"}], "k": 2}', 400, "only 'instances'"),
    (
        "kserve_bad_instance",
        "",
        b'{"instances": [{"user_id": "1"}, {"user_id": "999999"}]}',
        404,
        "instances[1]: unknown user_id",
    ),
    (
        "kserve_too_many",
        "",
        b'{"instances": [' + b",".join([b'{"user_id": "1"}'] * 65) + b"]}",
        413,
        "at most 64",
    ),
    (
        "kserve_too_many_explained",
        "",
        json.dumps({"instances": [{"user_id": "1", "explain": True}] * 5}).encode(),
        413,
        "at most 4 per body",
    ),
    ("support_missing", "adapt", b'{"user": {}}', 400, "missing field 'support'"),
    ("support_empty", "adapt", b'{"support": []}', 400, "'support' must not be empty"),
    (
        "support_not_list",
        "adapt",
        b'{"support": {"item_id": "1", "rating": 5}}',
        400,
        "'support' must be a list",
    ),
    ("support_oversized", "adapt", json.dumps({"support": _support(101)}).encode(), 413, "at most 100"),
    ("support_entry_not_object", "adapt", b'{"support": [5]}', 400, "support[0] must be an object"),
    (
        "support_missing_rating",
        "adapt",
        b'{"support": [{"item_id": "1"}]}',
        400,
        "support[0] is missing field(s) ['rating']",
    ),
    (
        "support_extra_field",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": 5, "w": 1}]}',
        400,
        "unknown field(s) ['w']",
    ),
    (
        "support_unknown_item",
        "adapt",
        b'{"support": [{"item_id": "nope", "rating": 5}]}',
        400,
        "unknown item id(s) in 'support'",
    ),
    (
        "rating_above_range",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": 6}]}',
        400,
        "outside the trained range [1, 5]",
    ),
    (
        "rating_below_range",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": 0.5}]}',
        400,
        "outside the trained range",
    ),
    (
        "rating_off_step",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": 4.5}]}',
        400,
        "4.5 is not on the trained scale: steps of 1 from 1",
    ),
    ("rating_nan", "adapt", b'{"support": [{"item_id": "1", "rating": NaN}]}', 400, "NaN is not a number"),
    (
        "rating_inf",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": Infinity}]}',
        400,
        "Infinity is not a number",
    ),
    ("rating_string", "adapt", b'{"support": [{"item_id": "1", "rating": "5"}]}', 400, "must be a number"),
    ("rating_bool", "adapt", b'{"support": [{"item_id": "1", "rating": true}]}', 400, "must be a number"),
    (
        "support_duplicate",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": 5}, {"item_id": 1, "rating": 2}]}',
        400,
        "duplicate item id(s)",
    ),
    (
        "steps_negative",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": 5}], "steps": -1}',
        400,
        "'steps' must be a non-negative integer",
    ),
    (
        "steps_string",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": 5}], "steps": "5"}',
        400,
        "'steps' must be",
    ),
]
# An adapt request with a user_id the catalogue does not know is no longer refused when the server has
# a state store: it creates that user (tests/test_realtime_http.py); without a store it is a 404
# (tests/test_recommender_realtime.py).

# The hostile inputs of issue 13 (each once killed a worker, failed its batch or answered NaN), with
# the default limits (1 MiB bodies, depth 8, 40-character numbers, features within mean ± 10 std).
_DEEP = b'{"user": ' + b"[" * 1000 + b"]" * 1000 + b"}"
_HUGE_INT = b"9" * 400
HOSTILE_REQUESTS: list[tuple[str, str, bytes, int, str]] = [
    (
        "user_id_5mb_nel",
        "",
        json.dumps({"user_id": "\u0085" * 2_600_000}, ensure_ascii=False).encode(),
        413,
        "at most",
    ),
    (
        "steps_1mb_string",
        "adapt",
        json.dumps({"support": GOOD_SUPPORT, "steps": "9" * 1_100_000}).encode(),
        413,
        "at most",
    ),
    ("user_id_900kb", "", json.dumps({"user_id": "x" * 900_000}).encode(), 400, "900000 characters"),
    # A lone surrogate is valid JSON but no UTF-8: the state stores raised on it and failed the batch.
    ("user_id_lone_surrogate", "", b'{"user_id": "\\ud800", "k": 3}', 400, "not valid Unicode"),
    (
        "adapt_user_id_lone_surrogate",
        "adapt",
        b'{"user_id": "a\\udfff", "support": [{"item_id": "1", "rating": 5}]}',
        400,
        "not valid Unicode",
    ),
    (
        "steps_long_string",
        "adapt",
        json.dumps({"support": GOOD_SUPPORT, "steps": "9" * 100_000}).encode(),
        400,
        "100000 characters",
    ),
    ("nested_1000_levels", "", _DEEP, 400, "nested 1001 levels"),
    ("age_309_digits", "", b'{"user": {"age": ' + _HUGE_INT + b"}}", 400, "400 characters"),
    (
        "rating_309_digits",
        "adapt",
        b'{"support": [{"item_id": "1", "rating": ' + _HUGE_INT + b"}]}",
        400,
        "400 characters",
    ),
    ("age_1e308", "", b'{"user": {"age": 1e308}}', 400, "outside the range the model was trained on"),
    ("age_infinity", "", b'{"user": {"age": Infinity}}', 400, "Infinity is not a number"),
    ("age_inf_string", "", b'{"user": {"age": "inf"}}', 400, "outside the range the model was trained on"),
    (
        "age_1e999_string",
        "",
        b'{"user": {"age": "1e999"}}',
        400,
        "outside the range the model was trained on",
    ),
    ("age_1e999", "", b'{"user": {"age": 1e999}}', 400, "out of range"),
    ("age_int_1e40", "", b'{"user": {"age": 10000000000000000000000000000000000000000}}', 400, "characters"),
    ("age_1e20", "", b'{"user": {"age": 1e20}}', 400, "outside the range"),
    ("age_minus_1e20", "", b'{"user": {"age": -1e20}}', 400, "outside the range"),
    (
        "kserve_nested_bad_number",
        "",
        b'{"instances": [{"user": {"age": 1e300}}]}',
        400,
        "instances[0]: user.age",
    ),
    (
        "huge_unknown_field",
        "",
        json.dumps({"user_id": "1", "x" * 500_000: 1}).encode(),
        400,
        "500000 characters",
    ),
]
BAD_REQUESTS += HOSTILE_REQUESTS


def answer_all(recommender, bodies, routes, limits: RequestLimits | None = None) -> list[tuple[int, dict]]:
    """Answers raw bodies through the request protocol; returns ``(status, decoded JSON)`` each."""
    parser = RequestParser(recommender, limits or RequestLimits())
    return [(status, json.loads(text)) for status, text in answer_batch(parser, bodies, routes)]
