"""The completion manifest and :func:`promote`: publish a fully written staging prefix, manifest last.

See :mod:`metarec.storage` ("Promotion") for what readers can rely on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from metarec.storage.checksums import file_crc32c_base64
from metarec.storage.errors import StorageError
from metarec.storage.objects import _copy_one, _delete, _relative_names, exists, read_bytes, write_bytes
from metarec.storage.uris import GCS_SCHEME, is_gcs, join, split_gcs_uri

MANIFEST_NAME = "_METAREC_MANIFEST.json"


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
