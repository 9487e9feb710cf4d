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

Modules, one job each:

* :mod:`~metarec.storage.errors`: :class:`StorageError`, :class:`ChecksumMismatchError`.
* :mod:`~metarec.storage.uris`: ``gs://`` URIs and local paths (:func:`is_gcs`, :func:`split_gcs_uri`,
  :func:`join`).
* :mod:`~metarec.storage.checksums`: crc32c in GCS's encoding and its check (integrity).
* :mod:`~metarec.storage.gcs`: the client (credentials), retry policies and error translation (retries,
  errors).
* :mod:`~metarec.storage.gcs_transfers`: verified, conditionally retried single-object transfers to and from
  GCS (integrity, retries).
* :mod:`~metarec.storage.objects`: single objects or files (:func:`read_bytes`, :func:`write_bytes`,
  :func:`download`, :func:`upload`, :func:`exists`, :func:`list_uris`).
* :mod:`~metarec.storage.promotion`: the completion manifest and :func:`promote` (promotion).
* :mod:`~metarec.storage.prefixes`: prefixes and folders (:func:`download_dir`, :func:`upload_dir`,
  :func:`local_copy`, :func:`local_output`, :func:`fingerprint`).
* :mod:`~metarec.storage.cli`: the command line below (``__main__`` runs it).

Command line (used by the serving init container)::

    python -m metarec.storage download-dir gs://BUCKET/models/metarec /home/model-server/archive --require-complete
    python -m metarec.storage upload-dir LOCAL_DIR gs://BUCKET/PREFIX
    python -m metarec.storage promote gs://BUCKET/staging/run-1 gs://BUCKET/models/metarec
"""

from metarec.storage.checksums import crc32c_base64, file_crc32c_base64, verify_crc32c
from metarec.storage.cli import main
from metarec.storage.errors import ChecksumMismatchError, StorageError
from metarec.storage.gcs import DEFAULT_EMULATOR_PROJECT, get_client, translate_error
from metarec.storage.objects import download, exists, list_uris, read_bytes, upload, write_bytes
from metarec.storage.prefixes import download_dir, fingerprint, local_copy, local_output, upload_dir
from metarec.storage.promotion import MANIFEST_NAME, is_complete, promote, read_manifest
from metarec.storage.uris import GCS_SCHEME, is_gcs, join, split_gcs_uri

__all__ = [
    "DEFAULT_EMULATOR_PROJECT",
    "GCS_SCHEME",
    "MANIFEST_NAME",
    "ChecksumMismatchError",
    "StorageError",
    "crc32c_base64",
    "download",
    "download_dir",
    "exists",
    "file_crc32c_base64",
    "fingerprint",
    "get_client",
    "is_complete",
    "is_gcs",
    "join",
    "list_uris",
    "local_copy",
    "local_output",
    "main",
    "promote",
    "read_bytes",
    "read_manifest",
    "split_gcs_uri",
    "translate_error",
    "upload",
    "upload_dir",
    "verify_crc32c",
    "write_bytes",
]
