"""The storage errors: what a caller can act on, and a checksum mismatch."""

from __future__ import annotations


class StorageError(ValueError):
    """A storage operation failed for a reason the caller can act on (missing bucket or object,
    permission denied, missing credentials, corrupted data, incomplete prefix)."""


class ChecksumMismatchError(StorageError):
    """The crc32c of transferred bytes differs from the crc32c GCS holds for the object."""
