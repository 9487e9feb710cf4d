"""Every ``kubectl`` command the user-facing documents give names what the manifests create.

On-call runs these commands as written: a renamed Deployment, container, label or Service port leaves
them failing with ``NotFound`` at the worst moment. The checker (``tests/runbook_checker.py``: extraction
from the documents, the rendered manifests, the rules and the allow-lists) runs here on every command of
the documents, and on broken lines to show each rule fails.
"""

from __future__ import annotations

import re

import pytest
from runbook_checker import (
    DOCS,
    EXTERNAL_NAMESPACE_LABELS,
    REPO,
    RUNTIME_OBJECTS,
    USER_PATHS,
    USER_SECRETS,
    Context,
    Obj,
    build_index,
    check_command,
    document_commands,
    documented_commands,
    real_index,
)

# ----------------------------------------------------------------------------------------------------
# The documents


@pytest.fixture(scope="module")
def index() -> list[Obj]:
    commands, context = documented_commands()
    return real_index(context.applied)


def test_every_documented_kubectl_command_names_what_the_manifests_create(index):
    commands, context = documented_commands()
    # The extraction cannot pass on nothing: the documents hold about 70 kubectl lines.
    assert len(commands) >= 60, [c.where for c in commands]
    used: set = set()
    problems = [p for command in commands for p in check_command(command, index, context, used)]
    assert problems == []
    allowed = set(RUNTIME_OBJECTS) | {("path", p) for p in USER_PATHS} | {("secret", s) for s in USER_SECRETS}
    allowed |= {("label", k) for k in EXTERNAL_NAMESPACE_LABELS}
    assert allowed - used == set(), "allow-list entries no document uses any more: remove them"


def test_every_kubectl_line_of_the_documents_is_extracted():
    """Each document line that starts a ``kubectl`` command (in code or inline code) yields a command."""
    commands, _ = documented_commands()
    lines = {c.where for c in commands}
    expected = set()
    for doc in DOCS:
        name = doc.relative_to(REPO).as_posix()
        for number, line in enumerate(doc.read_text().split("\n"), 1):
            if (
                re.search(r"(?:^\s*|[`(|]|&& |: |\$\()kubectl\s+-?[a-z]", line)
                and "kubectl refuses" not in line
            ):
                expected.add(f"{name}:{number}")
    assert expected - lines == set()


def test_kserve_predictor_allowance_matches_the_inferenceservice(index):
    """``metarec-predictor`` is allowed because KServe derives it from InferenceService ``metarec`` in
    RawDeployment mode: renaming the InferenceService or changing its mode must revisit the allow-list."""
    (isvc,) = {(o.name, o.raw["metadata"]["annotations"]["serving.kserve.io/deploymentMode"])
               for o in index if o.kind == "InferenceService"}  # fmt: skip
    assert isvc == ("metarec", "RawDeployment")
    assert ("Deployment", f"{isvc[0]}-predictor") in RUNTIME_OBJECTS


# ----------------------------------------------------------------------------------------------------
# Each rule fails on a broken line (checked against the real manifests)

SERVING_MOVED = "(cd manifests/serving/overlays/kserve && kustomize edit set namespace $SERVING_NS)\n"


def _problems(snippet: str, index) -> list[str]:
    context = Context()
    context.defaults["NS"] = "kubeflow-user-example-com"
    context.applied = documented_commands()[1].applied  # what the real documents apply on its own
    commands = document_commands(snippet, "snippet.md", context)
    assert commands, "the snippet holds no kubectl command"
    used: set = set()
    return [p for command in commands for p in check_command(command, index, context, used)]


