"""docs/openapi.yaml against the code: the document is valid, every example and every variant of every
route is answered as it says, refused bodies get a documented status and error body, its routes are
``ROUTES`` and its bounds the default ``RequestLimits`` (in process, through the real handler)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from demo_model import build_untrained_model
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from serving_cases import BAD_REQUESTS, GOOD_SUPPORT
from test_handler import make_context, run_batch

from metarec.realtime import HISTORY_FILE, write_history
from metarec.serving.errors import MAX_MESSAGE_CHARS
from metarec.serving.handler import STATE_URL_ENV, MetaRecHandler
from metarec.serving.routes import ROUTES, Route
from metarec.serving_settings import RequestLimits
from metarec.state import StoreUnavailableError

SPEC_PATH = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
SPEC_TEXT = SPEC_PATH.read_text()
SPEC = yaml.safe_load(SPEC_TEXT)
URI = "urn:metarec:openapi"  # the document's base URI for resolving its "#/components/..." references
JSON = "application/json"
CARD = {"model_name": "metarec", "version": "1.0"}
OPERATIONS = {path: item["post"] for path, item in SPEC["paths"].items()}
# KServe's v1 protocol route, which TorchServe answers itself (the kserve overlay's clients call it).
KSERVE_V1_PATH = "/v1/models/{model_name}:predict"


def registry(spec: dict) -> Registry:
    return Registry().with_resource(URI, DRAFT202012.create_resource(spec))


def validator(ref: str, spec: dict = SPEC) -> Draft202012Validator:
    """A validator of the schema at ``ref`` (``#/components/schemas/...``) of ``spec``."""
    return Draft202012Validator({"$ref": URI + ref}, registry=registry(spec))


def resolve(ref: str, spec: dict = SPEC):
    """The node a document-local reference (``#/a/b``) points at; KeyError when it dangles."""
    node = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def follow(node: dict, spec: dict = SPEC) -> dict:
    """Follows ``$ref`` (request bodies, responses, parameters) to the node itself."""
    while "$ref" in node:
        node = resolve(node["$ref"], spec)
    return node


def route_of(path: str) -> str:
    return OPERATIONS[path]["x-metarec-route"]


def path_of(route: str) -> str:
    """The versioned path of a route (the one every route has)."""
    return next(p for p in OPERATIONS if route_of(p) == route and "{model_version}" in p)


def response_schema_ref(path: str, status: int | str) -> str:
    media = follow(OPERATIONS[path]["responses"][str(status)])["content"][JSON]
    return media["schema"]["$ref"]


def request_schema_ref(path: str) -> str:
    return follow(OPERATIONS[path]["requestBody"])["content"][JSON]["schema"]["$ref"]


def errors_of(ref: str, document, spec: dict = SPEC) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(ref, spec).iter_errors(document)
    ]


