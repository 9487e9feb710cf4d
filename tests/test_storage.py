"""metarec.storage against a real GCS emulator (127.0.0.1, free port) and local folders."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import gcs_emulator as emulator_support
import pytest

from metarec import storage
from metarec.storage import ChecksumMismatchError, StorageError
from metarec.storage.gcs import _cached_client, _read_retry, _write_retry
from metarec.storage.gcs_transfers import _gcs_copy
from metarec.storage.objects import _delete
from metarec.storage.promotion import _refuse_overlapping_prefixes

# Fixtures from tests/gcs_emulator.py (a real emulator on 127.0.0.1), bound here so pytest finds them.
gcs_emulator = emulator_support.gcs_emulator
gcs_bucket = emulator_support.gcs_bucket


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


ARCHIVE = {
    "config/config.properties": b"inference_address=http://0.0.0.0:8080\n",
    "model-store/metarec.mar": bytes(range(256)) * 4000,  # ~1 MB: exercises chunked checksums
}


# ------------------------------------------------------------------------------- pure helpers


def test_is_gcs_and_split():
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/gs://x") and not storage.is_gcs(Path("a"))
    assert storage.split_gcs_uri("gs://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.split_gcs_uri("gs://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="without a bucket"):
        storage.split_gcs_uri("gs:///x")


def test_crc32c_matches_known_vector(tmp_path):
    # RFC 3720 check value: crc32c("123456789") = 0xE3069283.
    assert storage.crc32c_base64(b"123456789") == "4waSgw=="
    (tmp_path / "f").write_bytes(b"123456789")
    assert storage.file_crc32c_base64(tmp_path / "f") == "4waSgw=="


def test_verify_crc32c_rejects_mismatch_and_missing():
    storage.verify_crc32c("4waSgw==", "4waSgw==", "gs://b/o", "download")
    with pytest.raises(ChecksumMismatchError, match="crc32c mismatch on download of gs://b/o"):
        storage.verify_crc32c("4waSgw==", "AAAAAA==", "gs://b/o", "download")
    with pytest.raises(ChecksumMismatchError):
        storage.verify_crc32c("4waSgw==", None, "gs://b/o", "upload")


def test_permission_and_auth_errors_are_translated():
    from google.api_core import exceptions as api

    err = storage.translate_error(api.Forbidden("caller does not have storage.objects.get"), "gs://models/x")
    assert isinstance(err, StorageError) and "permission denied on gs://models/x" in str(err)
    assert "Workload Identity" in str(err) and "storage.objects.get" in str(err)
    err = storage.translate_error(api.Unauthorized("expired"), "gs://models/x")
    assert isinstance(err, StorageError) and "not authenticated" in str(err)
    from google.auth.exceptions import RefreshError

    err = storage.translate_error(RefreshError("metadata server said 403"), "gs://models/x")
    assert isinstance(err, StorageError) and "Workload Identity binding" in str(err)
    programming_error = KeyError("x")
    assert storage.translate_error(programming_error, "gs://models/x") is programming_error


def test_missing_credentials_give_a_storage_error(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    _cached_client.cache_clear()
    try:
        with pytest.raises(StorageError, match="no Google credentials found"):
            storage.read_bytes("gs://some-bucket/model.pt")
    finally:
        _cached_client.cache_clear()


def test_writes_are_retried_only_when_conditional():
    from google.cloud.storage.retry import DEFAULT_RETRY

    read, write = _read_retry(), _write_retry()
    assert read is DEFAULT_RETRY and read._multiplier == 2.0  # exponential backoff
    assert write.get_retry_policy_if_conditions_met(query_params={"ifGenerationMatch": 0}) is DEFAULT_RETRY
    assert write.get_retry_policy_if_conditions_met(query_params={}) is None


# ------------------------------------------------------------------------------- local paths


def test_local_round_trips_and_promote(tmp_path):
    storage.write_bytes(tmp_path / "a" / "b.bin", b"xyz")
    assert storage.read_bytes(str(tmp_path / "a" / "b.bin")) == b"xyz"
    assert storage.exists(tmp_path / "a") and not storage.exists(tmp_path / "nope")
    staging = _tree(tmp_path / "staging", ARCHIVE)
    final = tmp_path / "final"
    _tree(final, {"stale.txt": b"old version"})
    manifest = storage.promote(staging, final)
    assert set(manifest["files"]) == set(ARCHIVE)
    assert storage.is_complete(final)
    assert not (final / "stale.txt").exists()
    assert (final / "model-store/metarec.mar").read_bytes() == ARCHIVE["model-store/metarec.mar"]
    with storage.local_copy(str(final)) as path:
        assert path == final
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(tmp_path / "missing.bin")
    with pytest.raises(StorageError, match="nothing to promote"):
        storage.promote(tmp_path / "empty", final)


# ------------------------------------------------------------------------------- emulator


def test_bytes_round_trip_and_overwrite(gcs_bucket):
    uri = f"gs://{gcs_bucket}/runs/1/model.json"
    storage.write_bytes(uri, b'{"a": 1}')
    assert storage.read_bytes(uri) == b'{"a": 1}'
    storage.write_bytes(uri, b"second")  # overwrite goes through the generation precondition
    assert storage.read_bytes(uri) == b"second"
    assert storage.exists(uri) and storage.exists(f"gs://{gcs_bucket}/runs")
    assert not storage.exists(f"gs://{gcs_bucket}/run")  # a prefix is a folder, not a string prefix
    blob = storage.get_client().bucket(gcs_bucket).get_blob("runs/1/model.json")
    assert blob.crc32c == storage.crc32c_base64(b"second")


def test_file_round_trip_and_local_copy(gcs_bucket, tmp_path):
    source = _tree(tmp_path, {"model.pt": ARCHIVE["model-store/metarec.mar"]}) / "model.pt"
    uri = f"gs://{gcs_bucket}/m/model.pt"
    storage.upload(source, uri)
    target = storage.download(uri, tmp_path / "back" / "model.pt")
    assert target.read_bytes() == source.read_bytes()
    assert not list(target.parent.glob("*.part"))
    with storage.local_copy(uri) as path:
        assert path.name == "model.pt" and path.read_bytes() == source.read_bytes()
        temporary = path
    assert not temporary.exists()


def test_prefix_upload_list_download(gcs_bucket, tmp_path):
    local = _tree(tmp_path / "archive", ARCHIVE)
    prefix = f"gs://{gcs_bucket}/staging/run-7"
    written = storage.upload_dir(local, prefix)
    assert written == [f"{prefix}/{rel}" for rel in sorted(ARCHIVE)]
    assert storage.list_uris(prefix) == written
    assert storage.list_uris(prefix + "/") == written
    assert storage.list_uris(f"gs://{gcs_bucket}/nothing-here") == []
    files = storage.download_dir(prefix, tmp_path / "copy")
    assert {p.relative_to(tmp_path / "copy").as_posix(): p.read_bytes() for p in files} == ARCHIVE
    with storage.local_copy(prefix) as folder:
        assert (folder / "config/config.properties").read_bytes() == ARCHIVE["config/config.properties"]
    with pytest.raises(StorageError, match="has no _METAREC_MANIFEST.json"):
        storage.download_dir(prefix, tmp_path / "strict", require_complete=True)


def test_promote_writes_manifest_last_and_replaces_old_version(gcs_bucket, tmp_path):
    staging = f"gs://{gcs_bucket}/staging/run-8"
    final = f"gs://{gcs_bucket}/models/metarec"
    storage.upload_dir(_tree(tmp_path / "v1", {"model-store/old.mar": b"v1"}), final)
    storage.upload_dir(_tree(tmp_path / "v2", ARCHIVE), staging)
    assert not storage.is_complete(final)

    manifest = storage.promote(staging, final)

    assert storage.list_uris(final) == sorted(
        [f"{final}/{rel}" for rel in ARCHIVE] + [f"{final}/{storage.MANIFEST_NAME}"]
    )
    assert manifest["files"]["model-store/metarec.mar"]["size"] == len(ARCHIVE["model-store/metarec.mar"])
    assert storage.read_manifest(final) == manifest and storage.is_complete(final)
    bucket = storage.get_client().bucket(gcs_bucket)
    updated = {b.name: b.updated for b in bucket.list_blobs(prefix="models/metarec/")}
    assert updated[f"models/metarec/{storage.MANIFEST_NAME}"] >= max(updated.values())
    files = storage.download_dir(final, tmp_path / "serve", require_complete=True)
    assert {p.relative_to(tmp_path / "serve").as_posix() for p in files} == set(ARCHIVE) | {
        storage.MANIFEST_NAME
    }
    assert storage.list_uris(staging)  # staging is left for the caller to delete

    bucket.blob("models/metarec/model-store/metarec.mar").upload_from_string(b"tampered")
    assert not storage.is_complete(final)
    with pytest.raises(ChecksumMismatchError):
        storage.download_dir(final, tmp_path / "serve2", require_complete=True)


def test_missing_bucket_and_object_are_named(gcs_emulator, gcs_bucket, tmp_path):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.read_bytes("gs://no-such-bucket-x/a.txt")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.write_bytes("gs://no-such-bucket-x/a.txt", b"x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.list_uris("gs://no-such-bucket-x/prefix")
    with pytest.raises(StorageError, match=f"object gs://{gcs_bucket}/absent.bin does not exist"):
        storage.download(f"gs://{gcs_bucket}/absent.bin", tmp_path / "absent.bin")
    assert not (tmp_path / "absent.bin").exists()
    with pytest.raises(StorageError, match="does not exist"):
        with storage.local_copy(f"gs://{gcs_bucket}/absent"):
            pass


def test_corrupted_checksum_metadata_is_rejected(gcs_emulator, gcs_bucket, tmp_path):
    uri = f"gs://{gcs_bucket}/m/model.pt"
    storage.write_bytes(uri, b"genuine model bytes")
    # Behind the client's back: rewrite the crc32c GCS holds for the object with a raw JSON API call.
    url = f"{gcs_emulator.url}/storage/v1/b/{gcs_bucket}/o/{urllib.parse.quote('m/model.pt', safe='')}"
    body = json.dumps({"crc32c": storage.crc32c_base64(b"other bytes")}).encode()
    request = urllib.request.Request(
        url, data=body, method="PATCH", headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=10).close()
    with pytest.raises(ChecksumMismatchError, match="crc32c mismatch on download"):
        storage.read_bytes(uri)
    with pytest.raises(ChecksumMismatchError):
        storage.download(uri, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists() and not list(tmp_path.glob("*.part"))


def test_corrupted_content_is_rejected(tmp_path):
    """A disk-backed emulator whose stored bytes are flipped after the upload."""
    server = emulator_support.start_emulator(data_dir=tmp_path / "gcs")
    previous = emulator_support.use_emulator(server.url)
    try:
        storage.get_client().create_bucket("corrupt")
        uri = "gs://corrupt/model-store/metarec.mar"
        storage.write_bytes(uri, b"A" * 4096)
        assert storage.read_bytes(uri) == b"A" * 4096
        stored = server.object_path("corrupt", "model-store/metarec.mar")
        stored.write_bytes(b"A" * 2048 + b"B" + b"A" * 2047)  # one flipped byte, same length
        with pytest.raises(ChecksumMismatchError, match="crc32c mismatch on download of gs://corrupt/"):
            storage.read_bytes(uri)
        with pytest.raises(ChecksumMismatchError):
            storage.download(uri, tmp_path / "out" / "metarec.mar")
        assert not (tmp_path / "out" / "metarec.mar").exists()
    finally:
        emulator_support.use_emulator(previous)
        emulator_support.stop_emulator(server)


def test_cli_download_dir_requires_complete_prefix(gcs_emulator, gcs_bucket, tmp_path):
    final = f"gs://{gcs_bucket}/models/metarec"
    storage.upload_dir(_tree(tmp_path / "a", ARCHIVE), f"gs://{gcs_bucket}/staging/1")
    env_cmd = [sys.executable, "-m", "metarec.storage"]
    incomplete = subprocess.run(
        [*env_cmd, "download-dir", f"gs://{gcs_bucket}/staging/1", str(tmp_path / "x"), "--require-complete"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert incomplete.returncode == 1 and "has no _METAREC_MANIFEST.json" in incomplete.stderr
    promoted = subprocess.run(
        [*env_cmd, "promote", f"gs://{gcs_bucket}/staging/1", final],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert promoted.returncode == 0, promoted.stderr
    fetched = subprocess.run(
        [*env_cmd, "download-dir", final, str(tmp_path / "store"), "--require-complete"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout.strip().splitlines()[-1])["downloaded"] == len(ARCHIVE) + 1
    assert (tmp_path / "store/model-store/metarec.mar").read_bytes() == ARCHIVE["model-store/metarec.mar"]
    missing = subprocess.run([*env_cmd, "exists", f"gs://{gcs_bucket}/nope"], capture_output=True, timeout=60)
    assert missing.returncode == 1


class _FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of the emulator that answers 503 to the first ``failures``
    requests whose path contains ``match``, and forwards everything else."""

    def __init__(self, upstream: str, match: str, failures: int):
        import http.client
        import http.server
        import threading

        proxy = self
        self.match, self.failures, self.failed, self.forwarded = match, failures, 0, []
        upstream_host = urllib.parse.urlsplit(upstream).netloc

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.match in self.path and proxy.failed < proxy.failures:
                    proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.forwarded.append((self.command, self.path))
                connection = http.client.HTTPConnection(upstream_host, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("operation", "match"),
    # Reads: the metadata request (the emulator's mediaLink makes the download itself bypass the proxy).
    [("read", "/storage/v1/b/{bucket}/o/flaky"), ("write", "/upload/storage/v1/b/{bucket}/o")],
)
def test_transient_errors_are_retried_with_backoff(gcs_emulator, gcs_bucket, operation, match):
    match = match.format(bucket=gcs_bucket)
    uri = f"gs://{gcs_bucket}/flaky/object.bin"
    storage.write_bytes(uri, b"before")
    proxy = _FlakyProxy(gcs_emulator.url, match=match, failures=2)
    previous = emulator_support.use_emulator(proxy.url)
    try:
        if operation == "read":
            assert storage.read_bytes(uri) == b"before"
        else:
            storage.write_bytes(uri, b"after")
    finally:
        emulator_support.use_emulator(previous)
        proxy.close()
    assert proxy.failed == 2, "the 503s were not sent"
    assert any(match in path for _, path in proxy.forwarded), "the request was not retried after the 503s"
    assert storage.read_bytes(uri) == (b"before" if operation == "read" else b"after")


