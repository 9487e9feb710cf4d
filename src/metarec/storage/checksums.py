"""crc32c checksums in GCS's encoding (base64, big-endian) and their comparison."""

from __future__ import annotations

import base64
import os

from metarec.storage.errors import ChecksumMismatchError

_CHUNK_BYTES = 1 << 20


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