def walk(node, where="#"):
    """Yields (JSON pointer, node) for every mapping of the document."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for position, value in enumerate(node):
            yield from walk(value, f"{where}/{position}")


# ------------------------------------------------------------------------------------ the document


def test_the_document_is_openapi_3_1_with_json_schema_2020_12():
    assert SPEC["openapi"].startswith("3.1.")
    assert SPEC["jsonSchemaDialect"] == "https://json-schema.org/draft/2020-12/schema"
    assert SPEC["info"]["title"] and SPEC["info"]["version"]
    operation_ids = [operation["operationId"] for operation in OPERATIONS.values()]
    assert len(set(operation_ids)) == len(operation_ids)
    for path, item in SPEC["paths"].items():
        assert set(item) <= {"parameters", "post"}, path  # every route is a POST
        declared = {follow(p)["name"] for p in item.get("parameters", []) if follow(p)["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path
        operation = item["post"]
        assert follow(operation["requestBody"])["required"] is True
        assert "200" in operation["responses"]
        for status, response in operation["responses"].items():
            response = follow(response)
            assert response["description"], (path, status)
            assert set(response["content"]) == {JSON}, (path, status)
            assert "$ref" in response["content"][JSON]["schema"]  # validated by name below


def test_every_reference_resolves_and_every_schema_is_valid_json_schema():
    for _, node in walk(SPEC):
        if isinstance(node.get("$ref"), str):
            resolve(node["$ref"])  # KeyError: a dangling reference
    for name, schema in SPEC["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        validator(f"#/components/schemas/{name}")  # compiles with the document's registry
    for _, node in walk(SPEC["paths"]):
        if "schema" in node and isinstance(node["schema"], dict):
            Draft202012Validator.check_schema(node["schema"])


def test_every_example_in_the_document_validates_against_its_schema():
    checked = 0
    for where, node in walk(SPEC):
        if "examples" in node and "schema" in node:  # a media type or a parameter
            schema = node["schema"]
            for name, example in node["examples"].items():
                assert not errors_of(schema["$ref"], example["value"]), (where, name)
                checked += 1
        if where.startswith("#/components/schemas/") and isinstance(node.get("examples"), list):
            for example in node["examples"]:
                assert not errors_of("#" + where.removeprefix("#"), example), (where, example)
                checked += 1
    assert checked >= 20


def test_the_routes_are_the_handlers_routes():
    routes = {route_of(path) for path in OPERATIONS}
    assert routes == set(ROUTES)
    for path in OPERATIONS:
        if path == KSERVE_V1_PATH:
            continue  # below
        assert path.startswith("/predictions/{model_name}")
        route = route_of(path)
        suffix = path.removeprefix("/predictions/{model_name}").removeprefix("/{model_version}")
        assert suffix == (f"/{route}" if route else ""), path
    # Each route has a KServe v1 example (the handler accepts one on every route).
    for route in ROUTES:
        examples = follow(OPERATIONS[path_of(route)]["requestBody"])["content"][JSON]["examples"]
        assert any("instances" in example["value"] for example in examples.values()), route
    # KServe's v1 predict route reaches the handler without a route suffix (TorchServe sets no url_path
    # header; `make fidelity` calls it over HTTP): recommend, in its KServe v1 form only.
    assert route_of(KSERVE_V1_PATH) == ""
    assert request_schema_ref(KSERVE_V1_PATH) == "#/components/schemas/KServeRecommendBody"
    assert response_schema_ref(KSERVE_V1_PATH, 200) == "#/components/schemas/KServeRecommendResponse"
    assert set(OPERATIONS[KSERVE_V1_PATH]["responses"]) == set(OPERATIONS[path_of("")]["responses"])


def test_the_bounds_are_the_default_request_limits():
    limits = RequestLimits()
    named = set()
    for where, node in walk(SPEC):
        for keyword, name in (node.get("x-metarec-limit") or {}).items():
            assert node[keyword] == getattr(limits, name), (where, keyword, name)
            named.add(name)
    assert named >= {"max_k", "default_k", "max_support", "max_feedback", "max_instances",
                     "max_user_id_chars", "max_steps"}  # fmt: skip
    # Limits quoted in prose as "`name` (value)".
    quoted = re.findall(r"`(\w+)` \(([\d.]+)\)", SPEC_TEXT)
    assert {name for name, _ in quoted} >= {"max_body_bytes", "max_json_depth", "max_number_chars",
                                            "max_explained", "feature_z_limit", "max_quote_chars"}  # fmt: skip
    for name, value in quoted:
        if hasattr(limits, name):
            assert float(value) == float(getattr(limits, name)), name
    error = SPEC["components"]["schemas"]["Error"]
    request_error = next(
        part["then"] for part in error["allOf"] if part["if"]["properties"]["type"]["const"] == "RequestError"
    )
    assert request_error["properties"]["message"]["maxLength"] == MAX_MESSAGE_CHARS + len("...")


# ------------------------------------------------------------------------------ against the code


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The in-process handler over an untrained model adapting in mode "head" (explanations), with
    the archive's history of the training users and an SQLite state store."""
    work = tmp_path_factory.mktemp("openapi")
    model_dir = build_untrained_model(work, {"mode": "head", "inner_steps": 2, "inner_lr": 0.05})
    write_history(work / "pre", model_dir / HISTORY_FILE, window=200)
    (model_dir / "model_card.json").write_text(json.dumps(CARD))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STATE_URL_ENV, f"sqlite:///{work / 'state.sqlite'}")
        handler = MetaRecHandler()
        handler.initialize(make_context(model_dir, [{}]))
    yield handler, model_dir
    handler.recommender.store.close()