# ----------------------------------------------------------------------------------------------
# The one join and the one "write locally, then upload" helper


def test_join_handles_slashes_for_uris_and_paths():
    assert storage.join("gs://b/p/", "a", "/b/", "c.pt") == "gs://b/p/a/b/c.pt"
    assert storage.join("/tmp/x", "y") == "/tmp/x/y"


def test_local_output_writes_in_place_for_a_folder(tmp_path):
    with storage.local_output(tmp_path / "out") as folder:
        (folder / "a.txt").write_text("a")
    assert folder == tmp_path / "out" and (tmp_path / "out" / "a.txt").read_text() == "a"


def test_local_output_uploads_on_success_only(gcs_bucket):
    target = f"gs://{gcs_bucket}/outputs/run-1"
    with storage.local_output(target) as folder:
        (folder / "nested").mkdir()
        (folder / "nested" / "x.bin").write_bytes(b"x")
    assert storage.read_bytes(f"{target}/nested/x.bin") == b"x"
    with (
        pytest.raises(RuntimeError, match="step failed"),
        storage.local_output(f"gs://{gcs_bucket}/broken") as folder,
    ):
        (folder / "half.bin").write_bytes(b"h")
        raise RuntimeError("step failed")
    assert not storage.exists(f"gs://{gcs_bucket}/broken")


