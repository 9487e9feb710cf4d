"""Soak a real TorchServe: sustained load at concurrency 8 and 32, then `kill -9` of workers under load.

Builds the demo archive (or takes ``--archive-dir``) and starts TorchServe on free loopback ports with
the packaged worker/batch settings. Each level sends a mix of recommend and fast-adapt requests (K = 20
support ratings) for ``--seconds`` from that many threads, each on a keep-alive connection, and
reads the workers' resident memory (``/proc/<pid>/status``) after a short warm-up and at the end.
Then, under load at concurrency 8, it kills one worker ``--kills`` times with SIGKILL, waits for
TorchServe to bring a new one up, and counts the requests that failed.

The last line printed is one JSON document::

    {"concurrency": {"8": {"throughput_rps", "p50_ms", "p99_ms", "requests", "errors",
                           "worker_rss_mb_start", "worker_rss_mb_end", "rss_growth_pct"}, "32": {...}},
     "kill": {"kills", "requests", "requests_lost", "lost_per_kill", "recovery_s_mean", "batch_size"},
     "throughput_32_over_8": .., "rss_growth_pct_max": .., "errors": .., "worker_restarts_under_load": ..}

Targets: 0 errors under load, RSS growth < 5 %, at most one batch (``batch_size``) lost per kill.
Usage: ``python bench/serving_soak.py --seconds 60 [--kills 3] [--archive-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from serving_latency import make_bodies, percentile
from serving_support import (
    add_archive_arguments,
    archive_for,
    catalogue_ids,
    load,
    start_metarec,
    worker_identity,
)

from metarec.serve_local import ServerInfo, model_workers, stop_server
from metarec.serving_settings import ServingSettings

LEVELS = (8, 32)
WARM_UP_S = 5.0


def worker_rss_mb(info: ServerInfo) -> float:
    """Sum of the resident memory of the model's workers, in MiB."""
    total_kb = 0
    for worker in model_workers(info):
        try:
            status = Path(f"/proc/{worker['pid']}/status").read_text()
        except (FileNotFoundError, KeyError):
            continue
        total_kb += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total_kb / 1024.0


def run_for(info, requests, concurrency: int, seconds: float, during=None) -> dict:
    """Runs :func:`serving_support.load` for ``seconds`` (calling ``during()`` meanwhile, if given)."""
    stop = threading.Event()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(load(info, requests, concurrency, stop)))
    runner.start()
    if during is not None:
        during()
    else:
        time.sleep(seconds)
    stop.set()
    runner.join()
    return result


def kill_workers(info: ServerInfo, kills: int, settle_s: float = 3.0) -> list[float]:
    """Kills one READY worker ``kills`` times; returns the seconds until the model had all workers READY again."""
    recoveries = []
    rng = random.Random(0)
    for _ in range(kills):
        time.sleep(settle_s)
        workers = [w for w in model_workers(info) if w.get("status") == "READY"]
        expected = len(model_workers(info))
        victim = rng.choice(workers)
        killed_at = time.monotonic()
        os.kill(int(victim["pid"]), signal.SIGKILL)
        while time.monotonic() - killed_at < 120:
            current = model_workers(info)
            ready = [w for w in current if w.get("status") == "READY" and w["pid"] != victim["pid"]]
            if len(ready) >= expected:
                break
            time.sleep(0.1)
        recoveries.append(time.monotonic() - killed_at)
    time.sleep(settle_s)
    return recoveries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="load duration per concurrency level")
    parser.add_argument("--kills", type=int, default=3, help="workers killed with SIGKILL under load")
    add_archive_arguments(parser)
    args = parser.parse_args(argv)
    settings = ServingSettings()
    with tempfile.TemporaryDirectory(prefix="metarec-soak-") as tmp:
        workdir = Path(tmp)
        archive_dir = archive_for(args, workdir)
        item_ids, user_ids = catalogue_ids(archive_dir)
        bodies = make_bodies(item_ids, user_ids, 500, seed=0)
        requests = [("/predictions/metarec/1.0/adapt", body) for body in bodies["adapt"]]
        requests += [("/predictions/metarec", body) for body in bodies["recommend"]]
        random.Random(1).shuffle(requests)
        info = start_metarec(archive_dir, workdir / "ts")
        try:
            levels = {}
            before = worker_identity(info)
            for concurrency in LEVELS:
                run_for(info, requests, concurrency, WARM_UP_S)
                rss_start = worker_rss_mb(info)
                outcome = run_for(info, requests, concurrency, args.seconds)
                rss_end = worker_rss_mb(info)
                latencies = outcome["latencies_ms"]
                levels[str(concurrency)] = {
                    "throughput_rps": round(len(latencies) / outcome["wall_s"], 1),
                    "p50_ms": round(statistics.median(latencies), 2),
                    "p99_ms": round(percentile(latencies, 99), 2),
                    "requests": len(latencies),
                    "errors": outcome["errors"],
                    "worker_rss_mb_start": round(rss_start, 1),
                    "worker_rss_mb_end": round(rss_end, 1),
                    "rss_growth_pct": round(100.0 * (rss_end - rss_start) / rss_start, 2),
                }
                print(f"concurrency {concurrency}: {levels[str(concurrency)]}", file=sys.stderr)
            restarts = len(before - worker_identity(info))
            recoveries: list[float] = []
            killed = run_for(
                info, requests, 8, 0, during=lambda: recoveries.extend(kill_workers(info, args.kills))
            )
        finally:
            stop_server(info.workdir)
    kill = {
        "kills": args.kills,
        "requests": len(killed["latencies_ms"]),
        "requests_lost": killed["errors"],
        "lost_per_kill": round(killed["errors"] / max(args.kills, 1), 2),
        "recovery_s_mean": round(statistics.mean(recoveries), 2) if recoveries else None,
        "batch_size": settings.batch_size,
    }
    summary = {
        "concurrency": levels,
        "kill": kill,
        "throughput_32_over_8": round(levels["32"]["throughput_rps"] / levels["8"]["throughput_rps"], 2),
        "rss_growth_pct_max": max(level["rss_growth_pct"] for level in levels.values()),
        "errors": sum(level["errors"] for level in levels.values()),
        "worker_restarts_under_load": restarts,
        "seconds_per_level": args.seconds,
    }
    print(json.dumps(summary))
    met = (
        summary["errors"] == 0
        and restarts == 0
        and summary["rss_growth_pct_max"] < 5
        and kill["lost_per_kill"] <= settings.batch_size
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
