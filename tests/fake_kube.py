"""A fake Kubernetes API server over HTTP, for the components that drive the cluster.

There is no kube-apiserver on this machine, so the real ``kubernetes`` client talks to this stand-in:
objects are stored per collection path (``/apis/<group>/<version>/namespaces/<ns>/<plural>``) with create
(409 when the name exists), get (404), replace (409 when its resourceVersion is stale), merge patch (strategic merge patch for the built-in
kinds; 415 for a custom resource, as kube-apiserver answers), delete and list. ``resourceVersion`` and ``generation`` move on every write. A *controller*
callback stands in for the operators (Training Operator, KServe, the Deployment controller): it is called
after every write with the stored object and may change its status. ``kubeconfig()`` writes a kubeconfig
that points the client here.

Two more pieces of real behaviour, for what an on-call ``kubectl apply`` does after a rollout:

* the API server's validation of container env vars (``validateEnvVarValueFrom`` in kubernetes'
  pkg/apis/core/validation/validation.go): an entry with both a non-empty ``value`` and a ``valueFrom``,
  or with two ``valueFrom`` sources, is refused with 422 Invalid;
* :func:`client_side_apply`: ``kubectl apply`` without ``--server-side``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

_OBJECT_PATH = re.compile(r"^(?P<collection>/apis?/.+/namespaces/[^/]+/[^/]+?)(?:/(?P<name>[^/]+))?/?$")
Controller = Callable[["FakeKube", str, dict], None]


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class Invalid(Exception):
    """What the API server answers with 422 Invalid."""


def _merge_key(items) -> str | None:
    """The strategic merge key of a list: the built-in lists MetaRec's pod templates use (containers,
    initContainers, env, volumes) merge on ``name``; other lists are replaced whole."""
    if isinstance(items, list) and items and all(isinstance(i, dict) and "name" in i for i in items):
        return "name"
    return None


def merge_patch(target: dict, patch: dict, strategic: bool = False) -> dict:
    """Applies a JSON merge patch (RFC 7386: dicts merge, ``None`` deletes, anything else replaces) or,
    ``strategic``, a strategic merge patch: the same, except that lists keyed by ``name`` merge item by
    item (``{"name": n, "$patch": "delete"}`` removes one), as for the built-in kinds."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value, strategic)
        elif (
            strategic and isinstance(value, list) and _merge_key(value) and isinstance(result.get(key), list)
        ):
            items = result[key]
            for item in value:
                index = next((i for i, old in enumerate(items) if old.get("name") == item["name"]), None)
                if item.get("$patch") == "delete":
                    if index is not None:
                        items.pop(index)
                elif index is None:
                    items.append(copy.deepcopy(item))
                else:
                    items[index] = merge_patch(items[index], item, strategic)
        else:
            result[key] = copy.deepcopy(value)
    return result


def three_way_patch(original: dict, modified: dict, current: dict, strategic: bool) -> dict:
    """The patch ``kubectl apply`` (client-side) sends: fields of the last applied configuration
    (``original``) that the new one (``modified``) lacks are deleted; fields of ``modified`` whose value
    differs from the live object (``current``) are set; fields only the live object has are left alone
    (kubernetes.io/docs/tasks/manage-kubernetes-objects/declarative-config, "Merge patch calculation").
    Custom resources get a JSON merge patch (lists replaced whole), built-in kinds a strategic one."""
    patch: dict = {key: None for key in original if key not in modified}
    for key, value in modified.items():
        live, before = current.get(key), original.get(key)
        if isinstance(value, dict) and isinstance(live, dict):
            sub = three_way_patch(before if isinstance(before, dict) else {}, value, live, strategic)
            if sub:
                patch[key] = sub
        elif strategic and _merge_key(value) and _merge_key(live):
            items = []
            for item in value:
                old = next(
                    (o for o in before or [] if isinstance(o, dict) and o.get("name") == item["name"]), {}
                )
                now = next((o for o in live if o["name"] == item["name"]), None)
                sub = item if now is None else three_way_patch(old, item, now, strategic)
                if sub:
                    items.append({**sub, "name": item["name"]})
            names = {item["name"] for item in value}
            gone = [o["name"] for o in before or [] if isinstance(o, dict) and o.get("name") not in names]
            items += [{"name": n, "$patch": "delete"} for n in gone]
            if items:
                patch[key] = items
        elif value != live:
            patch[key] = copy.deepcopy(value)
    return patch