def test_local_output_can_promote_with_a_manifest(gcs_bucket):
    target = f"gs://{gcs_bucket}/models/v1"
    with storage.local_output(target, promote_last=True) as folder:
        (folder / "model.mar").write_bytes(b"m")
    assert storage.is_complete(target)


# ----------------------------------------------------------------------------------------------
# Lost responses: the server acted, the client never heard, and its retry meets the new state


class _LostResponses:
    """Fault injection at the HTTP layer of the client library (``requests.Session.request``, restored by
    ``monkeypatch``). Each rule is ``(method, url_part, action)``; the first request matching a rule's method
    and URL substring consumes it. Actions: ``"drop"`` forwards the request to the emulator (the server acts)
    and then raises a connection reset, as if the response were lost; an ``int`` answers that HTTP status
    without forwarding (what real GCS would answer where the emulator does not). Unmatched requests pass.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *rules: tuple[str, str, str | int]):
        import requests

        self.rules, self.fired = list(rules), []
        original = requests.Session.request

        def request(session, method, url, *args, **kwargs):
            for index, (rule_method, url_part, action) in enumerate(self.rules):
                if method.upper() == rule_method and url_part in url:
                    del self.rules[index]
                    self.fired.append((method.upper(), url_part, action))
                    if action == "drop":
                        original(session, method, url, *args, **kwargs)
                        raise requests.exceptions.ConnectionError("connection reset by peer (injected)")
                    return self._answer(method, url, action)
            return original(session, method, url, *args, **kwargs)

        monkeypatch.setattr(requests.Session, "request", request)

    @staticmethod
    def _answer(method: str, url: str, status: int) -> Any:
        import requests

        response = requests.Response()
        response.status_code, response.url = status, url
        response.request = requests.Request(method, url).prepare()
        response.headers["Content-Type"] = "application/json"
        reason = {404: "notFound", 412: "conditionNotMet"}.get(status, "injected")
        response._content = json.dumps(
            {"error": {"code": status, "message": f"injected {status}", "errors": [{"reason": reason}]}}
        ).encode()
        return response


def _promoted(bucket: str, tmp_path: Path, prefix: str, files: dict[str, bytes]) -> str:
    """Uploads ``files`` to a staging prefix and promotes it to ``gs://bucket/prefix``."""
    staging = f"gs://{bucket}/staging/{uuid.uuid4().hex[:8]}"
    storage.upload_dir(_tree(tmp_path / uuid.uuid4().hex[:8], files), staging)
    storage.promote(staging, f"gs://{bucket}/{prefix}")
    return f"gs://{bucket}/{prefix}"


