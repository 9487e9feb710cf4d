"""Storage for local paths and ``gs://`` URIs alike.

Every function takes either a local path or a ``gs://bucket/name`` URI, so step functions can be
written once and run on a laptop, in ``kfp.local`` and on GKE.

Guarantees for ``gs://``:

* **Integrity**: every upload sends the crc32c of the local bytes (GCS rejects a mismatching body)
  and compares it with the crc32c GCS reports back; every download compares the crc32c of the
  received bytes with the object's crc32c (metadata and content read at one pinned generation). A
  mismatch raises :class:`ChecksumMismatchError`; a downloaded file only appears at its destination
  once verified.
* **Retries**: transient errors (429, 5xx, connection resets) are retried with exponential backoff
  (``google.cloud.storage.retry.DEFAULT_RETRY``: 1 s doubling to 60 s, 120 s in all). Writes are
  retried only when made conditional on the object's generation, so a retry can never overwrite a
  newer object. A retry that finds its own write already done (the response to the first attempt was
  lost) counts as done: a 412 on an upload or copy when the object now there has the expected crc32c, a
  404 on a delete of the generation it targeted.
* **Errors**: a missing bucket, a missing object and a permission failure raise
  :class:`StorageError` (a ``ValueError``) naming the URI and what to check.
* **Promotion**: :func:`promote` copies a fully written staging prefix to its final name and writes a
  completion manifest (``_METAREC_MANIFEST.json``) last, so a reader (the serving init container,
  :func:`download_dir` with ``require_complete=True``) can tell a complete prefix from one being
  written. It deletes the final prefix's files that staging lacks, so it refuses a bucket root as the
  final prefix and staging/final prefixes that lie one inside the other (stage beside the final prefix).

Credentials follow Google's conventions: ``storage.Client()`` with Application Default Credentials
(Workload Identity on GKE). When ``STORAGE_EMULATOR_HOST`` is set, anonymous credentials and the
project in ``GOOGLE_CLOUD_PROJECT`` (default ``metarec-local``) are used.

``google.cloud.storage`` is imported lazily: KFP components import this module at compile time.

Command line (used by the serving init container)::

    python -m metarec.storage download-dir gs://BUCKET/models/metarec /home/model-server/archive --require-complete
    python -m metarec.storage upload-dir LOCAL_DIR gs://BUCKET/PREFIX
    python -m metarec.storage promote gs://BUCKET/staging/run-1 gs://BUCKET/models/metarec
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GCS_SCHEME = "gs://"
MANIFEST_NAME = "_METAREC_MANIFEST.json"
DEFAULT_EMULATOR_PROJECT = "metarec-local"
_CHUNK_BYTES = 1 << 20


class StorageError(ValueError):
    """A storage operation failed for a reason the caller can act on (missing bucket or object,
    permission denied, missing credentials, corrupted data, incomplete prefix)."""


class ChecksumMismatchError(StorageError):
    """The crc32c of transferred bytes differs from the crc32c GCS holds for the object."""


# ----------------------------------------------------------------------------------------------
# URIs and checksums


def is_gcs(uri: str | os.PathLike) -> bool:
    """Tells whether a location is a Cloud Storage URI.

    Args:
        uri: A local path or a ``gs://`` URI.

    Returns:
        True for ``gs://...``, False otherwise.
    """
    return str(uri).startswith(GCS_SCHEME)


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """Splits ``gs://bucket/name`` into its bucket and object name.

    Args:
        uri: A ``gs://`` URI; the object name may be empty (``gs://bucket`` or ``gs://bucket/``).

    Returns:
        ``(bucket, name)``; ``name`` keeps any trailing slash.

    Raises:
        StorageError: When the URI is not ``gs://`` or has no bucket.
    """
    if not is_gcs(uri):
        raise StorageError(f"not a gs:// URI: {uri!r}")
    bucket, _, name = str(uri)[len(GCS_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"gs:// URI without a bucket: {uri!r}")
    return bucket, name


def join(prefix: str | os.PathLike, *names: str) -> str:
    """Joins a URI or path prefix and ``/``-separated relative names (the one join for both kinds).

    Args:
        prefix: ``gs://bucket/prefix`` or a local folder.
        *names: Relative names, appended in order.

    Returns:
        ``prefix/name1/name2...`` with single slashes between the parts.
    """
    parts = [str(prefix).rstrip("/")] + [str(name).strip("/") for name in names]
    return "/".join(parts)


def crc32c_base64(data: bytes) -> str:
    """Computes the crc32c of bytes in GCS's encoding.

    Args:
        data: The bytes.

    Returns:
        The big-endian crc32c, base64-encoded (as in the ``crc32c`` field of a GCS object).
    """
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


def file_crc32c_base64(path: str | os.PathLike) -> str:
    """Computes the crc32c of a file in GCS's encoding, reading it in chunks.

    Args:
        path: A local file.

    Returns:
        The base64-encoded big-endian crc32c.
    """
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


def verify_crc32c(actual: str, expected: str | None, uri: str, direction: str) -> None:
    """Raises when two crc32c values differ.

    Args:
        actual: crc32c (base64) computed from the bytes this process holds.
        expected: crc32c (base64) GCS holds for the object; None when GCS gave none (composite
            objects always have one, so None is treated as a failure rather than silently passed).
        uri: The object, for the message.
        direction: ``"download"`` or ``"upload"``, for the message.

    Raises:
        ChecksumMismatchError: When ``expected`` is None or differs from ``actual``.
    """
    if expected is None or actual != expected:
        raise ChecksumMismatchError(
            f"crc32c mismatch on {direction} of {uri}: bytes have {actual}, GCS reports {expected}; "
            "the data was corrupted in transit or at rest, nothing was kept"
        )


# ----------------------------------------------------------------------------------------------
# Client, retries and error translation


@functools.lru_cache(maxsize=4)
def _cached_client(emulator_host: str | None, project: str | None) -> Any:
    from google.cloud import storage

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        # The library routes requests to STORAGE_EMULATOR_HOST itself; it only needs a project name
        # and credentials that never try to reach Google.
        return storage.Client(project=project or DEFAULT_EMULATOR_PROJECT, credentials=AnonymousCredentials())
    return storage.Client(project=project)


def get_client() -> Any:
    """Returns a ``google.cloud.storage.Client`` for the current environment.

    ``STORAGE_EMULATOR_HOST`` set: anonymous credentials, project ``GOOGLE_CLOUD_PROJECT`` or
    ``metarec-local``. Otherwise Application Default Credentials (Workload Identity on GKE, ``gcloud
    auth application-default login`` on a workstation). Clients are cached per environment.

    Returns:
        A storage client.

    Raises:
        StorageError: When no Google credentials can be found.
    """
    from google.auth import exceptions as auth_exceptions

    emulator = os.environ.get("STORAGE_EMULATOR_HOST") or None
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    try:
        return _cached_client(emulator, project)
    except auth_exceptions.DefaultCredentialsError as err:
        raise StorageError(
            "no Google credentials found: on GKE bind the pod's Kubernetes ServiceAccount to a Google "
            "service account (Workload Identity); locally run `gcloud auth application-default login`; "
            f"for tests set STORAGE_EMULATOR_HOST ({err})"
        ) from err


def _read_retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY


def _write_retry() -> Any:
    # Retried only when the request carries if_generation_match: an unconditional write could
    # replay over an object someone else wrote in between.
    from google.cloud.storage.retry import DEFAULT_RETRY_IF_GENERATION_SPECIFIED

    return DEFAULT_RETRY_IF_GENERATION_SPECIFIED


def _bucket_exists(bucket_name: str) -> bool | None:
    """Returns whether a bucket exists, or None when that cannot be told (e.g. no permission)."""
    try:
        return bool(get_client().bucket(bucket_name).exists(retry=_read_retry()))
    except Exception:
        return None


def translate_error(err: Exception, uri: str) -> Exception:
    """Turns a Google API error into a :class:`StorageError` with a message that says what to check.

    Args:
        err: The exception raised by the client library.
        uri: The URI the operation was about.

    Returns:
        A :class:`StorageError` (or ``err`` itself when it is not a storage failure the caller can act
        on, e.g. a programming error).
    """
    from google.api_core import exceptions as api

    bucket = split_gcs_uri(uri)[0] if is_gcs(uri) else "?"
    if isinstance(err, StorageError):
        return err
    if isinstance(err, api.NotFound):
        if _bucket_exists(bucket) is False:
            return StorageError(f"GCS bucket {bucket!r} does not exist (while accessing {uri})")
        return StorageError(f"GCS object {uri} does not exist")
    if isinstance(err, api.Forbidden):
        return StorageError(
            f"permission denied on {uri}: the caller's identity lacks access to bucket {bucket!r} "
            "(grant roles/storage.objectViewer to read, roles/storage.objectUser to write, to the Google "
            f"service account bound through Workload Identity). Server said: {err.message}"
        )
    if isinstance(err, api.Unauthorized):
        return StorageError(
            f"not authenticated for {uri}: credentials are missing or expired ({err.message})"
        )
    from google.auth import exceptions as auth_exceptions

    if isinstance(err, auth_exceptions.RefreshError):
        return StorageError(
            f"could not obtain Google credentials for {uri}: on GKE check the Workload Identity binding of the "
            f"pod's ServiceAccount (iam.gke.io/gcp-service-account, roles/iam.workloadIdentityUser) ({err})"
        )
    if type(err).__name__ in {"DataCorruption", "DataCorruptionDynamicParent"}:
        return ChecksumMismatchError(f"checksum mismatch while transferring {uri}: {err}")
    if isinstance(err, api.GoogleAPICallError):
        return StorageError(f"GCS request for {uri} failed: {err}")
    return err


@contextlib.contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Re-raises Google API errors raised inside the block as :class:`StorageError`."""
    try:
        yield
    except Exception as err:
        translated = translate_error(err, uri)
        if translated is err:
            raise
        raise translated from err