# What kube-apiserver answers a strategic merge patch of a custom resource with (HTTP 415).
STRATEGIC_ON_CRD = (
    "the body of the request was in an unknown format - accepted media types include: "
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
)


# What kube-apiserver answers an update whose resourceVersion is not the stored one (HTTP 409).
CONFLICT = (
    "Operation cannot be fulfilled on {name}: the object has been modified; please apply your changes "
    "to the latest version and try again"
)


def _builtin(collection: str) -> bool:
    """Whether a collection holds a built-in kind (core or apps here), which has strategic merge keys."""
    return collection.startswith(("/api/v1/", "/apis/apps/"))


def validate(obj: dict) -> None:
    """Raises :class:`Invalid` for an env var the API server refuses, in any pod template of ``obj``."""
    template = (obj.get("spec") or {}).get("template") or {}
    pod = template.get("spec") or {}
    for kind in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(kind) or []):
            for j, env in enumerate(container.get("env") or []):
                where = f"spec.template.spec.{kind}[{i}].env[{j}].valueFrom"
                sources = [k for k in (env.get("valueFrom") or {}) if (env["valueFrom"][k] is not None)]
                if env.get("value") and sources:
                    raise Invalid(
                        f'{where}: Invalid value: "": may not be specified when `value` is not empty'
                    )
                if len(sources) > 1:
                    raise Invalid(
                        f'{where}: Invalid value: "": may not have more than one field specified at a time'
                    )