def send(served, route: str, body) -> tuple[int, dict]:
    handler, model_dir = served
    ((status, document),) = run_batch(handler, model_dir, [(route, body)])
    return status, document


def check_answer(route: str, document) -> None:
    ref = response_schema_ref(path_of(route), 200)
    assert not errors_of(ref, document), (route, errors_of(ref, document), document)


def history_user(model_dir: Path) -> str:
    return str(pd.read_parquet(model_dir / HISTORY_FILE)["user_id"].iloc[0])


def test_every_documented_example_is_answered_200_as_documented(served):
    # Routes in table order: feedback creates the users that the forget examples erase.
    for route in ROUTES:
        path = path_of(route)
        examples = follow(OPERATIONS[path]["requestBody"])["content"][JSON]["examples"]
        for name, example in examples.items():
            status, document = send(served, route, example["value"])
            assert status == 200, (route, name, document)
            check_answer(route, document)
            if "instances" in example["value"]:
                assert len(document["predictions"]) == len(example["value"]["instances"])


def test_the_kserve_v1_examples_are_answered_as_documented(served):
    """Sent as TorchServe hands a /v1/models/<model>:predict body over: no route suffix."""
    examples = follow(OPERATIONS[KSERVE_V1_PATH]["requestBody"])["content"][JSON]["examples"]
    for name, example in examples.items():
        status, document = send(served, None, example["value"])
        assert status == 200, (name, document)
        assert not errors_of(response_schema_ref(KSERVE_V1_PATH, 200), document), document
        assert len(document["predictions"]) == len(example["value"]["instances"])


def variants(user: str) -> list[tuple[str, str, dict]]:
    """(name, route, body): every route's main variants; ``user`` has shipped history."""
    one = [{"item_id": "4", "rating": 2}]
    return [
        ("known_user_with_history", "", {"user_id": user, "k": 5}),
        ("known_user_include_rated", "", {"user_id": user, "k": 100, "include_rated": True}),
        ("known_user_explained", "", {"user_id": user, "k": 3, "explain": True}),
        ("known_user_without_history", "", {"user_id": "2"}),
        (
            "new_user_features",
            "",
            {"user": {"age": 30, "gender": "M", "occupation": "writer", "zip": "12345"}},
        ),
        ("new_user_explained", "", {"user": {"age": 30}, "k": 2, "explain": True}),
        ("unknown_category_noted", "", {"user": {"gender": "Q"}, "k": 1}),
        ("candidates_and_exclude", "", {"user_id": user, "candidates": [1, "2", "3"], "exclude": ["3"]}),
        ("kserve_recommend", "", {"instances": [{"user_id": user}, {"user": {}}, {"user_id": "3", "k": 1}]}),
        ("adapt_anonymous", "adapt", {"support": GOOD_SUPPORT, "k": 3}),
        ("adapt_steps_capped", "adapt", {"support": GOOD_SUPPORT, "steps": 50, "k": 1}),
        ("adapt_explained", "adapt", {"support": GOOD_SUPPORT, "k": 2, "explain": True}),
        ("adapt_include_rated", "adapt", {"support": GOOD_SUPPORT, "k": 80, "include_rated": True}),
        ("adapt_new_named_user", "adapt", {"user_id": "variant-new", "support": one, "user": {"age": 50}}),
        ("adapt_known_user", "adapt", {"user_id": user, "support": one}),
        ("kserve_adapt", "adapt", {"instances": [{"support": one}, {"support": GOOD_SUPPORT, "steps": 0}]}),
        ("feedback_without_k", "feedback", {"user_id": "variant-fb", "ratings": one}),
        ("feedback_with_k", "feedback", {"user_id": "variant-fb", "ratings": GOOD_SUPPORT, "k": 4}),
        ("feedback_explained", "feedback", {"user_id": user, "ratings": one, "k": 2, "explain": True}),
        ("recommend_stored_new_user", "", {"user_id": "variant-fb", "k": 3, "explain": True}),
        (
            "kserve_feedback",
            "feedback",
            {
                "instances": [
                    {"user_id": "variant-fb", "ratings": one, "k": 1},
                    {"user_id": "variant-fb2", "ratings": one},
                ]
            },
        ),  # fmt: skip
        ("forget_stored_user", "forget", {"user_id": "variant-fb"}),
        ("forget_history_user", "forget", {"user_id": user}),
        ("forget_unknown_user", "forget", {"user_id": "nobody-at-all"}),
        ("kserve_forget", "forget", {"instances": [{"user_id": "variant-fb2"}, {"user_id": 7}]}),
    ]


