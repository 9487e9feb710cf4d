"""The TorchServe handler in-process (no Java): a hand-built ``ts.context.Context`` per batch."""

from __future__ import annotations

import json

import pytest
from bench_modules import load_bench
from demo_model import build_untrained_model
from serving_cases import BAD_REQUESTS, GOOD_SUPPORT
from ts.context import Context, RequestProcessor

from metarec.serving.handler import MetaRecHandler, handler_limits

CARD = {"model_name": "metarec", "version": "1.0", "evaluation": {"scenarios": {}}}


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory):
    """What TorchServe unpacks from the .mar: model files, catalogue tables and the model card."""
    adapt = {"mode": "decision", "inner_steps": 2, "inner_lr": 0.05}
    out = build_untrained_model(tmp_path_factory.mktemp("unpacked"), adapt)
    (out / "model_card.json").write_text(json.dumps(CARD))
    return out


def make_context(model_dir, headers: list[dict], yaml_config=None) -> Context:
    context = Context(
        "metarec", str(model_dir), {"model": {"modelName": "metarec"}}, len(headers), None, "0.12.0",
        model_yaml_config=yaml_config if yaml_config is not None else {"handler": {"max_support": 100}},
    )  # fmt: skip
    context.request_processor = [RequestProcessor(h) for h in headers]
    return context


@pytest.fixture(scope="module")
def handler(archive_dir):
    handler = MetaRecHandler()
    handler.initialize(make_context(archive_dir, [{}]))
    return handler


def run_batch(handler, archive_dir, requests: list[tuple[str | None, object]]):
    """Sends (url_path, body) pairs as one TorchServe batch; returns [(status, document)]."""
    headers = [{"url_path": path} if path is not None else {} for path, _ in requests]
    context = make_context(archive_dir, headers)
    data = [{"body": body} for _, body in requests]
    output = handler.handle(data, context)
    assert len(output) == len(requests)
    return [(context.get_response_status(i)[0], json.loads(text)) for i, text in enumerate(output)]


def test_initialize_reads_handler_settings(archive_dir):
    import torch

    threads = torch.get_num_threads()
    handler = MetaRecHandler()
    settings = {"max_steps": 3, "default_k": 4, "torch_threads": threads + 1}
    try:
        handler.initialize(make_context(archive_dir, [{}], {"handler": settings}))
        assert torch.get_num_threads() == threads + 1  # the worker's torch threads, not only a limit
    finally:
        torch.set_num_threads(threads)
    assert handler.parser.limits.max_steps == 3
    assert handler.parser.limits.default_k == 4
    assert handler.initialized


def test_the_store_keeps_users_for_the_archives_retention(archive_dir, tmp_path, monkeypatch):
    """``state_ttl_s`` of the ``handler:`` section reaches the store: 90 days unless set, 0 forever."""
    from metarec.serving.handler import STATE_URL_ENV

    monkeypatch.setenv(STATE_URL_ENV, f"sqlite:///{tmp_path / 'state.sqlite'}")
    for section, ttl_s in (({}, 90 * 24 * 3600), ({"state_ttl_s": 3600}, 3600), ({"state_ttl_s": 0}, None)):
        handler = MetaRecHandler()
        handler.initialize(make_context(archive_dir, [{}], {"handler": section}))
        assert handler.recommender.store.ttl_s == ttl_s
        handler.recommender.store.close()
    with pytest.raises(ValueError, match="state_ttl_s must be >= 0"):
        handler_limits({"handler": {"state_ttl_s": -1}})


