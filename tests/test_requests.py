"""The request protocol (metarec.serving.bodies, .requests, .routes, .errors): validation, limits, strict
answers, fuzzing.

Every hostile input of issue 13 is in ``serving_cases.HOSTILE_REQUESTS`` and is checked here, in the
handler tests and over real HTTP; the property tests (hypothesis) feed the parsers arbitrary bodies
and check that each gets exactly one strict-JSON answer with a bounded size and a 2xx/4xx status,
without disturbing a valid request batched with it.
"""

from __future__ import annotations

import json

import pytest
from demo_model import build_untrained_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_cases import BAD_REQUESTS, GOOD_SUPPORT, HOSTILE_REQUESTS, answer_all

from metarec.recommender import Recommender
from metarec.serving.bodies import decode_body, json_depth
from metarec.serving.errors import MAX_MESSAGE_CHARS, RequestError, quote
from metarec.serving.requests import ADAPT_FIELDS, RequestParser
from metarec.serving.routes import ROUTES, Route, answer_batch
from metarec.serving_settings import RequestLimits, ServingSettings

# Longest error answer: the message cap plus the JSON envelope.
MAX_ERROR_BYTES = MAX_MESSAGE_CHARS + 200


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """An untrained model over the tiny synthetic catalogue (validation does not need training)."""
    adapt = {"mode": "decision", "inner_steps": 2, "inner_lr": 0.05}
    return Recommender.from_dir(build_untrained_model(tmp_path_factory.mktemp("untrained"), adapt))


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity (what a strict client does)."""
    return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


@pytest.mark.parametrize(
    ("name", "route", "body", "status", "fragment"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_are_refused_with_status_and_short_message(rec, name, route, body, status, fragment):
    ((got, text),) = answer_batch(RequestParser(rec, RequestLimits()), [body], [route])
    document = strict_loads(text)
    assert got == status, document
    assert document["code"] == status and fragment in document["message"], document["message"]
    assert len(text) <= MAX_ERROR_BYTES  # never an echo of the input


@pytest.mark.parametrize(
    ("name", "route", "body", "status", "fragment"), HOSTILE_REQUESTS, ids=[c[0] for c in HOSTILE_REQUESTS]
)
def test_a_hostile_request_fails_alone_in_its_batch(rec, name, route, body, status, fragment):
    canaries = [({"user_id": "3", "k": 5}, ""), ({"support": GOOD_SUPPORT, "k": 5}, "adapt")]
    alone = answer_all(rec, [c[0] for c in canaries], [c[1] for c in canaries])
    mixed = answer_all(rec, [canaries[0][0], body, canaries[1][0]], ["", route, "adapt"])
    assert mixed[1][0] == status
    assert [mixed[0], mixed[2]] == alone


def test_request_error_carries_status_and_caps_its_message():
    error = RequestError(413, "too big")
    assert isinstance(error, ValueError)
    assert error.to_body() == {"code": 413, "type": "RequestError", "message": "too big"}
    assert len(RequestError(400, "x" * 10_000).message) <= MAX_MESSAGE_CHARS + 3
    assert RequestError(404, "unknown").within("instances[2]: ").message == "instances[2]: unknown"


def test_quote_shows_a_short_prefix_and_the_length():
    assert quote("abc", 40) == "'abc'"
    quoted = quote("\u0085" * 2_600_000, 40)
    assert "2600000 characters" in quoted and len(quoted) < 300
    assert quote(list(range(100)), 40) == "a list of 100 entries"


def test_limits_are_configurable_and_strict():
    tight = RequestLimits.from_dict({"max_body_bytes": 64, "max_json_depth": 3, "max_number_chars": 4})
    with pytest.raises(RequestError, match="at most 64"):
        decode_body(b'{"user_id": "' + b"1" * 100 + b'"}', tight)
    with pytest.raises(RequestError, match="nested 4 levels"):
        decode_body(b"[[[[1]]]]", tight)
    with pytest.raises(RequestError, match="5 characters"):
        decode_body(b"[12345]", tight)
    assert decode_body(b'{"a": [1, "[[[[["]}', tight) == {"a": [1, "[[[[["]}
    with pytest.raises(ValueError, match="max_suport"):
        RequestLimits.from_dict({"max_suport": 3})
    with pytest.raises(ValueError, match="max_steps"):
        RequestLimits.from_dict({"max_steps": 0})
    # The package settings carry the same limits (one source for packaging, handler and card).
    assert ServingSettings.from_dict({"max_k": 7}).limits() == RequestLimits(max_k=7)


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth('{"a": [1, {"b": "]]]}}"}]}') == 3
    assert json_depth("5") == 0
    assert json_depth('"[[["') == 0


def test_the_trained_range_follows_the_schema_and_its_limit(rec):
    age = next(f for f in rec.schema["user_features"] if f["name"] == "age")
    inside = age["mean"] + 9 * age["std"]
    ok, refused = answer_all(
        rec, [{"user": {"age": inside}}, {"user": {"age": age["mean"] + 11 * age["std"]}}], ["", ""]
    )
    assert ok[0] == 200 and refused[0] == 400 and "mean ± 10 std" in refused[1]["message"]
    (wider,) = answer_all(
        rec, [{"user": {"age": age["mean"] + 11 * age["std"]}}], [""], RequestLimits(feature_z_limit=20)
    )
    assert wider[0] == 200


def test_unknown_category_values_are_encoded_as_unknown_and_the_answer_says_so(rec):
    (status, document), (_, plain) = answer_all(
        rec,
        [{"user": {"gender": "Q", "occupation": "astronaut"}, "k": 3}, {"user": {"gender": "F"}, "k": 3}],
        ["", ""],
    )
    assert status == 200 and len(document["notes"]) == 2
    assert "user.gender 'Q' is not a value the model was trained on; encoded as unknown" in document["notes"]
    assert "notes" not in plain


def test_a_non_finite_score_becomes_a_500_for_that_request_alone(rec, monkeypatch):
    real = Recommender.recommend

    def poisoned(self, requests):
        answers = real(self, requests)
        answers[0]["items"][0]["score"] = float("nan")
        return answers

    monkeypatch.setitem(ROUTES, "", Route(RequestParser.parse_recommend, poisoned))
    results = answer_all(rec, [{"user_id": "1"}, {"support": GOOD_SUPPORT}], ["", "adapt"])
    assert results[0][0] == 500 and results[0][1]["type"] == "InternalError"
    assert results[1][0] == 200


def test_an_unexpected_error_while_reading_one_request_is_a_500_for_it_alone(rec, monkeypatch):
    """Defence in depth: an exception the validation did not foresee (here a UnicodeEncodeError, as a
    store raised on a lone surrogate) answers that request 500 and its neighbours as if alone."""
    real = RequestParser.parse_recommend

    def fragile(self, request):
        if request.get("k") == 7:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return real(self, request)

    alone = answer_all(rec, [{"user_id": "1", "k": 3}, {"support": GOOD_SUPPORT}], ["", "adapt"])
    monkeypatch.setitem(ROUTES, "", Route(fragile, Recommender.recommend))
    body = {"instances": [{"user_id": "2"}, {"user_id": "3", "k": 7}]}
    results = answer_all(rec, [{"user_id": "1", "k": 3}, body, {"support": GOOD_SUPPORT}], ["", "", "adapt"])
    assert results[1][0] == 500 and results[1][1]["type"] == "InternalError"
    assert "surrogate" not in results[1][1]["message"]  # the details go to the log, not the client
    assert [results[0], results[2]] == alone


# ------------------------------------------------------------------------------------ properties

_numbers = st.one_of(
    st.integers(min_value=-(10**60), max_value=10**60), st.floats(allow_nan=True, allow_infinity=True)
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=30))
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
_fields = sorted(ADAPT_FIELDS | {"instances", "age", "gender", "item_id", "rating"})
_item_ids = st.one_of(st.sampled_from(["1", "2", "3", "40", 7, "nope"]), _scalars)
_support = st.lists(
    st.fixed_dictionaries({"item_id": _item_ids, "rating": st.one_of(st.integers(0, 6), _numbers)}),
    max_size=4,
)
_users = st.dictionaries(
    st.sampled_from(["age", "gender", "occupation", "zip", "shoe"]), _scalars, max_size=4
)
_requests = st.dictionaries(
    st.sampled_from(_fields),
    st.one_of(_json, _support, _users, st.lists(_item_ids, max_size=4), st.integers(-3, 200)),
    max_size=5,
)


def _body_bytes(value) -> bytes:
    # allow_nan: the client side may send NaN/Infinity literals; the server must refuse them.
    return json.dumps(value, allow_nan=True).encode()


def _check_answers(rec, bodies, routes):
    results = answer_batch(RequestParser(rec, RequestLimits()), bodies, routes)
    assert len(results) == len(bodies)
    for status, text in results:
        document = strict_loads(text)
        assert status in (200, 400, 404, 413), document
        if status != 200:
            assert len(text) <= MAX_ERROR_BYTES and document["code"] == status
    return results


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(st.binary(max_size=200), st.text(max_size=200)), route=st.sampled_from(["", "adapt", "x"])
)
def test_property_any_bytes_get_one_strict_answer(rec, body, route):
    _check_answers(rec, [body], [route])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests, route=st.sampled_from(["", "adapt"]), wrap=st.booleans())
def test_property_any_request_gets_one_strict_answer_and_spares_its_neighbour(rec, request, route, wrap):
    body = _body_bytes({"instances": [request]} if wrap else request)
    canary = {"user_id": "3", "k": 4}
    results = _check_answers(rec, [body, canary], [route, ""])
    (alone,) = answer_batch(RequestParser(rec, RequestLimits()), [canary], [""])
    assert results[1] == alone


def test_request_features_follow_the_model_device(tmp_path, monkeypatch):
    # The GPU image serves on cuda: a described user's features, encoded on the CPU, must reach the
    # model's device, as the known users' rows do (before, every request describing a user failed there,
    # and failed its whole batch). No GPU here: the meta device stands in for "not the CPU".
    import torch

    from metarec.recommender import RecommendRequest

    recommender = Recommender.from_dir(
        build_untrained_model(tmp_path, {"mode": "decision", "inner_steps": 1})
    )
    parser = RequestParser(recommender, RequestLimits())
    user = {name: None for name in parser.user_features}
    monkeypatch.setattr(recommender, "device", torch.device("meta"))
    for parsed in (
        parser.parse_recommend({"user": user, "k": 3})[0],
        parser.parse_adapt({"user": user, "support": GOOD_SUPPORT, "k": 3})[0],
    ):
        assert {tensor.device.type for tensor in parsed.user_features} == {"meta"}
    cpu_request = RecommendRequest(recommender.encoder.encode_user_dict({}), None, 3, None)
    assert {tensor.device.type for tensor in recommender._stack_users([cpu_request])} == {"meta"}