def test_every_route_and_variant_is_answered_as_the_schema_says(served):
    handler, model_dir = served
    user = history_user(model_dir)
    seen = {}
    for name, route, body in variants(user):
        assert not errors_of(request_schema_ref(path_of(route)), body), name
        status, document = send(served, route, body)
        assert status == 200, (name, document)
        check_answer(route, document)
        seen[name] = document
    # The variants reach the optional parts of the answers (or the schemas would be checked on less).
    assert seen["known_user_with_history"]["personalised"] is True
    assert "state_version" in seen["known_user_with_history"]
    explained = seen["known_user_explained"]["items"][0]["explanation"]
    assert explained["ratings"] and explained["prior_features"]["shares"]
    assert all("explanation" in item for item in seen["adapt_explained"]["items"])
    assert "title" in seen["new_user_features"]["items"][0]  # a display field
    assert seen["unknown_category_noted"]["notes"]
    assert seen["adapt_new_named_user"]["stored"] is True and seen["adapt_steps_capped"]["steps"] == 10
    assert "items" not in seen["feedback_without_k"] and len(seen["feedback_with_k"]["items"]) == 4
    assert seen["forget_stored_user"]["deleted"] is True and seen["forget_history_user"]["notes"]
    assert seen["forget_unknown_user"]["deleted"] is False


