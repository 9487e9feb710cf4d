"""Single-object transfers to and from GCS: crc32c-verified both ways, writes conditional on the generation.

The ``gs://`` side of :mod:`metarec.storage.objects` and of :func:`metarec.storage.promote`'s copies; see
:mod:`metarec.storage` for the integrity and retry guarantees.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from metarec.storage.checksums import crc32c_base64, file_crc32c_base64, verify_crc32c
from metarec.storage.errors import StorageError
from metarec.storage.gcs import _blob_metadata, _gcs_errors, _read_retry, _write_retry, get_client
from metarec.storage.uris import split_gcs_uri


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
