"""Contracts of the benchmarks that read a data set: an absent data directory is a clean skip.

Each is run as the command line runs it (a fresh interpreter, so the exit status and every line printed,
atexit handlers included, are the script's own): nothing is measured, the reason is on stderr, the last
stdout line is the one JSON result ``{"skipped": true, ...}`` and the exit status is
``bench_data.SKIP_EXIT_STATUS``. Before, coldstart_quality and realtime_replay ended in a traceback (exit
status 1, no JSON line) and realtime_replay ignored ``METAREC_ML100K_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_modules import BENCH_DIR, load_bench

DATA_BENCHES = ["coldstart_quality", "realtime_replay", "serving_latency"]


def _run(
    bench: str, argv: list[str], environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH_DIR / f"{bench}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(environment or {})},
    )


def _skipped(done: subprocess.CompletedProcess, absent: Path) -> dict:
    """Checks a skipped run's exit status, last stdout line and stderr; returns the JSON result."""
    assert done.returncode == load_bench("bench_data").SKIP_EXIT_STATUS, done.stderr[-2000:]
    assert done.stdout.endswith("\n") and "Traceback" not in done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["skipped"] is True and result["data"] == str(absent)
    assert str(absent) in result["reason"] and "--data" in result["reason"]
    assert f"skipped: {result['reason']}" in done.stderr
    return result


@pytest.mark.parametrize("bench", DATA_BENCHES)
def test_an_absent_data_directory_is_a_skip_with_its_reason(bench, tmp_path):
    absent = tmp_path / "ml-100k"
    _skipped(_run(bench, ["--data", str(absent)]), absent)


@pytest.mark.parametrize("bench", ["coldstart_quality", "realtime_replay"])
def test_the_default_data_directory_is_metarec_ml100k_dir(bench, tmp_path):
    absent = tmp_path / "elsewhere"
    _skipped(_run(bench, [], {"METAREC_ML100K_DIR": str(absent)}), absent)


def test_only_a_missing_local_directory_is_missing(tmp_path):
    bench_data = load_bench("bench_data")
    for present in ("synthetic", "synthetic:tiny", "gs://bucket/ml-100k", str(tmp_path)):
        assert bench_data.missing_data(present) is None, present
    assert str(tmp_path / "absent") in bench_data.missing_data(str(tmp_path / "absent"))