# Bodies the schemas describe as invalid: the server refuses each with the status given and the
# request schema rejects it too. (route, body, status)
SCHEMA_INVALID = [
    ("", {"user_id": "1", "top": 3}, 400),  # unknown field
    ("", {"user_id": "1", "k": "3"}, 400),  # wrong type
    ("", {"user_id": "1", "k": 101}, 400),  # over max_k
    ("", {"k": 3}, 400),  # neither user_id nor user
    ("", {"user_id": ""}, 400),
    ("", {"user_id": "a\u0007b"}, 400),  # control character
    ("", {"user_id": "1", "explain": "yes"}, 400),
    ("", {"user": {"age": [1]}}, 400),
    ("", {"instances": [{"user_id": "1"}], "k": 2}, 400),
    ("", {"instances": []}, 400),
    ("adapt", {"support": [{"item_id": "1", "rating": "5"}]}, 400),  # wrong type
    ("adapt", {"support": [{"item_id": "1", "rating": 5, "w": 1}]}, 400),
    ("adapt", {"support": []}, 400),
    ("adapt", {"support": [{"item_id": str(i), "rating": 4} for i in range(1, 102)]}, 413),  # oversized
    ("adapt", {"support": GOOD_SUPPORT, "steps": -1}, 400),
    ("adapt", {"instances": [{"support": GOOD_SUPPORT}] * 65}, 413),
    ("feedback", {"ratings": [{"item_id": "1", "rating": 4}]}, 400),  # no user_id
    ("feedback", {"user_id": "u", "ratings": [{"item_id": "1", "rating": 4, "mood": 1}]}, 400),
    ("feedback", {"user_id": "u", "ratings": [{"item_id": "1", "rating": 4, "timestamp": "now"}]}, 400),
    ("feedback", {"user_id": "u", "ratings": [{"item_id": "1", "rating": 4}] * 101}, 413),
    ("feedback", {"user_id": "u", "ratings": [{"item_id": "1", "rating": 4}], "steps": 2}, 400),
    ("forget", {"user_id": "u", "k": 3}, 400),
    ("forget", {}, 400),
    ("forget", {"user_id": 1.5}, 400),
    ("forget", {"user_id": ["u"]}, 400),
]
# Refused although the schema cannot tell (model-specific or cross-field rules): documented in prose.
MODEL_INVALID = [
    ("adapt", {"support": [{"item_id": "1", "rating": 6}]}, 400),  # out of the trained range
    ("feedback", {"user_id": "u", "ratings": [{"item_id": "1", "rating": 0}]}, 400),
    ("feedback", {"user_id": "u", "ratings": [{"item_id": "nope", "rating": 3}]}, 400),
    ("adapt", {"support": [{"item_id": "1", "rating": 5}, {"item_id": 1, "rating": 2}]}, 400),
    ("", {"user_id": "1", "k": 2.0}, 400),
    ("", {"user_id": "999999"}, 404),
    ("", {"user_id": "1", "user": {"age": 30}}, 400),
    ("", {"user": {"age": 1e20}}, 400),
    ("", {"instances": [{"user_id": "1", "explain": True}] * 5}, 413),
]


def check_error(route: str | None, status: int, document) -> None:
    """The error body is the handler's Error and the route documents its status."""
    assert not errors_of("#/components/schemas/Error", document), document
    paths = [path_of(route)] if route in ROUTES else list(OPERATIONS)  # an unknown route: any path
    for path in paths:
        assert str(status) in OPERATIONS[path]["responses"], (path, status)
        assert not errors_of(response_schema_ref(path, status), document)


@pytest.mark.parametrize(("route", "body", "status"), SCHEMA_INVALID)
def test_a_body_the_schema_refuses_is_refused_with_a_documented_error(served, route, body, status):
    assert errors_of(request_schema_ref(path_of(route)), body)
    got, document = send(served, route, body)
    assert got == status, document
    check_error(route, got, document)


@pytest.mark.parametrize(("route", "body", "status"), MODEL_INVALID)
def test_a_body_only_the_model_refuses_gets_a_documented_error(served, route, body, status):
    got, document = send(served, route, body)
    assert got == status, document
    check_error(route, got, document)


def test_every_known_bad_request_gets_a_documented_error(served):
    """The shared bad-input cases (tests/serving_cases.py): status documented, error body valid."""
    handler, model_dir = served
    results = run_batch(handler, model_dir, [(route, body) for _, route, body, _, _ in BAD_REQUESTS])
    for (name, route, _, status, _), (got, document) in zip(BAD_REQUESTS, results, strict=True):
        assert got == status, name
        check_error(route, got, document)