def client_side_apply(fake: FakeKube, collection: str, manifest: dict) -> dict:
    """``kubectl apply -f`` (client-side) of one object: creates it with the
    ``last-applied-configuration`` annotation, or sends the three-way patch computed against that
    annotation and records the new configuration in it.

    Args:
        fake: The server.
        collection: The object's collection path.
        manifest: The object as the manifest has it.

    Returns:
        The stored object.

    Raises:
        Invalid: The API server refuses the result.
    """
    strategic = _builtin(collection)
    name = manifest["metadata"]["name"]
    modified = copy.deepcopy(manifest)
    modified["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(manifest, sort_keys=True)
    with fake.lock:
        current = fake.objects.get((collection, name))
        if current is None:
            validate(modified)
            return fake._store(collection, name, modified, new=True)
        original = json.loads(((current["metadata"].get("annotations") or {}).get(LAST_APPLIED)) or "{}")
        patch = three_way_patch(original, modified, current, strategic)
        merged = merge_patch(current, patch, strategic)
        validate(merged)
        return fake._store(collection, name, merged, new=False)


class FakeKube:
    """The object store and HTTP server. Use as a context manager.

    Attributes:
        objects: ``{(collection path, name): object}``.
        log: ``[(method, collection path, name)]`` of every request, in order.
        queries: The query string of every request, in order.
        controller: Called after each create/replace/patch with ``(self, collection, object)``.
    """

    def __init__(self, controller: Controller | None = None):
        self.objects: dict[tuple[str, str], dict] = {}
        self.log: list[tuple[str, str, str]] = []
        self.queries: list[str] = []  # the query string of every request, in order (fieldManager=...)
        self.controller = controller
        self.lock = threading.RLock()
        self._version = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: str | Path) -> Path:
        """Writes a kubeconfig for this server (no credentials) and returns its path."""
        path = Path(path)
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        return path

    def put(self, collection: str, body: dict) -> dict:
        """Stores an object directly (test setup), as a create would."""
        with self.lock:
            return self._store(collection, body["metadata"]["name"], body, new=True)

    def get(self, collection: str, name: str) -> dict | None:
        """Returns a copy of a stored object, or None."""
        with self.lock:
            found = self.objects.get((collection, name))
            return copy.deepcopy(found)

    def set_status(self, collection: str, name: str, status: dict) -> None:
        """Replaces an object's status (what an operator does, through the status subresource): like every
        write, it moves ``resourceVersion``, so a client's copy read before it is stale."""
        with self.lock:
            self._version += 1
            obj = self.objects[(collection, name)]
            obj["status"] = copy.deepcopy(status)
            obj["metadata"]["resourceVersion"] = str(self._version)

    def _store(self, collection: str, name: str, body: dict, new: bool) -> dict:
        self._version += 1
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        previous = self.objects.get((collection, name))
        meta["name"], meta["resourceVersion"] = name, str(self._version)
        meta.setdefault("uid", f"uid-{self._version}")
        spec_changed = previous is None or previous.get("spec") != obj.get("spec")
        old_generation = (previous or {}).get("metadata", {}).get("generation", 0)
        meta["generation"] = old_generation + 1 if spec_changed else old_generation
        if not new and previous is not None and "status" in previous and "status" not in body:
            obj["status"] = previous["status"]
        self.objects[(collection, name)] = obj
        if self.controller is not None:
            self.controller(self, collection, self.objects[(collection, name)])
        return copy.deepcopy(self.objects[(collection, name)])

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the test output is enough
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, reason: str, message: str) -> None:
                self._reply(status, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                     "reason": reason, "message": message, "code": status})  # fmt: skip

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _write(self, status: int, collection: str, name: str, body: dict, new: bool) -> None:
                try:
                    validate(body)
                except Invalid as error:
                    return self._error(422, "Invalid", f"{name} is invalid: {error}")
                return self._reply(status, fake._store(collection, name, body, new=new))

            def _route(self, method: str) -> None:
                match = _OBJECT_PATH.match(self.path.split("?")[0])
                if not match:
                    return self._error(404, "NotFound", f"no route {self.path}")
                collection, name = match.group("collection"), match.group("name")
                with fake.lock:
                    fake.log.append((method, collection, name or ""))
                    fake.queries.append(self.path.partition("?")[2])
                    key = (collection, name or "")
                    if method == "POST":
                        body = self._body()
                        name = body["metadata"]["name"]
                        if (collection, name) in fake.objects:
                            return self._error(409, "AlreadyExists", f"{name} already exists")
                        return self._write(201, collection, name, body, new=True)
                    if method == "GET" and not name:
                        items = [
                            copy.deepcopy(o) for (c, _), o in sorted(fake.objects.items()) if c == collection
                        ]
                        return self._reply(200, {"items": items, "metadata": {}})
                    if key not in fake.objects:
                        return self._error(404, "NotFound", f"{name} not found")
                    if method == "GET":
                        return self._reply(200, copy.deepcopy(fake.objects[key]))
                    if method == "PUT":
                        body = self._body()
                        sent = (body.get("metadata") or {}).get("resourceVersion")
                        if sent and sent != fake.objects[key]["metadata"]["resourceVersion"]:
                            # Optimistic concurrency: an update must carry the version it was made from.
                            return self._error(409, "Conflict", CONFLICT.format(name=name))
                        return self._write(200, collection, name, body, new=False)
                    if method == "PATCH":
                        strategic = "strategic-merge-patch" in (self.headers.get("Content-Type") or "")
                        if strategic and not _builtin(collection):
                            # The API server has no patch strategy for a custom resource's fields.
                            return self._error(415, "UnsupportedMediaType", STRATEGIC_ON_CRD)
                        patched = merge_patch(fake.objects[key], self._body(), strategic)
                        return self._write(200, collection, name, patched, new=False)
                    if method == "DELETE":
                        removed = fake.objects.pop(key)
                        return self._reply(200, removed)
                return self._error(405, "MethodNotAllowed", method)

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def do_PATCH(self):
                self._route("PATCH")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler


