"""The GCS client, its retry policies and the translation of Google API errors into :class:`StorageError`.

See :mod:`metarec.storage` for the credential, retry and error guarantees.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

from metarec.storage.errors import ChecksumMismatchError, StorageError
from metarec.storage.uris import is_gcs, split_gcs_uri

DEFAULT_EMULATOR_PROJECT = "metarec-local"


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