BROKEN = [
    ("```bash\nkubectl apply -k manifests/serving/overlays/gke-cpux\n```", "no such path"),
    ("```bash\nkubectl apply -k manifests/serving\n```", "no kustomization.yaml"),
    ("```bash\nOVERLAY=manifests/serving/overlays/nope\nkubectl apply -k $OVERLAY\n```", "no such path"),
    ("```bash\nkubectl apply -n $NS -k manifests/serving/overlays/gke-cpu\n```", "pins namespace"),
    ("```bash\nkubectl -n metarec get deploy/metarec-servin\n```", "no Deployment named"),
    ("```bash\nkubectl -n metarec rollout status statefulset/metarec-serving\n```", "no StatefulSet named"),
    ("```bash\nkubectl -n metarec rollout undo deployment metarec-servin\n```", "no Deployment named"),
    ("`kubectl -n <namespace> logs metarec-<method>-<hash>-chief-0`", "no Pod named"),
    ("```bash\nkubectl -n metarec get deplyment metarec-serving\n```", "unknown resource type"),
    ("```bash\nkubectl -n metrec get deploy metarec-serving\n```", "set by no manifest"),
    ("```bash\nkubectl exec deploy/metarec-serving -c torchserve -- ls\n```", "does not reach"),
    ("```bash\nkubectl -n $SERVING_NS get inferenceservice metarec\n```", "does not reach"),
    (
        "```bash\nkubectl -n metarec exec \\\n  deploy/metarec-serving -c torchsrv -- ls\n```",
        "no container 'torchsrv'",
    ),
    (
        "Erase: `kubectl -n metarec exec deploy/metarec-serving -c ts --\nmetarec state forget U`.",
        "no container",
    ),
    (
        "```bash\nkubectl -n metarec logs -l app.kubernetes.io/name=metarec-servng\n```",
        "selects no pod template",
    ),
    ("```sh\nkubectl -n <namespace> logs -f metarec-meta-train-master-1\n```", "no Pod named"),
    ("```bash\nkubectl -n metarec port-forward svc/metarec-serving 8081:8081\n```", "has no port 8081"),
    (
        "```bash\nkubectl -n metarec create secret generic metarec-redis-pw --from-literal=password=x\n```",
        "no workload reads Secret",
    ),
    (
        "```bash\nkubectl -n metarec create secret generic metarec-redis-auth --from-literal=pw=x\n```",
        "lacks the key(s) ['password']",
    ),
    (
        "```bash\nkubectl create rolebinding b -n $NS --role=metarec-pipelin --serviceaccount=$NS:default-editor\n```",
        "no Role named",
    ),
    ("`kubectl label namespace NAME metarec.io/inference-clients=true`", "no namespaceSelector"),
    ("```bash\nkubectl create namespace metrec\n```", "set by no manifest"),
    (
        "```yaml\n# katib-overlay/kustomization.yaml, then: kubectl create -n $NS -k manifests/katb\n```",
        "no such path",
    ),
    (
        "```bash\nCUR=$(kubectl -n metarec get deployment metarec-serv -o jsonpath='{.x}')\n```",
        "no Deployment",
    ),
    (
        "```sh\nkubectl delete -n <namespace> -k manifests/training-example\n```",
        "also deletes ['ServiceAccount/",
    ),
    (
        "```sh\nkubectl create -k manifests/training-example   # `kubectl delete -k` when done\n```",
        "names no path",
    ),
    (
        "```bash\nkubectl -n metarec get deploy metarec-serving -o jsonpath='{.spec.template.spec.initContainers"
        '[?(@.name=="fetch")].env}\'\n```',
        "no initContainers entry 'fetch'",
    ),
    (
        '```bash\nkubectl -n metarec patch deploy metarec-serving -p \'{"spec":{"template":{"spec":'
        '{"containers":[{"name":"fetch-model","env":[]}]}}}}\'\n```',
        "no containers entry 'fetch-model'",
    ),
]


@pytest.mark.parametrize("snippet, expected", BROKEN, ids=[f"broken-{i}" for i in range(len(BROKEN))])
def test_a_broken_command_is_reported(snippet, expected, index):
    problems = _problems(snippet, index)
    assert any(expected in p for p in problems), problems


FINE = [
    "`kubectl -n <namespace> logs metarec-<method>-<hash>-worker-0`",  # the pipeline's job, built in code
    "A later `kubectl apply -k` keeps the version.",  # prose naming the flag, not an instruction
    "```sh\nkubectl -n <namespace> delete pytorchjob metarec-meta-train\n```",
    "```bash\nkubectl -n metarec exec deploy/metarec-serving -c fetch-model -- ls\n```",  # init container
    "```sh\nkubectl -n <namespace> logs -f metarec-meta-train-worker-0\n```",
    f"```bash\n{SERVING_MOVED}kubectl -n $SERVING_NS get inferenceservice metarec\n```",
    "```bash\nkubectl -n $NS get role metarec-pipeline\n```",  # the documented default namespace
    "```bash\nkubectl -n $NS logs -l app.kubernetes.io/component=meta-train\n```",  # the pipeline's job
]


@pytest.mark.parametrize("snippet", FINE, ids=[f"fine-{i}" for i in range(len(FINE))])
def test_a_correct_command_passes(snippet, index):
    assert _problems(snippet, index) == []


def test_logs_without_container_needs_a_single_or_default_container():
    two = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "metarec"},
           "spec": {"template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "a"}, {"name": "b"}]}}}}  # fmt: skip
    index = build_index({"x": [two]})
    assert any("name one with -c" in p for p in _problems("`kubectl -n metarec logs deploy/web`", index))
    assert any("name one with -c" in p for p in _problems("`kubectl -n metarec logs -l app=web`", index))
    assert _problems("`kubectl -n metarec logs deploy/web -c b`", index) == []
    two["spec"]["template"]["metadata"]["annotations"] = {"kubectl.kubernetes.io/default-container": "a"}
    assert _problems("`kubectl -n metarec logs deploy/web`", build_index({"x": [two]})) == []