def test_delete_whose_response_was_lost_counts_as_done(gcs_bucket, monkeypatch):
    """GCS deleted the object, the response was lost, the retry of the pinned-generation delete gets 404
    (the emulator answers that 404 itself, as GCS does): the object is gone, which is what was asked."""
    uri = f"gs://{gcs_bucket}/d/a.txt"
    storage.write_bytes(uri, b"x")
    faults = _LostResponses(monkeypatch, ("DELETE", "/o/d%2Fa.txt", "drop"))
    _delete(uri)
    assert faults.fired and not storage.exists(uri)


def test_promote_over_a_live_prefix_survives_lost_delete_responses(gcs_bucket, tmp_path, monkeypatch):
    """The deletes of the old manifest and of a file the new version lacks both land with their responses
    lost: promote still finishes, so serving does not refuse the prefix until someone promotes again."""
    final = _promoted(gcs_bucket, tmp_path, "models/metarec", {"model-store/old.mar": b"v1"})
    staging = f"gs://{gcs_bucket}/staging/v2"
    storage.upload_dir(_tree(tmp_path / "v2", ARCHIVE), staging)
    faults = _LostResponses(
        monkeypatch,
        ("DELETE", f"/o/models%2Fmetarec%2F{storage.MANIFEST_NAME}", "drop"),
        ("DELETE", "/o/models%2Fmetarec%2Fmodel-store%2Fold.mar", "drop"),
    )
    storage.promote(staging, final)
    assert len(faults.fired) == 2
    assert storage.is_complete(final) and set(storage.read_manifest(final)["files"]) == set(ARCHIVE)
    assert not storage.exists(f"{final}/model-store/old.mar")