@pytest.mark.parametrize("off", ["none", " None "])
def test_state_url_none_serves_without_per_user_state(archive_dir, monkeypatch, tmp_path, off):
    """The serving manifests' multi-replica default: no store (one SQLite file per pod would not be
    shared), so feedback and forget are refused with a 404 that says how to get a shared store, and
    stateless requests are answered as usual. The value is read as `metarec state` reads it (any case,
    blanks around it), so a hand-edited "None" does not open a per-pod store either."""
    from metarec.serving.handler import STATE_URL_ENV

    monkeypatch.chdir(tmp_path)  # where the embedded default would create its file
    monkeypatch.setenv(STATE_URL_ENV, off)
    handler = MetaRecHandler()
    handler.initialize(make_context(archive_dir, [{}]))
    assert not handler.recommender.keeps_state
    results = run_batch(
        handler,
        archive_dir,
        [
            ("feedback", {"user_id": "n1", "ratings": [{"item_id": "3", "rating": 4}]}),
            ("forget", {"user_id": "n1"}),
            ("adapt", {"support": GOOD_SUPPORT, "k": 2}),
        ],
    )
    for status, document in results[:2]:
        assert status == 404 and "METAREC_STATE_URL" in document["message"], document
    assert results[2][0] == 200 and len(results[2][1]["items"]) == 2
    assert not list(tmp_path.iterdir())  # no per-pod store file was created


def test_unknown_handler_setting_is_refused():
    with pytest.raises(ValueError, match="max_suport"):
        handler_limits({"handler": {"max_suport": 3}})
    assert handler_limits(None).torch_threads == 1


def test_routing_by_url_path(handler, archive_dir):
    results = run_batch(
        handler,
        archive_dir,
        [
            (None, {"user_id": "1", "k": 2}),
            ("", {"user_id": "1", "k": 2}),
            ("adapt", {"support": GOOD_SUPPORT, "k": 2}),
            ("explain", {"user_id": "1"}),
        ],
    )
    assert [status for status, _ in results] == [200, 200, 200, 404]
    assert results[0][1] == results[1][1] and len(results[0][1]["items"]) == 2
    assert "support_loss_after" in results[2][1]
    assert "unknown endpoint 'explain'" in results[3][1]["message"]


def test_bytes_string_and_decoded_bodies_are_accepted(handler, archive_dir):
    body = {"user_id": "2", "k": 3}
    results = run_batch(
        handler, archive_dir, [("", body), ("", json.dumps(body)), ("", json.dumps(body).encode())]
    )
    assert [status for status, _ in results] == [200, 200, 200]
    assert results[0][1] == results[1][1] == results[2][1]


def test_a_form_encoded_body_is_refused_with_415_naming_the_content_type(handler, archive_dir):
    """curl -d sends application/x-www-form-urlencoded: TorchServe 0.12 decodes the body as a form and
    passes its fields instead (a JSON text without '=' is dropped: an empty row; one with '=' becomes a
    field named up to it), which used to be answered 400 "empty request body". A multipart part named
    ``data`` is still read as the body."""
    form, multipart = "application/x-www-form-urlencoded", "multipart/form-data; boundary=x1"
    rows = [  # (Content-Type, what TorchServe hands the handler)
        (form, {}),  # -d '{"user_id":"1","k":3}'
        (form, {'{"user_id":"a': b'b","k":3}'}),  # -d '{"user_id":"a=b","k":3}'
        (multipart, {"file": b'{"user_id": "1", "k": 3}'}),  # -F file=@request.json
        (multipart, {"data": b'{"user_id": "1", "k": 3}'}),  # -F data=@request.json
        ("application/json", {"body": b'{"user_id": "1", "k": 3}', "debug": "1"}),  # ...?debug=1
        (None, {"body": b'{"user_id": "1", "k": 3}'}),  # no Content-Type at all
        ("application/json", {"body": b""}),
        (None, {}),
    ]
    context = make_context(archive_dir, [{"content-type": t} if t else {} for t, _ in rows])
    output = handler.handle([row for _, row in rows], context)
    statuses = [context.get_response_status(i)[0] for i in range(len(rows))]
    assert statuses == [415, 415, 415, 200, 200, 200, 400, 400]
    message = json.loads(output[0])["message"]
    assert "Content-Type: application/json" in message and form in message
    assert json.loads(output[3]) == json.loads(output[4]) == json.loads(output[5])