def _blob_metadata(uri: str) -> Any:
    """Fetches an object's metadata (generation, size, crc32c).

    Raises:
        StorageError: When the bucket or object does not exist.
    """
    bucket_name, name = split_gcs_uri(uri)
    if not name or name.endswith("/"):
        raise StorageError(f"{uri} names a prefix, not an object")
    with _gcs_errors(uri):
        blob = get_client().bucket(bucket_name).get_blob(name, retry=_read_retry())
        if blob is None:
            raise translate_error(_not_found(uri), uri)
    return blob


def _not_found(uri: str) -> Exception:
    from google.api_core import exceptions as api

    return api.NotFound(f"{uri} not found")


# ----------------------------------------------------------------------------------------------
# GCS single-object transfers


def _gcs_download_bytes(uri: str) -> bytes:
    blob = _blob_metadata(uri)  # pins the generation: content and crc32c describe the same object
    with _gcs_errors(uri):
        # checksum=None: this module does the one authoritative check below, with its own message.
        data = blob.download_as_bytes(checksum=None, retry=_read_retry())
    verify_crc32c(crc32c_base64(data), blob.crc32c, uri, "download")
    return data


def _gcs_download_file(uri: str, local_path: Path) -> None:
    blob = _blob_metadata(uri)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the destination, renamed only once verified: never a corrupt file in place.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{local_path.name}.", suffix=".part", dir=local_path.parent)
    os.close(fd)
    try:
        with _gcs_errors(uri):
            blob.download_to_filename(tmp_name, checksum=None, retry=_read_retry())
        verify_crc32c(file_crc32c_base64(tmp_name), blob.crc32c, uri, "download")
        os.replace(tmp_name, local_path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def _own_landed_write(bucket: Any, name: str, expected_crc32c: str, uri: str, action: str) -> Any:
    """After a 412 on a conditional write: the object, when it is our own write that had landed (a retry
    whose first attempt succeeded but lost its response); StorageError when another writer got in."""
    landed = bucket.get_blob(name, retry=_read_retry())
    if landed is None or landed.crc32c != expected_crc32c:
        raise StorageError(f"{uri} was modified by another writer during the {action}; not overwritten")
    return landed


def _gcs_upload(uri: str, *, data: bytes | None = None, filename: str | None = None) -> None:
    """Uploads bytes or a file to one object, crc32c-checked both ways, retried conditionally."""
    from google.api_core import exceptions as api

    bucket_name, name = split_gcs_uri(uri)
    if not name or name.endswith("/"):
        raise StorageError(f"cannot write to {uri}: it names a prefix, not an object")
    expected = crc32c_base64(data) if data is not None else file_crc32c_base64(filename)
    with _gcs_errors(uri):
        bucket = get_client().bucket(bucket_name)
        current = bucket.get_blob(name, retry=_read_retry())
        generation = current.generation if current is not None else 0  # 0: "must not exist yet"
        blob = bucket.blob(name)
        blob.crc32c = expected  # sent with the object metadata: GCS refuses a body that does not match
        kwargs = {"if_generation_match": generation, "retry": _write_retry(), "checksum": "crc32c"}
        try:
            if data is not None:
                blob.upload_from_string(data, content_type="application/octet-stream", **kwargs)
            else:
                blob.upload_from_filename(filename, **kwargs)
        except api.PreconditionFailed:
            blob = _own_landed_write(bucket, name, expected, uri, "upload")
    verify_crc32c(expected, blob.crc32c, uri, "upload")


def _gcs_copy(src_uri: str, dst_uri: str) -> Any:
    """Copies one object server-side (rewrite loop: works across buckets and locations), retried
    conditionally like :func:`_gcs_upload`."""
    from google.api_core import exceptions as api

    src = _blob_metadata(src_uri)
    dst_bucket_name, dst_name = split_gcs_uri(dst_uri)
    with _gcs_errors(dst_uri):
        dst_bucket = get_client().bucket(dst_bucket_name)
        current = dst_bucket.get_blob(dst_name, retry=_read_retry())
        generation = current.generation if current is not None else 0
        dst = dst_bucket.blob(dst_name)
        token = None
        try:
            while True:
                token, _, _ = dst.rewrite(
                    src, token=token, if_generation_match=generation, retry=_write_retry()
                )
                if token is None:
                    break
            dst.reload(retry=_read_retry())
        except api.PreconditionFailed:
            dst = _own_landed_write(dst_bucket, dst_name, src.crc32c, dst_uri, "copy")
    verify_crc32c(dst.crc32c, src.crc32c, dst_uri, "copy")
    return dst


# ----------------------------------------------------------------------------------------------
# Public API: single objects


def read_bytes(uri: str | os.PathLike) -> bytes:
    """Reads a whole object or file.

    Args:
        uri: A local path or a ``gs://`` object URI.

    Returns:
        The content (crc32c-verified for ``gs://``).

    Raises:
        StorageError: Missing bucket/object/file, permission denied, checksum mismatch.
    """
    uri = str(uri)
    if is_gcs(uri):
        return _gcs_download_bytes(uri)
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as err:
        raise StorageError(f"local file {uri} does not exist") from err


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Writes a whole object or file, replacing it atomically.

    Args:
        uri: A local path (parent folders are created) or a ``gs://`` object URI.
        data: The content.

    Raises:
        StorageError: Missing bucket, permission denied, checksum mismatch, concurrent writer.
    """
    uri = str(uri)
    if is_gcs(uri):
        _gcs_upload(uri, data=bytes(data))
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)  # readers see the old or the new file, never half of one
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def download(uri: str | os.PathLike, local_path: str | os.PathLike) -> Path:
    """Copies one object or file to a local file.

    Args:
        uri: A ``gs://`` object URI or a local file.
        local_path: Destination file (parent folders are created; an existing file is replaced).

    Returns:
        The destination path.

    Raises:
        StorageError: Missing source, permission denied, checksum mismatch.
    """
    uri, destination = str(uri), Path(local_path)
    if is_gcs(uri):
        _gcs_download_file(uri, destination)
    else:
        if not Path(uri).is_file():
            raise StorageError(f"local file {uri} does not exist")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(uri, destination)
    return destination


def upload(local_path: str | os.PathLike, uri: str | os.PathLike) -> str:
    """Copies one local file to an object or another local file.

    Args:
        local_path: Source file.
        uri: Destination: a ``gs://`` object URI or a local path.

    Returns:
        The destination URI.

    Raises:
        StorageError: Missing source or bucket, permission denied, checksum mismatch.
    """
    source, uri = Path(local_path), str(uri)
    if not source.is_file():
        raise StorageError(f"local file {source} does not exist")
    if is_gcs(uri):
        _gcs_upload(uri, filename=str(source))
    else:
        write_bytes(uri, source.read_bytes())
    return uri


def exists(uri: str | os.PathLike) -> bool:
    """Tells whether an object/file, or a non-empty prefix/folder, exists.

    Args:
        uri: A local path or a ``gs://`` URI (an object, or a prefix holding objects).

    Returns:
        True when the object exists or at least one object lies under ``uri/``.

    Raises:
        StorageError: Missing bucket or permission denied (a missing object is just False).
    """
    uri = str(uri)
    if not is_gcs(uri):
        return Path(uri).exists()
    bucket_name, name = split_gcs_uri(uri)
    with _gcs_errors(uri):
        bucket = get_client().bucket(bucket_name)
        if name and not name.endswith("/") and bucket.blob(name).exists(retry=_read_retry()):
            return True
        prefix = name.rstrip("/") + "/" if name else ""
        found = get_client().list_blobs(bucket_name, prefix=prefix, max_results=1, retry=_read_retry())
        return any(True for _ in found)


def _relative_names(uri_prefix: str) -> dict[str, Any]:
    """Maps each file under a prefix/folder to its name relative to it (``/``-separated).

    Returns:
        ``{relative_name: blob}`` for ``gs://`` (blob carries crc32c and size), ``{relative_name: Path}``
        for a local folder. Sorted by name.
    """
    if is_gcs(uri_prefix):
        bucket_name, name = split_gcs_uri(uri_prefix)
        prefix = name.rstrip("/") + "/" if name else ""
        with _gcs_errors(uri_prefix):
            blobs = list(get_client().list_blobs(bucket_name, prefix=prefix, retry=_read_retry()))
        # "Folder" placeholder objects (names ending in /) hold no data.
        return {
            b.name[len(prefix) :]: b for b in sorted(blobs, key=lambda b: b.name) if not b.name.endswith("/")
        }
    root = Path(uri_prefix)
    if not root.is_dir():
        return {}
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p for p in files}


def list_uris(uri_prefix: str | os.PathLike) -> list[str]:
    """Lists every object/file under a prefix/folder, recursively.

    Args:
        uri_prefix: ``gs://bucket/prefix`` (treated as the folder ``prefix/``) or a local folder.

    Returns:
        Sorted full URIs (or paths); empty when nothing is there.

    Raises:
        StorageError: Missing bucket or permission denied.
    """
    uri_prefix = str(uri_prefix)
    return [join(uri_prefix, rel) for rel in _relative_names(uri_prefix)]


# ----------------------------------------------------------------------------------------------
# Public API: prefixes


def read_manifest(uri_prefix: str | os.PathLike) -> dict | None:
    """Reads the completion manifest :func:`promote` writes last.

    Args:
        uri_prefix: A promoted prefix or folder.

    Returns:
        The manifest (``{"format_version", "source", "promoted_at", "files": {name: {"crc32c", "size"}}}``)
        or None when the prefix has none (not promoted, or a promotion in progress).
    """
    manifest_uri = join(str(uri_prefix), MANIFEST_NAME)
    if not exists(manifest_uri):
        return None
    return json.loads(read_bytes(manifest_uri))


def is_complete(uri_prefix: str | os.PathLike) -> bool:
    """Tells whether a prefix was completely promoted: its manifest exists and every file it lists is
    present with the recorded size and crc32c.

    Args:
        uri_prefix: A ``gs://`` prefix or a local folder.

    Returns:
        True when complete.
    """
    manifest = read_manifest(uri_prefix)
    if manifest is None:
        return False
    present = _describe(str(uri_prefix), _relative_names(str(uri_prefix)))
    return all(present.get(name) == entry for name, entry in manifest["files"].items())


def download_dir(
    uri_prefix: str | os.PathLike, local_dir: str | os.PathLike, require_complete: bool = False
) -> list[Path]:
    """Downloads every object under a prefix (or copies a local folder) into a local folder.

    Args:
        uri_prefix: ``gs://bucket/prefix`` or a local folder.
        local_dir: Destination folder (created); relative names are kept.
        require_complete: When True, the prefix must hold a completion manifest (see :func:`promote`);
            exactly the files it lists are fetched and each one's crc32c must match the manifest.

    Returns:
        The local files written, sorted.

    Raises:
        StorageError: Empty or missing prefix, missing bucket, permission denied, checksum mismatch,
            or (``require_complete``) no manifest / a file differing from it.
    """
    uri_prefix, destination = str(uri_prefix), Path(local_dir)
    names = _relative_names(uri_prefix)
    if not names:
        raise StorageError(f"nothing to download: {uri_prefix} holds no files")
    expected: dict[str, dict] | None = None
    if require_complete:
        manifest = read_manifest(uri_prefix)
        if manifest is None:
            raise StorageError(
                f"{uri_prefix} has no {MANIFEST_NAME}: it was not promoted yet or a promotion is in progress"
            )
        expected = manifest["files"]
        missing = sorted(set(expected) - set(names))
        if missing:
            raise StorageError(f"{uri_prefix} is incomplete: {missing} listed in its manifest are missing")
        names = {name: names[name] for name in expected} | {MANIFEST_NAME: names[MANIFEST_NAME]}
    written = []
    for rel in sorted(names):
        target = destination / rel
        download(join(uri_prefix, rel), target)
        if expected is not None and rel in expected:
            verify_crc32c(
                file_crc32c_base64(target), expected[rel]["crc32c"], join(uri_prefix, rel), "download"
            )
        written.append(target)
    return written


def upload_dir(local_dir: str | os.PathLike, uri_prefix: str | os.PathLike) -> list[str]:
    """Uploads every file of a local folder under a prefix (or copies it to another local folder).

    Args:
        local_dir: Source folder.
        uri_prefix: ``gs://bucket/prefix`` or a local folder; relative names are kept.

    Returns:
        The destination URIs written, sorted.

    Raises:
        StorageError: Missing or empty source folder, missing bucket, permission denied, checksum mismatch.
    """
    source, uri_prefix = Path(local_dir), str(uri_prefix)
    files = _relative_names(str(source))
    if not files:
        raise StorageError(f"nothing to upload: local folder {source} is missing or empty")
    return [upload(path, join(uri_prefix, rel)) for rel, path in files.items()]


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike) -> Iterator[Path]:
    """Gives a local path for reading an object, a prefix or a local path.

    Args:
        uri: A local path (yielded as is), a ``gs://`` object (downloaded to a temporary file keeping
            its base name) or a ``gs://`` prefix (downloaded to a temporary folder).

    Yields:
        The local path; temporary copies are deleted when the block exits.

    Raises:
        StorageError: Nothing at ``uri``, missing bucket, permission denied, checksum mismatch.
    """
    uri = str(uri)
    if not is_gcs(uri):
        if not Path(uri).exists():
            raise StorageError(f"local path {uri} does not exist")
        yield Path(uri)
        return
    bucket_name, name = split_gcs_uri(uri)
    with tempfile.TemporaryDirectory(prefix="metarec-gcs-") as tmp:
        is_object = bool(name) and not name.endswith("/")
        if is_object:
            with _gcs_errors(uri):
                is_object = get_client().bucket(bucket_name).blob(name).exists(retry=_read_retry())
        if is_object:
            yield download(uri, Path(tmp) / Path(name).name)
        else:
            if not _relative_names(uri):
                raise translate_error(_not_found(uri), uri)
            target = Path(tmp) / (Path(name.rstrip("/")).name or bucket_name)
            download_dir(uri, target)
            yield target


@contextlib.contextmanager
def local_output(uri_prefix: str | os.PathLike, promote_last: bool = False) -> Iterator[Path]:
    """Gives a local folder to write an output into: the one "write locally, then upload" helper.

    Args:
        uri_prefix: Destination: a local folder (yielded as is, created) or a ``gs://`` prefix.
        promote_last: For ``gs://``: upload to a staging prefix next to the destination and
            :func:`promote` it (manifest last), so readers never see a half-written output.

    Yields:
        The folder to write into. For ``gs://`` it is temporary and uploaded when the block exits
        without an exception (nothing is uploaded after a failure).

    Raises:
        StorageError: Nothing was written, missing bucket, permission denied, checksum mismatch.
    """
    if not is_gcs(uri_prefix):
        folder = Path(uri_prefix)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    final = str(uri_prefix).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="metarec-out-") as tmp:
        yield Path(tmp)
        if promote_last:
            staging = f"{final}.staging-{uuid.uuid4().hex[:8]}"
            upload_dir(tmp, staging)
            promote(staging, final)
        else:
            upload_dir(tmp, final)


def fingerprint(uri: str | os.PathLike) -> str:
    """Fingerprints the content under a prefix/folder (or one file): changes whenever a byte does.

    For ``gs://`` it is computed from object metadata only (name, generation, size, crc32c: nothing is
    downloaded); for local files from their crc32c and size.

    Args:
        uri: ``gs://`` prefix or object, local folder or file.

    Returns:
        ``sha256:<hex>`` over the sorted listing.

    Raises:
        StorageError: Nothing at ``uri``, missing bucket, permission denied.
    """
    import hashlib

    uri = str(uri)
    names = _relative_names(uri)
    if not names and not is_gcs(uri) and Path(uri).is_file():
        names = {Path(uri).name: Path(uri)}
    if not names and is_gcs(uri):
        names = {Path(uri).name: _blob_metadata(uri)} if exists(uri) else {}
    if not names:
        raise StorageError(f"nothing to fingerprint: {uri} holds no files")
    listing = _describe(uri, names)
    if is_gcs(uri):
        for rel, blob in names.items():
            if rel in listing:
                listing[rel]["generation"] = int(blob.generation)
    return "sha256:" + hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _describe(uri_prefix: str, names: dict[str, Any]) -> dict[str, dict]:
    """Size and crc32c of each file (from GCS metadata, or computed for local files)."""
    described = {}
    for rel, item in names.items():
        if rel == MANIFEST_NAME:
            continue
        if is_gcs(uri_prefix):
            described[rel] = {"crc32c": item.crc32c, "size": int(item.size)}
        else:
            described[rel] = {"crc32c": file_crc32c_base64(item), "size": item.stat().st_size}
    return described


def _delete(uri: str) -> None:
    if is_gcs(uri):
        from google.api_core import exceptions as api

        bucket_name, name = split_gcs_uri(uri)
        with _gcs_errors(uri):
            blob = get_client().bucket(bucket_name).get_blob(name, retry=_read_retry())
            if blob is not None:
                # Pinned to the generation just read, so a retry can never delete a newer object. A retry
                # of a delete that landed but whose response was lost gets 404, as does a delete of a
                # generation someone else removed meanwhile: either way that generation is gone, as asked.
                with contextlib.suppress(api.NotFound):
                    blob.delete(if_generation_match=blob.generation, retry=_write_retry())
    else:
        Path(uri).unlink(missing_ok=True)


def _copy_one(src_uri: str, dst_uri: str) -> None:
    if is_gcs(src_uri) and is_gcs(dst_uri):
        _gcs_copy(src_uri, dst_uri)
    elif is_gcs(src_uri):
        download(src_uri, dst_uri)
    else:
        upload(src_uri, dst_uri)


def _prefix_parts(uri_prefix: str) -> tuple[str, ...]:
    """The path components of a prefix: the bucket then the object name's segments for ``gs://``, the
    resolved absolute path's parts for a local folder (so ``a/../b``, ``./b`` and ``/abs/b`` compare equal)."""
    if is_gcs(uri_prefix):
        bucket, name = split_gcs_uri(uri_prefix)
        return (GCS_SCHEME, bucket, *[part for part in name.split("/") if part])
    return Path(uri_prefix).resolve().parts


