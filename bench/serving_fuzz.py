"""Fuzz a real TorchServe with hostile requests, valid canaries interleaved (issue 13's targets).

Builds the demo archive (or takes ``--archive-dir``), starts TorchServe on free loopback ports, sends
``--requests`` hostile bodies (``tests/fuzz_requests.py``: the known bad cases, byte mutations, random
JSON, plausible requests with wrong values, NaN/huge number literals) from ``--concurrency`` threads
with a valid canary after every 4th, and compares the workers before and after.

The last line printed is one JSON document::

    {"requests", "hostile", "by_status", "5xx", "non_json_200", "worker_restarts", "canaries_failed",
     "max_answer_bytes", "canaries", "connection_errors", "canary_failure_ratio", "seconds"}

``requests`` counts every request sent: the ``hostile`` ones (``--requests``) plus the ``canaries``.
Targets: 0 5xx, 0 non-JSON 200 answers, 0 worker restarts, 0 canaries failed.
Usage: ``python bench/serving_fuzz.py [--requests 2700] [--concurrency 8] [--archive-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from serving_support import add_archive_arguments, archive_for, run_fuzz, start_metarec, worker_identity

from metarec.serve_local import stop_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2700, help="hostile requests (canaries come on top)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    add_archive_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="metarec-fuzz-") as tmp:
        workdir = Path(tmp)
        archive_dir = archive_for(args, workdir)
        info = start_metarec(archive_dir, workdir / "ts")
        try:
            before = worker_identity(info)
            started = time.perf_counter()
            outcome = run_fuzz(info, args.requests, args.seed, args.concurrency)
            seconds = time.perf_counter() - started
            restarts = len(before - worker_identity(info))
        finally:
            stop_server(info.workdir)
    summary = {
        "requests": outcome["requests"],
        "hostile": outcome["hostile"],
        "by_status": outcome["by_status"],
        "5xx": outcome["5xx"],
        "non_json_200": outcome["non_json_200"],
        "worker_restarts": restarts,
        "canaries_failed": outcome["canaries_failed"],
        "max_answer_bytes": outcome["max_answer_bytes"],
        "canaries": outcome["canaries"],
        "connection_errors": outcome["connection_errors"],
        "canary_failure_ratio": round(outcome["canaries_failed"] / max(outcome["canaries"], 1), 4),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(summary))
    met = summary["5xx"] == summary["non_json_200"] == restarts == summary["canaries_failed"] == 0
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