PYTORCHJOBS = "/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"
INFERENCESERVICES = "/apis/serving.kserve.io/v1beta1/namespaces/{namespace}/inferenceservices"
DEPLOYMENTS = "/apis/apps/v1/namespaces/{namespace}/deployments"


def condition_status(kind: str, message: str = "") -> dict:
    """A status with one True condition of ``kind`` (``Running``, ``Succeeded``, ``Failed``)."""
    return {"conditions": [{"type": kind, "status": "True", "message": message or kind.lower()}]}


# KServe in RawDeployment mode (kserve/kserve's PropagateRawStatus): the InferenceService is served by a
# plain Deployment named `<name>-predictor`, whose pod template carries the storageUri; its status only
# mirrors the Deployment's Available condition and reports no revisions.
KSERVE_SOURCE_URI = "serving.kserve.io/storage-initializer-sourceuri"


def raw_predictor_deployment(name: str, namespace: str, uri: str | None, replicas: int = 2) -> dict:
    """The predictor Deployment KServe creates for a RawDeployment InferenceService, fully rolled (no
    storage initializer, hence no source URI, while the InferenceService names no storageUri)."""
    labels = {"app": f"isvc.{name}-predictor"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{name}-predictor", "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels, "annotations": {KSERVE_SOURCE_URI: uri} if uri else {}},
                              "spec": {"containers": [{"name": "kserve-container", "image": "metarec-serving"}]}}},
        "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                   "availableReplicas": replicas},
    }  # fmt: skip


def kserve_defaults(obj: dict) -> None:
    """KServe's defaulting webhook (create and update) for a ``pytorch:`` predictor: it becomes
    ``model: {modelFormat: {name: pytorch}, <the pytorch block>}``, replacing any ``model:`` there was, and
    ``pytorch:`` is dropped (``assignPyTorchRuntime`` in kserve/kserve
    pkg/apis/serving/v1beta1/inference_service_defaults.go). So the live object never has ``pytorch:``, and
    writing one (an apply of a ``pytorch:`` manifest, a merge patch naming ``pytorch``) replaces the live
    ``model:`` whole, storageUri included."""
    predictor = (obj.get("spec") or {}).get("predictor") or {}
    if isinstance(predictor.get("pytorch"), dict):
        predictor["model"] = {"modelFormat": {"name": "pytorch"}, **predictor.pop("pytorch")}


def kserve_raw_controller(fake: FakeKube, collection: str, obj: dict) -> None:
    """A fake KServe in RawDeployment mode (its defaulting webhook included) whose predictor rolls to a new
    storageUri at once."""
    if not collection.endswith("/inferenceservices"):
        return
    kserve_defaults(obj)
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    obj["status"] = {"observedGeneration": 1, "components": {"predictor": {}},
                     "conditions": [{"type": kind, "status": "True"} for kind in ("PredictorReady", "Ready")]}  # fmt: skip
    key = (DEPLOYMENTS.format(namespace=namespace), f"{name}-predictor")
    uri = obj["spec"]["predictor"]["model"].get("storageUri")  # none until a version is deployed
    deployment = fake.objects.get(key)
    if deployment is None:
        fake.objects[key] = raw_predictor_deployment(name, namespace, uri)
    elif deployment["spec"]["template"]["metadata"]["annotations"].get(KSERVE_SOURCE_URI) != uri:
        deployment["spec"]["template"]["metadata"]["annotations"][KSERVE_SOURCE_URI] = uri
        deployment["metadata"]["generation"] = deployment["metadata"].get("generation", 1) + 1
        replicas = deployment["spec"]["replicas"]
        deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                                "updatedReplicas": replicas, "availableReplicas": replicas}  # fmt: skip
