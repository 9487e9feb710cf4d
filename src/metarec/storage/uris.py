"""``gs://`` URIs and local paths: telling them apart, splitting and joining them."""

from __future__ import annotations

import os
import re

from metarec.storage.errors import StorageError

GCS_SCHEME = "gs://"


# Any other scheme (s3://, gcs://, file://): every storage helper asks is_gcs first, and without this
# check treated it as a local path, so s3://b/x was "written" to a folder named s3: and lost with the pod.
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3://, also a one-slash s3:/b


def is_gcs(uri: str | os.PathLike) -> bool:
    """Tells whether a location is a Cloud Storage URI.

    Args:
        uri: A local path or a ``gs://`` URI.

    Returns:
        True for ``gs://...``, False for a local path.

    Raises:
        StorageError: A URI of another scheme (``s3://``, ``gcs://``, ``file://``): not supported.
    """
    text = str(uri)
    if text.startswith(GCS_SCHEME):
        return True
    if _OTHER_SCHEME.match(text):
        raise StorageError(f"unsupported location {text!r}: only gs:// URIs and local paths are supported")
    return False


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
