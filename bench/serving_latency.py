"""Serving latency of MetaRec on a real TorchServe: fast-adapt vs recommend vs a no-op handler.

Starts two TorchServe instances on free loopback ports from temporary directories: the MetaRec
archive (built from the synthetic data like the test fixture, or taken from ``--archive-dir``) and a
no-op handler archive with the *same* worker and batching settings (so the ratio isolates the model
work). Each request adapts on K = 20 support ratings with 5 inner steps and ranks the whole
catalogue. Requests are sent at concurrency 1 and 8 (threads, one keep-alive connection each).

The last line printed is one JSON document::

    {"concurrency": {"1": {"adapt_p50_ms", "adapt_p99_ms", "recommend_p50_ms", "feedback_p50_ms",
                           "feedback_redis_p50_ms", "recommend_stateless_p50_ms", "noop_p50_ms", ...},
                     "8": {...}},
     "adapt_over_noop_p50": .., "feedback_over_noop_p50": .., "feedback_redis_over_noop_p50": ..,
     "recommend_stateless_over_recommend_p50": ..,
     "adapt_throughput_scaling": .., "requests": .., "errors": .., "worker_restarts": .., ...}

Feedback rows: one rating per request for a pool of 64 users (append, re-adapt, store), with the
embedded SQLite store and, on a third server of the same archive, a real ``redis-server`` (skipped
with a message when it is not installed). ``recommend_stateless``: the recommend bodies on a fourth
server that keeps no per-user state (``METAREC_STATE_URL=none``, what the multi-replica manifests run),
where a user of the archive's history is adapted from it at every request instead of read from a store.

Exit status: 0 when every request succeeded and no worker restarted, else 1; 77
(``bench_data.SKIP_EXIT_STATUS``) when ``--data`` names a directory that does not exist: nothing runs, the
reason goes to stderr and the last line is ``{"skipped": true, "reason": ..}``.

Usage: ``python bench/serving_latency.py [--requests N] [--archive-dir DIR] [--data synthetic]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from bench_data import SKIP_EXIT_STATUS, missing_data, skip
from serving_support import (
    add_archive_arguments,
    archive_for,
    build_noop_archive,
    catalogue_ids,
    load,
    start_metarec,
    worker_identity,
)

from metarec.serve_local import ServerInfo, start_server, stop_server
from metarec.serving_settings import ServingSettings
from metarec.state.local_redis import start_redis, stop_redis

SUPPORT_SIZE = 20
INNER_STEPS = 5
CONCURRENCIES = (1, 8)
FEEDBACK_USERS = 64
# Which request bodies each measured kind sends (the no-op handler gets the adapt bodies).
BODIES_OF = {"noop": "adapt", "feedback_redis": "feedback", "recommend_stateless": "recommend"}
# Kinds served by another server of the archive whose workers get the adapt bodies first, as the first
# server's workers do (its adapt row runs before its recommend row).
WARMED_LIKE_METAREC = {"recommend_stateless"}
ADAPT_PATH = "/predictions/metarec/1.0/adapt"


def percentile(values: list[float], q: float) -> float:
    """Returns the q-th percentile (0..100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def make_bodies(item_ids: list[str], user_ids: list[str], n: int, seed: int) -> dict[str, list[bytes]]:
    """Builds n request bodies per kind (adapt and recommend), deterministic for a seed."""
    rng = random.Random(seed)
    adapt, recommend = [], []
    for _ in range(n):
        support = [
            {"item_id": item, "rating": rng.randint(1, 5)} for item in rng.sample(item_ids, SUPPORT_SIZE)
        ]
        adapt.append(json.dumps({"support": support, "k": 10, "steps": INNER_STEPS}).encode())
        recommend.append(json.dumps({"user_id": rng.choice(user_ids), "k": 10}).encode())
    # Feedback: one rating each for a pool of users, so every request appends, re-adapts and stores.
    feedback = [
        json.dumps({"user_id": f"bench-{rng.randrange(FEEDBACK_USERS)}",
                    "ratings": [{"item_id": rng.choice(item_ids), "rating": rng.randint(1, 5)}]}).encode()
        for _ in range(n)
    ]  # fmt: skip
    return {"adapt": adapt, "recommend": recommend, "feedback": feedback}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per kind and concurrency level")
    parser.add_argument(
        "--data", default="synthetic", help="data for the built archive (synthetic: 400 items)"
    )
    add_archive_arguments(parser)
    parser.add_argument("--workdir", help="where to build and run (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.requests < max(CONCURRENCIES):
        parser.error(f"--requests must be >= {max(CONCURRENCIES)}")
    # The data only matters when the archive is built here (--archive-dir serves one as it is).
    reason = None if args.archive_dir else missing_data(args.data)
    if reason:
        skip(reason, args.data)
        return SKIP_EXIT_STATUS

    with tempfile.TemporaryDirectory(prefix="metarec-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        archive_dir = archive_for(args, workdir, args.data)
        settings = ServingSettings()
        noop_dir = workdir / "noop-archive"
        build_noop_archive(noop_dir, "noop")
        item_ids, user_ids = catalogue_ids(archive_dir)

        servers: dict[str, ServerInfo] = {}
        redis = None
        try:
            servers["metarec"] = start_metarec(archive_dir, workdir / "ts-metarec")
            servers["noop"] = start_server(
                noop_dir, workdir / "ts-noop", 0, 0, model_name="noop", timeout_s=300
            )
            # The same archive again, its user state in a real Redis (the embedded SQLite file above).
            try:
                redis_url, redis = start_redis(workdir)
                servers["metarec-redis"] = start_metarec(archive_dir, workdir / "ts-redis", redis_url)
            except FileNotFoundError as error:
                print(f"no Redis row: {error}", file=sys.stderr)
            servers["metarec-stateless"] = start_metarec(archive_dir, workdir / "ts-stateless", "none")
            identities = {name: worker_identity(info) for name, info in servers.items()}
            feedback_path = "/predictions/metarec/1.0/feedback"
            paths = {
                "adapt": (servers["metarec"], ADAPT_PATH),
                "recommend": (servers["metarec"], "/predictions/metarec"),
                "feedback": (servers["metarec"], feedback_path),
                "noop": (servers["noop"], "/predictions/noop"),
                "recommend_stateless": (servers["metarec-stateless"], "/predictions/metarec"),
            }
            if "metarec-redis" in servers:
                paths["feedback_redis"] = (servers["metarec-redis"], feedback_path)
            results: dict[str, dict] = {}
            total_requests = total_errors = 0
            for concurrency in CONCURRENCIES:
                bodies = make_bodies(item_ids, user_ids, args.requests, seed=concurrency)
                level: dict[str, float] = {}
                for kind, (info, path) in paths.items():
                    kind_bodies = bodies[BODIES_OF.get(kind, kind)]
                    warm_up = kind_bodies[: max(16, concurrency * 2)]
                    load(info, [(path, body) for body in warm_up], concurrency)
                    if kind in WARMED_LIKE_METAREC:
                        # The first server's workers ran the adapt row before its recommend row; without the
                        # same warm-up a later server's p50 reads up to 1.5x higher at concurrency 8 for
                        # the same configuration (measured with a SQLite server in its place).
                        load(info, [(ADAPT_PATH, body) for body in bodies["adapt"]], concurrency)
                    outcome = load(info, [(path, b) for b in kind_bodies], concurrency)
                    latencies = outcome["latencies_ms"]
                    total_requests += len(latencies)
                    total_errors += outcome["errors"]
                    level[f"{kind}_p50_ms"] = round(statistics.median(latencies), 2)
                    level[f"{kind}_p99_ms"] = round(percentile(latencies, 99), 2)
                    level[f"{kind}_throughput_rps"] = round(len(latencies) / outcome["wall_s"], 1)
                    print(f"concurrency {concurrency} {kind}: {level}", file=sys.stderr)
                results[str(concurrency)] = level
            restarts = sum(len(identities[name] - worker_identity(info)) for name, info in servers.items())
        finally:
            for name in list(servers):
                stop_server(servers[name].workdir)
            if redis is not None:
                stop_redis(redis)

    one, many = results["1"], results[str(max(CONCURRENCIES))]
    summary = {
        "concurrency": results,
        "adapt_over_noop_p50": round(one["adapt_p50_ms"] / one["noop_p50_ms"], 2),
        # Feedback: append + re-adapt from the meta-learned start + store, per store (None: no redis-server).
        "feedback_over_noop_p50": round(one["feedback_p50_ms"] / one["noop_p50_ms"], 2),
        "feedback_redis_over_noop_p50": (
            round(one["feedback_redis_p50_ms"] / one["noop_p50_ms"], 2)
            if "feedback_redis_p50_ms" in one
            else None
        ),
        # Known users without a store: adapted at each request instead of read (same bodies, same server).
        "recommend_stateless_over_recommend_p50": round(
            one["recommend_stateless_p50_ms"] / one["recommend_p50_ms"], 2
        ),
        "adapt_throughput_scaling": round(many["adapt_throughput_rps"] / one["adapt_throughput_rps"], 2),
        "requests": total_requests,
        "errors": total_errors,
        "worker_restarts": restarts,
        "catalogue_items": len(item_ids),
        "support_size": SUPPORT_SIZE,
        "inner_steps": INNER_STEPS,
        "serving": {
            key: getattr(settings, key)
            for key in ("min_workers", "max_workers", "batch_size", "max_batch_delay_ms")
        },
    }
    print(json.dumps(summary))
    return 0 if total_errors == 0 and restarts == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
