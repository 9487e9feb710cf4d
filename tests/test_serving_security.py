"""A real TorchServe's management surface and `metarec serve`'s start-up checks (issue 13).

The servers here run a tiny handler written by the test (the surface does not depend on the model):
one with token authorisation on, one with it off. A local HTTP server offers a workflow archive and
records every request, so "refused" means TorchServe never even downloaded it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from metarec.packaging import checksum_path, run_archiver
from metarec.serve_local import (
    ArchiveError,
    check_archive,
    management_request,
    model_workers,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.slow

HANDLER = """from ts.torch_handler.base_handler import BaseHandler


class TinyHandler(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        return ["{}" for _ in data]
"""
BROKEN_HANDLER = "import metarec_no_such_module_xyz\n" + HANDLER


def _archive(folder: Path, handler_text: str, name: str = "tiny") -> Path:
    handler = folder / "handler_src" / "tiny_handler.py"
    handler.parent.mkdir(parents=True, exist_ok=True)
    handler.write_text(handler_text)
    mar = run_archiver(name, "1.0", handler, folder / "model-store")
    checksum_path(folder, name).parent.mkdir(parents=True, exist_ok=True)
    checksum_path(folder, name).write_text(f"{hashlib.sha256(mar.read_bytes()).hexdigest()}  {mar.name}\n")
    return folder


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        _Recorder.seen.append(self.path)
        body = b"PK\x05\x06" + b"\0" * 18  # an empty zip
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def war_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/wf.war"
    server.shutdown()


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory):
    return _archive(tmp_path_factory.mktemp("tiny"), HANDLER)


@pytest.fixture(scope="module", params=[True, False], ids=["tokens-on", "tokens-off"])
def server(request, tiny_archive, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ts")
    info = start_server(
        tiny_archive, workdir, 0, 0, model_name="tiny", token_auth=request.param, timeout_s=120
    )
    yield info
    stop_server(workdir)


def _register_workflow(info, url, token="default"):
    status, body = management_request(info, "POST", f"/workflows?url={url}", token=token)
    return status, json.loads(body)


def test_remote_workflow_registration_is_refused_with_and_without_a_token(server, war_url):
    tokens = ["default", None] if server.management_token else [None]
    for token in tokens:
        status, document = _register_workflow(server, war_url, token)
        assert status in (400, 404), document
        if server.management_token and token is None:
            assert document["type"] == "InvalidKeyException"
        else:
            assert "does not match any allowed URL" in document["message"]
        # A local name is looked up in the (absent) workflow store only, never the model store.
        status, document = _register_workflow(server, "tiny.mar", token)
        assert status in (400, 404) and document["type"] in (
            "WorkflowNotFoundException",
            "InvalidKeyException",
        )
    assert _Recorder.seen == []  # nothing was downloaded
    assert not (Path(server.workdir) / "tmp" / "no-workflows").exists()


def test_remote_model_registration_is_refused(server, war_url):
    status, body = management_request(server, "POST", f"/models?url={war_url.replace('wf.war', 'm.mar')}")
    assert status == 405, body
    assert _Recorder.seen == []


def test_scaling_is_refused_without_a_token(server):
    before = {(w["id"], w["pid"]) for w in model_workers(server)}
    # The management API is on no TCP port; the inference port does not serve it.
    request = urllib.request.Request(
        f"{server.inference_url}/models/tiny?min_worker=0&max_worker=0",
        method="PUT",
        headers=server.inference_headers(),
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 404
    if server.management_token:
        status, body = management_request(server, "PUT", "/models/tiny?min_worker=0&max_worker=0", token=None)
        assert status == 400 and json.loads(body)["type"] == "InvalidKeyException"
    else:
        # Tokens off: only this user can reach the socket (its folder is 0700).
        folder = Path(server.management_socket).parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    assert {(w["id"], w["pid"]) for w in model_workers(server)} == before


def _failing_start(archive_dir, tmp_path, **kwargs):
    started = time.monotonic()
    with pytest.raises((RuntimeError, ArchiveError)) as failed:
        start_server(archive_dir, tmp_path / "ts", 0, 0, model_name="tiny", timeout_s=120, **kwargs)
    return str(failed.value), time.monotonic() - started


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "random", "no_manifest", "checksum"])
def test_a_damaged_archive_is_refused_before_start(tiny_archive, tmp_path, damage):
    copy = tmp_path / "archive"
    (copy / "model-store").mkdir(parents=True)
    (copy / "config").mkdir()
    mar = copy / "model-store" / "tiny.mar"
    data = (tiny_archive / "model-store" / "tiny.mar").read_bytes()
    (copy / "config" / "tiny.mar.sha256").write_text((checksum_path(tiny_archive, "tiny")).read_text())
    if damage == "truncated":
        mar.write_bytes(data[:-100])
    elif damage == "zeroed":
        mar.write_bytes(b"\0" * len(data))
    elif damage == "random":
        mar.write_bytes(os.urandom(len(data)))
    else:
        with (
            zipfile.ZipFile(tiny_archive / "model-store" / "tiny.mar") as source,
            zipfile.ZipFile(mar, "w") as target,
        ):
            for name in source.namelist():
                if not (damage == "no_manifest" and name.startswith("MAR-INF/")):
                    target.writestr(
                        name, source.read(name) + (b"\n# changed\n" if name.endswith(".py") else b"")
                    )
    with pytest.raises(ArchiveError, match="tiny.mar"):
        check_archive(copy, "tiny")
    message, _ = _failing_start(copy, tmp_path)
    assert "tiny.mar" in message


def test_a_handler_import_error_is_reported_with_torchserve_s_own_line(tmp_path):
    broken = _archive(tmp_path / "broken", BROKEN_HANDLER)
    message, elapsed = _failing_start(broken, tmp_path)
    assert "metarec_no_such_module_xyz" in message.splitlines()[0], message[:500]
    assert elapsed < 60  # reported as it happens, not after the 120 s time-out


def test_a_port_in_use_is_reported_before_start(tiny_archive, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"{port}.*already in use"):
            start_server(tiny_archive, tmp_path / "ts", port, 0, model_name="tiny", timeout_s=120)