def _refuse_overlapping_prefixes(staging: str, final: str) -> None:
    """Raises before :func:`promote` deletes anything it must not: its step 2 deletes every file under the
    final prefix that staging lacks, so a final prefix at a bucket root would empty the bucket, and staging
    inside final would delete itself along with the live version. Components are compared whole:
    ``run-1`` and ``run-10`` (or ``run-1.staging-ab``) are siblings, not nested."""
    final_parts = _prefix_parts(final) if final else ()
    if len(final_parts) <= (2 if is_gcs(final) else 1):
        raise StorageError(
            f"refusing to promote to {final or '/'!r}: a bucket root or the filesystem root is not a prefix "
            "promote may replace (it deletes every file there the staging prefix lacks); name a folder"
        )
    staging_parts = _prefix_parts(staging)
    if staging_parts == final_parts:
        raise StorageError(f"staging and final prefixes are the same: {staging}")
    shorter = min(len(staging_parts), len(final_parts))
    if staging_parts[:shorter] == final_parts[:shorter]:
        inner, outer = (staging, final) if len(staging_parts) > len(final_parts) else (final, staging)
        raise StorageError(
            f"refusing to promote {staging} to {final}: {inner} lies inside {outer}, so promoting would "
            "delete the staging files or files beside the final prefix; stage next to the final prefix "
            "(e.g. FINAL.staging-RUN), not inside it"
        )


