"""Prefixes and folders, local or ``gs://`` alike: download or upload a whole prefix, local views,
fingerprints."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from metarec.storage.checksums import file_crc32c_base64, verify_crc32c
from metarec.storage.errors import StorageError
from metarec.storage.gcs import (
    _blob_metadata,
    _gcs_errors,
    _not_found,
    _read_retry,
    get_client,
    translate_error,
)
from metarec.storage.objects import _relative_names, download, exists, upload
from metarec.storage.promotion import MANIFEST_NAME, _describe, promote, read_manifest
from metarec.storage.uris import is_gcs, join, split_gcs_uri


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