def test_promote_survives_a_lost_rewrite_response(gcs_bucket, tmp_path, monkeypatch):
    """A bucket-to-bucket copy (rewrite) lands and its response is lost; GCS answers the retry, which
    carries ifGenerationMatch=0, with 412 because the object now exists. That 412 is synthesised here: the
    emulator ignores generation preconditions and would accept the retry. The copy checks that the object
    which landed has the source's crc32c and accepts it."""
    staging = f"gs://{gcs_bucket}/staging/run-3"
    final = f"gs://{gcs_bucket}/models/metarec"
    storage.upload_dir(_tree(tmp_path / "v", ARCHIVE), staging)
    faults = _LostResponses(monkeypatch, ("POST", "rewriteTo", "drop"), ("POST", "rewriteTo", 412))
    storage.promote(staging, final)
    assert [action for _, _, action in faults.fired] == ["drop", 412]
    assert storage.is_complete(final)
    files = storage.download_dir(final, tmp_path / "serve", require_complete=True)
    assert {p.relative_to(tmp_path / "serve").as_posix(): p.read_bytes() for p in files} == ARCHIVE | {
        storage.MANIFEST_NAME: (tmp_path / "serve" / storage.MANIFEST_NAME).read_bytes()
    }


def test_copy_refuses_a_destination_another_writer_changed(gcs_bucket, monkeypatch):
    """A 412 on a copy (synthesised: the emulator ignores preconditions) where the destination holds other
    bytes than the source means another writer got in between: not overwritten, not accepted."""
    source, destination = f"gs://{gcs_bucket}/s/a.bin", f"gs://{gcs_bucket}/t/a.bin"
    storage.write_bytes(source, b"ours")
    storage.write_bytes(destination, b"theirs")
    _LostResponses(monkeypatch, ("POST", "rewriteTo", 412))
    with pytest.raises(StorageError, match="modified by another writer"):
        _gcs_copy(source, destination)
    assert storage.read_bytes(destination) == b"theirs"