def test_form_bodies_store_outages_and_internal_errors_answer_the_documented_errors(served, monkeypatch):
    handler, model_dir = served
    context = make_context(model_dir, [{"content-type": "application/x-www-form-urlencoded"}])
    (text,) = handler.handle([{}], context)
    assert context.get_response_status(0)[0] == 415
    check_error("", 415, json.loads(text))

    def unavailable(user_id):
        raise StoreUnavailableError("sqlite:///state.sqlite", OSError("disk I/O error"))

    monkeypatch.setattr(handler.recommender.store, "delete", unavailable)
    context = make_context(model_dir, [{"url_path": "forget"}])
    (text,) = handler.handle([{"body": b'{"user_id": "u"}'}], context)
    assert context.get_response_status(0)[0] == 503
    assert context.get_response_headers(0).get("Retry-After") == "1"  # documented header
    assert "Retry-After" in follow(OPERATIONS[path_of("forget")]["responses"]["503"])["headers"]
    check_error("forget", 503, json.loads(text))

    def broken(parser, request):
        raise RuntimeError("a bug the validation missed")

    monkeypatch.setitem(ROUTES, "forget", Route(broken, ROUTES["forget"].answer))
    status, document = send(served, "forget", {"user_id": "u"})
    assert status == 500
    check_error("forget", 500, document)


# --------------------------------------------------------------------- the checks can fail


def test_a_wrong_response_schema_fails_the_checks(served):
    """Mutants of the document that misdescribe real answers are caught."""
    handler, model_dir = served
    status, answer = send(served, "", {"user_id": history_user(model_dir), "k": 2, "explain": True})
    assert status == 200
    ref = "#/components/schemas/RecommendAnswer"
    assert not errors_of(ref, answer)
    mutants = []
    spec = copy.deepcopy(SPEC)  # a returned field left out (additionalProperties false)
    del spec["components"]["schemas"]["RecommendAnswer"]["properties"]["model_version"]
    mutants.append(spec)
    spec = copy.deepcopy(SPEC)  # a wrong type
    spec["components"]["schemas"]["Item"]["properties"]["score"]["type"] = "string"
    mutants.append(spec)
    spec = copy.deepcopy(SPEC)  # an explanation field left out
    del spec["components"]["schemas"]["Explanation"]["properties"]["other_ratings"]
    mutants.append(spec)
    spec = copy.deepcopy(SPEC)  # a field said to be always there that is not
    spec["components"]["schemas"]["RecommendAnswer"]["required"].append("notes")
    mutants.append(spec)
    for spec in mutants:
        assert errors_of(ref, answer, spec)


# ------------------------------------------------------------------------- the prose agrees

SERVING_DOC = SPEC_PATH.parent / "serving.md"
POST_HEADING = re.compile(r"^### .*`POST /predictions/metarec(?:/1\.0)?/?(\w*)`$", re.M)


def documented_exchanges() -> list[tuple[str, str, str]]:
    """(route, "request"/"answer", JSON text) of the curl examples under serving.md's POST headings:
    the ``-d '...'`` bodies and the answers (code-block lines starting with ``{``)."""
    text = SERVING_DOC.read_text()
    headings = list(POST_HEADING.finditer(text))
    exchanges = []
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        section = text[heading.end() : following.start() if following else text.find("\n## ", heading.end())]
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            exchanges += [
                (heading.group(1), "request", body) for body in re.findall(r"-d '(.*?)'", block, re.S)
            ]
            exchanges += [
                (heading.group(1), "answer", line) for line in block.splitlines() if line.startswith("{")
            ]
    return exchanges


def test_the_serving_docs_examples_are_valid_requests_and_answers():
    exchanges = documented_exchanges()
    assert {route for route, _, _ in exchanges} >= {"", "adapt"}
    assert {kind for _, kind, _ in exchanges} == {"request", "answer"}
    for route, kind, text in exchanges:
        document = json.loads(text)  # "..." for the rest of a list is no JSON: show a whole answer
        path = path_of(route)
        ref = request_schema_ref(path) if kind == "request" else response_schema_ref(path, 200)
        assert not errors_of(ref, document), (route, kind, text, errors_of(ref, document))


def test_the_serving_docs_say_every_route_takes_kserve_bodies():
    text = SERVING_DOC.read_text()
    section = text[text.index("### KServe v1 bodies") :].split("\n#", 1)[0]
    assert [route for route in ROUTES if route and f"`{route}`" not in section] == []
