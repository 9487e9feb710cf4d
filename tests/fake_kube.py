"""A fake Kubernetes API server over HTTP, for the components that drive the cluster.

There is no kube-apiserver on this machine, so the real ``kubernetes`` client talks to this stand-in:
objects are stored per collection path (``/apis/<group>/<version>/namespaces/<ns>/<plural>``) with create
(409 when the name exists), get (404), replace, merge patch, delete and list. ``resourceVersion`` and
``generation`` move on every write. A *controller* callback stands in for the operators (Training
Operator, KServe, the Deployment controller): it is called after every write with the stored object and
may change its status. ``kubeconfig()`` writes a kubeconfig that points the client here.
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


def merge_patch(target: dict, patch: dict) -> dict:
    """Applies a JSON merge patch (RFC 7386): dicts merge, ``None`` deletes, anything else replaces."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


class FakeKube:
    """The object store and HTTP server. Use as a context manager.

    Attributes:
        objects: ``{(collection path, name): object}``.
        log: ``[(method, collection path, name)]`` of every request, in order.
        controller: Called after each create/replace/patch with ``(self, collection, object)``.
    """

    def __init__(self, controller: Controller | None = None):
        self.objects: dict[tuple[str, str], dict] = {}
        self.log: list[tuple[str, str, str]] = []
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
        """Replaces an object's status (what an operator does)."""
        with self.lock:
            self.objects[(collection, name)]["status"] = copy.deepcopy(status)

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

            def _route(self, method: str) -> None:
                match = _OBJECT_PATH.match(self.path.split("?")[0])
                if not match:
                    return self._error(404, "NotFound", f"no route {self.path}")
                collection, name = match.group("collection"), match.group("name")
                with fake.lock:
                    fake.log.append((method, collection, name or ""))
                    key = (collection, name or "")
                    if method == "POST":
                        body = self._body()
                        name = body["metadata"]["name"]
                        if (collection, name) in fake.objects:
                            return self._error(409, "AlreadyExists", f"{name} already exists")
                        return self._reply(201, fake._store(collection, name, body, new=True))
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
                        return self._reply(200, fake._store(collection, name, self._body(), new=False))
                    if method == "PATCH":
                        patched = merge_patch(fake.objects[key], self._body())
                        return self._reply(200, fake._store(collection, name, patched, new=False))
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


def raw_predictor_deployment(name: str, namespace: str, uri: str, replicas: int = 2) -> dict:
    """The predictor Deployment KServe creates for a RawDeployment InferenceService, fully rolled."""
    labels = {"app": f"isvc.{name}-predictor"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{name}-predictor", "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels, "annotations": {KSERVE_SOURCE_URI: uri}},
                              "spec": {"containers": [{"name": "kserve-container", "image": "metarec-serving"}]}}},
        "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                   "availableReplicas": replicas},
    }  # fmt: skip


def kserve_raw_controller(fake: FakeKube, collection: str, obj: dict) -> None:
    """A fake KServe in RawDeployment mode whose predictor rolls to a new storageUri at once."""
    if not collection.endswith("/inferenceservices"):
        return
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    obj["status"] = {"observedGeneration": 1, "components": {"predictor": {}},
                     "conditions": [{"type": kind, "status": "True"} for kind in ("PredictorReady", "Ready")]}  # fmt: skip
    key = (DEPLOYMENTS.format(namespace=namespace), f"{name}-predictor")
    uri = obj["spec"]["predictor"]["pytorch"]["storageUri"]
    deployment = fake.objects.get(key)
    if deployment is None:
        fake.objects[key] = raw_predictor_deployment(name, namespace, uri)
    elif deployment["spec"]["template"]["metadata"]["annotations"][KSERVE_SOURCE_URI] != uri:
        deployment["spec"]["template"]["metadata"]["annotations"][KSERVE_SOURCE_URI] = uri
        deployment["metadata"]["generation"] = deployment["metadata"].get("generation", 1) + 1
        replicas = deployment["spec"]["replicas"]
        deployment["status"] = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                                "updatedReplicas": replicas, "availableReplicas": replicas}  # fmt: skip