def test_promote_refuses_nested_prefixes_on_gcs(gcs_bucket, tmp_path):
    final = _promoted(gcs_bucket, tmp_path, "models/metarec", ARCHIVE)
    inside = f"{final}/staging-2"
    storage.upload_dir(_tree(tmp_path / "v2", {"model-store/new.mar": b"v2"}), inside)
    with pytest.raises(StorageError, match="inside"):
        storage.promote(inside, final)  # would delete the live version and the staging prefix itself
    with pytest.raises(StorageError, match="inside"):
        storage.promote(f"gs://{gcs_bucket}/models", f"gs://{gcs_bucket}/models/metarec/v2")
    with pytest.raises(StorageError, match="inside"):
        storage.promote(f"gs://{gcs_bucket}/", f"gs://{gcs_bucket}/models/other")
    for root in (f"gs://{gcs_bucket}", f"gs://{gcs_bucket}/"):
        with pytest.raises(StorageError, match="bucket root"):
            storage.promote(f"gs://{gcs_bucket}/staging/x", root)
    assert storage.is_complete(final) and storage.list_uris(inside)
    # run-1, run-10 and run-1.staging-ab are siblings, not nested: promoting between them works.
    base = f"gs://{gcs_bucket}/runs"
    for version in ("run-1", "run-10", "run-1.staging-ab"):
        storage.write_bytes(f"{base}/{version}/model-store/m.mar", version.encode())
    storage.promote(f"{base}/run-10", f"{base}/run-1")
    storage.promote(f"{base}/run-1.staging-ab", f"{base}/run-1")
    assert storage.read_bytes(f"{base}/run-1/model-store/m.mar") == b"run-1.staging-ab"
    assert storage.list_uris(f"{base}/run-10") and storage.list_uris(f"{base}/run-1.staging-ab")


def test_promote_refuses_nested_local_folders(tmp_path, monkeypatch):
    final = tmp_path / "final"
    storage.promote(_tree(tmp_path / "v1", {"a.bin": b"v1"}), final)
    inside = _tree(final / "staging-2", {"a.bin": b"v2"})
    with pytest.raises(StorageError, match="inside"):
        storage.promote(inside, final)
    with pytest.raises(StorageError, match="inside"):
        storage.promote(tmp_path / "v1", tmp_path / "v1" / "sub")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="inside"):
        storage.promote("final/staging-2", str(final))  # relative and absolute spellings of one tree
    with pytest.raises(StorageError, match="inside"):
        storage.promote(inside, "final/../final")
    assert storage.is_complete(final) and (inside / "a.bin").read_bytes() == b"v2"
    for root in ("/", ""):  # checked directly: a regression must not get to delete files under /
        with pytest.raises(StorageError, match="filesystem root"):
            _refuse_overlapping_prefixes(str(inside), root)
    sibling = _tree(tmp_path / "final0", {"a.bin": b"sibling"})
    storage.promote(sibling, final)  # final0 is a sibling of final, not inside it
    assert (final / "a.bin").read_bytes() == b"sibling"


def test_cli_download_dir_refuses_an_empty_source(tmp_path, monkeypatch, capsys):
    # The serving Deployment's MODEL_URI is empty until a version is deployed; "" must not name the
    # working folder (which download_dir would copy) nor give a misleading "no manifest" message.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray.txt").write_text("not a model")
    assert storage.main(["download-dir", "", str(tmp_path / "out")]) == 1
    assert "empty MODEL_URI" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri", ["s3://bucket/data", "gcs://bucket/data", "file:///tmp/data"])
def test_a_location_of_another_scheme_is_refused_not_read_as_a_local_folder(uri, tmp_path, monkeypatch):
    """s3://b/x used to be read and written as the relative folder 's3:/b/x' (and lost with the pod)."""
    source, cwd = tmp_path / "model", tmp_path / "cwd"
    source.mkdir()
    (source / "model.pt").write_bytes(b"weights")
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(storage.StorageError, match="only gs:// URIs and local paths"):
        storage.upload_dir(source, uri)
    with pytest.raises(storage.StorageError, match="only gs:// URIs and local paths"):
        storage.fingerprint(uri)
    assert not any(cwd.iterdir())
