"""What the benchmarks that read a data set share: where MovieLens-100K is, and the skip when it is absent.

MovieLens-100K is never copied into the repository (its licence forbids it): a benchmark reads it in place
from ``--data`` (default ``METAREC_ML100K_DIR``, else ``<repo>/../shared/data/ml-100k``). When that
directory does not exist the benchmark does not run: it prints the reason on stderr, then its one JSON
line ``{"skipped": true, "reason": .., "data": ..}`` last on stdout, and exits with
:data:`SKIP_EXIT_STATUS` (77, the "skipped" status of the automake test protocol), which neither
success (0) nor a failure (1, 2 for a usage error) can be mistaken for.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIP_EXIT_STATUS = 77


def default_data_dir() -> str:
    """MovieLens-100K location: ``METAREC_ML100K_DIR``, else ``<repo>/../shared/data/ml-100k``."""
    return os.environ.get("METAREC_ML100K_DIR", str(REPO_ROOT.parent / "shared" / "data" / "ml-100k"))


def missing_data(data: str) -> str | None:
    """Says why a benchmark cannot read ``data``.

    Args:
        data: The ``--data`` value: a local directory, a ``gs://`` prefix, or ``synthetic[:preset]``.

    Returns:
        None when there is something to read (the synthetic data is generated; a ``gs://`` prefix is
        checked by the loader itself), else the reason, naming the path and how to point elsewhere.
    """
    if data == "synthetic" or data.startswith(("synthetic:", "gs://")):
        return None
    if Path(data).is_dir():
        return None
    return (
        f"data directory {data} not found (MovieLens-100K is read in place, never copied into the "
        "repository): pass --data DIR or set METAREC_ML100K_DIR"
    )


def skip(reason: str, data: str) -> dict:
    """Reports a skipped run: the reason on stderr, then the one JSON line last on stdout.

    Args:
        reason: Why the benchmark did not run.
        data: The data location it was given.

    Returns:
        The printed result (``skipped`` true); the caller exits with :data:`SKIP_EXIT_STATUS`.
    """
    print(f"skipped: {reason}", file=sys.stderr, flush=True)
    result = {"skipped": True, "reason": reason, "data": data}
    print(json.dumps(result), flush=True)
    return result
