"""Single objects or files, local or ``gs://`` alike: read, write, download, upload, exists, list, delete,
copy."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from metarec.storage.errors import StorageError
from metarec.storage.gcs import _gcs_errors, _read_retry, _write_retry, get_client
from metarec.storage.gcs_transfers import _gcs_copy, _gcs_download_bytes, _gcs_download_file, _gcs_upload
from metarec.storage.uris import is_gcs, join, split_gcs_uri


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