def test_a_bad_request_does_not_fail_its_batch(handler, archive_dir):
    results = run_batch(
        handler,
        archive_dir,
        [
            ("adapt", {"support": GOOD_SUPPORT}),
            ("adapt", b'{"support": [{"item_id": "1", "rating": NaN}]}'),
            ("", {"user_id": "5"}),
            ("", b"{not json"),
        ],
    )
    assert [status for status, _ in results] == [200, 400, 200, 400]
    assert "NaN is not a number" in results[1][1]["message"]
    assert results[3][1]["type"] == "RequestError"
    assert len(results[0][1]["items"]) == 10  # default k


@pytest.mark.parametrize(
    ("name", "route", "body", "status", "fragment"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_every_bad_input_gets_its_4xx(handler, archive_dir, name, route, body, status, fragment):
    ((got, document),) = run_batch(handler, archive_dir, [(route, body)])
    assert got == status, document
    assert fragment in document["message"]


def test_describe_returns_the_model_card(handler, archive_dir):
    context = make_context(archive_dir, [{"describe": "True"}])
    (card,) = handler.handle([{"body": b""}], context)
    assert json.loads(card) == CARD


def test_noop_handler_answers_without_a_model():
    # The latency benchmark's baseline handler lives in bench/ (not in the wheel).
    noop = load_bench("noop_handler").NoopHandler()
    context = make_context("/nonexistent", [{}, {}])
    noop.initialize(context)
    assert noop.handle([{"body": b'{"instances": [1, 2]}'}, {"body": {"a": 1}}], context) == [
        {"ok": True, "instances": 2},
        {"ok": True, "instances": 1},
    ]


# Passwords a state URL may carry: in the user part, in redis-py's ?password= query, and ones whose
# URL-reserved characters make the URL unparsable (redis-py then quoted the password's start).
SECRET = "Pw5ecret"
LEAKY_STATE_URLS = {
    "query password": f"redis://127.0.0.1:1/0?password={SECRET}",
    "slash in password": f"redis://:{SECRET}/x@metarec-redis:6379/0",
    "hash in password": f"redis://:{SECRET}#x@metarec-redis:6379/0",
    "digits then slash": f"redis://:1234/{SECRET}@metarec-redis:6379/0",
    "mistyped scheme": f"REDIS+tls://:{SECRET}@metarec-redis:6379/0",
}


def _error_chain_text(error: BaseException | None) -> str:
    """Every message TorchServe's traceback of a failed initialize would print."""
    text = ""
    while error is not None:
        text += f"{type(error).__name__}: {error}\n"
        error = error.__cause__ or error.__context__
    return text


@pytest.mark.parametrize("case", sorted(LEAKY_STATE_URLS))
def test_the_state_url_password_never_reaches_logs_or_errors(archive_dir, monkeypatch, caplog, case):
    from metarec.serving.handler import STATE_URL_ENV

    url = LEAKY_STATE_URLS[case]
    monkeypatch.setenv(STATE_URL_ENV, url)
    handler = MetaRecHandler()
    with caplog.at_level("DEBUG"):
        try:
            handler.initialize(make_context(archive_dir, [{}]))
        except Exception as error:  # noqa: BLE001 - an unparsable URL fails the worker: what does it print?
            printed = _error_chain_text(error)
            assert STATE_URL_ENV in printed, printed
        else:
            # redis-py accepts some broken URLs (a path that is no database number is ignored).
            printed = handler.recommender.store.where  # what 503 answers and warnings show
            handler.recommender.store.close()
    for text in (printed, caplog.text):
        # Any 4 characters of the password (redis-py quoted the part before a reserved character).
        assert not any(SECRET[i : i + 4] in text for i in range(len(SECRET) - 3)), text