def promote(staging_uri_prefix: str | os.PathLike, final_uri_prefix: str | os.PathLike) -> dict:
    """Copies a fully written staging prefix to its final name, manifest last.

    Order: (1) remove the final prefix's manifest, so readers see "incomplete" from now on;
    (2) delete files of the previous version that the new one does not have; (3) copy every staging file
    (server-side for gs:// to gs://, crc32c-checked); (4) write ``_METAREC_MANIFEST.json`` listing each
    file's size and crc32c. A reader that requires the manifest never sees a half-written model.
    The staging prefix is left in place (delete it when no longer needed).

    Args:
        staging_uri_prefix: Prefix (or local folder) holding the complete new content.
        final_uri_prefix: Prefix (or local folder) readers use; any mix of local and gs:// works.

    Returns:
        The manifest written.

    Raises:
        StorageError: Empty staging prefix, missing bucket, permission denied, checksum mismatch; or,
            before anything is touched, a final prefix that is a bucket root (or the filesystem root), or
            staging and final prefixes that are the same or lie one inside the other (step 2 would delete
            the staging files, or the final prefix's siblings).
    """
    staging, final = str(staging_uri_prefix).rstrip("/"), str(final_uri_prefix).rstrip("/")
    _refuse_overlapping_prefixes(staging, final)
    staged = {rel: item for rel, item in _relative_names(staging).items() if rel != MANIFEST_NAME}
    if not staged:
        raise StorageError(f"nothing to promote: {staging} holds no files")
    files = _describe(staging, staged)
    _delete(join(final, MANIFEST_NAME))
    for rel in _relative_names(final):
        if rel not in staged:
            _delete(join(final, rel))
    for rel in staged:
        _copy_one(join(staging, rel), join(final, rel))
    manifest = {
        "format_version": 1,
        "source": staging,
        "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    write_bytes(join(final, MANIFEST_NAME), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """Runs ``python -m metarec.storage COMMAND ...``; prints a JSON summary on success.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None). Commands: ``download-dir SRC DST
            [--require-complete]``, ``upload-dir SRC DST``, ``promote STAGING FINAL``, ``exists URI``.

    Returns:
        The exit status: 0 on success, 1 on a :class:`StorageError` (message on stderr), for
        ``exists`` 0 when present and 1 when absent.
    """
    parser = argparse.ArgumentParser(prog="python -m metarec.storage", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download-dir", help="download a gs:// prefix into a local folder")
    fetch.add_argument("source")
    fetch.add_argument("destination")
    fetch.add_argument(
        "--require-complete", action="store_true", help=f"fail unless the prefix holds {MANIFEST_NAME}"
    )
    push = commands.add_parser("upload-dir", help="upload a local folder under a gs:// prefix")
    push.add_argument("source")
    push.add_argument("destination")
    promotion = commands.add_parser("promote", help="copy a staging prefix to its final name, manifest last")
    promotion.add_argument("staging")
    promotion.add_argument("final")
    probe = commands.add_parser("exists", help="exit 0 when an object or non-empty prefix exists")
    probe.add_argument("uri")
    args = parser.parse_args(argv)
    try:
        if args.command == "download-dir":
            if not args.source.strip():
                # The serving Deployment's MODEL_URI (its pod template annotation metarec.io/model-uri)
                # is empty until deploy_model sets a version; "" would otherwise name the working folder.
                raise StorageError(
                    "no source given (empty MODEL_URI): no model version is deployed yet; deploy_model "
                    "sets it (docs/cluster.md, 'Who owns the model version')"
                )
            written = download_dir(args.source, args.destination, require_complete=args.require_complete)
            summary: dict = {"downloaded": len(written), "destination": args.destination}
        elif args.command == "upload-dir":
            summary = {
                "uploaded": len(upload_dir(args.source, args.destination)),
                "destination": args.destination,
            }
        elif args.command == "promote":
            summary = {"promoted": len(promote(args.staging, args.final)["files"]), "final": args.final}
        else:
            found = exists(args.uri)
            print(json.dumps({"uri": args.uri, "exists": found}))
            return 0 if found else 1
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
