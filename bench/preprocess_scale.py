"""Preprocessing at scale: generate a large synthetic data set and preprocess it on one node.

    python bench/preprocess_scale.py --ratings 25000000
    python bench/preprocess_scale.py --ratings 1000000 --format parquet

The data set (MovieLens-100K layout: u.data tab-separated or ratings.parquet, u.user, u.item) is
generated in chunks, vectorised, by a child process (``--generate-only DIR``) into a temporary
directory outside the repository, so the peak RSS reported is that of preprocessing alone.

Baseline, measured in the same run: a fresh child process (``--read-only DIR``) that only reads the same
ratings file into memory with pyarrow, the floor any preprocessing pays. ``seconds_over_read`` and
``peak_rss_over_read`` are preprocessing's time and peak RSS over that read's.

Prints one JSON line last:
``{"ratings": .., "seconds": .., "peak_rss_mb": .., "ratings_per_s": .., "seconds_over_read": ..,
"peak_rss_over_read": ..}`` (plus details).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from proc_memory import memory_mb

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "other", "student", "writer")
USERS_PER_CHUNK = 100_000


def generate(out_dir: str, n_ratings: int, file_format: str, seed: int) -> dict:
    """Writes about ``n_ratings`` ratings (MovieLens-100K layout) into ``out_dir``.

    Args:
        out_dir: target directory (created).
        n_ratings: approximate number of ratings.
        file_format: ``csv`` (u.data, tab-separated) or ``parquet`` (ratings.parquet).
        seed: random seed.

    Returns:
        ``{"ratings": written, "users": .., "items": ..}``.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_items = int(min(60_000, max(2_000, n_ratings // 500)))
    # Mostly 15-100 ratings per user (log-uniform) and a few heavy users.
    mean_per_user = 48.4  # E[log-uniform(15, 100)] = 44.8, plus 4 % heavy users at 3x
    n_users = max(1, round(n_ratings / mean_per_user))

    years = np.clip(2020 - np.round(rng.exponential(12.0, n_items)), 1920, 2020).astype(int)
    days = rng.integers(1, 29, n_items)
    months = rng.integers(0, 12, n_items)
    flags = (rng.random((n_items, 19)) < 0.12).astype(np.int8)
    flags[np.arange(n_items), rng.integers(1, 19, n_items)] = 1
    with open(out / "u.item", "w", encoding="latin-1") as handle:
        for i in range(n_items):
            date = f"{days[i]:02d}-{MONTHS[months[i]]}-{years[i]}"
            handle.write(
                f"{i + 1}|Item {i + 1} ({years[i]})|{date}||x|" + "|".join(map(str, flags[i])) + "\n"
            )
    ages = rng.integers(15, 70, n_users)
    genders = np.where(rng.random(n_users) < 0.3, "F", "M")
    occupations = np.asarray(OCCUPATIONS)[rng.integers(0, len(OCCUPATIONS), n_users)]
    zips = rng.integers(10000, 99999, n_users)
    with open(out / "u.user", "w") as handle:
        handle.writelines(
            f"{u + 1}|{ages[u]}|{genders[u]}|{occupations[u]}|{zips[u]}\n" for u in range(n_users)
        )

    item_quality = rng.normal(0, 0.5, n_items)
    popularity = np.exp(0.8 * item_quality + rng.normal(0, 1.0, n_items))
    cumulative = np.cumsum(popularity / popularity.sum())
    written = 0
    writer = None
    for start in range(0, n_users, USERS_PER_CHUNK):
        users = np.arange(start, min(n_users, start + USERS_PER_CHUNK))
        counts = np.round(np.exp(rng.uniform(np.log(15), np.log(100), len(users)))).astype(np.int64)
        heavy = rng.random(len(users)) < 0.04
        counts[heavy] *= 3
        user = np.repeat(users, counts)
        # Popularity-weighted items, drawn with replacement: a few duplicates exercise the de-duplication.
        item = np.minimum(np.searchsorted(cumulative, rng.random(len(user))), n_items - 1)
        bias = rng.normal(0, 0.4, len(users))
        rating = np.clip(
            np.round(3.5 + np.repeat(bias, counts) + item_quality[item] + rng.normal(0, 0.8, len(user))), 1, 5
        )
        timestamp = 880_000_000 + rng.integers(0, 200_000_000, len(user))
        table = pa.table(
            {
                "user_id": pa.array(user + 1, pa.int32()),
                "item_id": pa.array(item + 1, pa.int32()),
                "rating": pa.array(rating.astype(np.int8)),
                "timestamp": pa.array(timestamp, pa.int64()),
            }
        )
        if writer is None:
            if file_format == "parquet":
                writer = pq.ParquetWriter(out / "ratings.parquet", table.schema)
            else:
                writer = pacsv.CSVWriter(
                    out / "u.data",
                    table.schema,
                    write_options=pacsv.WriteOptions(include_header=False, delimiter="\t"),
                )
        writer.write_table(table)
        written += len(user)
    writer.close()
    return {"ratings": written, "users": int(n_users), "items": n_items}


def read_ratings(data_dir: str, file_format: str) -> dict:
    """The baseline: reads the generated ratings file into one pyarrow table and nothing else.

    Args:
        data_dir: A directory written by :func:`generate`.
        file_format: ``csv`` or ``parquet``, as generated.

    Returns:
        ``{"rows": .., "seconds": .., "peak_rss_mb": ..}`` of this process (run it in a fresh one).
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    started = time.perf_counter()
    if file_format == "parquet":
        table = pq.read_table(Path(data_dir) / "ratings.parquet")
    else:
        table = pacsv.read_csv(
            Path(data_dir) / "u.data",
            read_options=pacsv.ReadOptions(column_names=["user_id", "item_id", "rating", "timestamp"]),
            parse_options=pacsv.ParseOptions(delimiter="\t"),
        )
    seconds = time.perf_counter() - started
    return {"rows": table.num_rows, "seconds": seconds, "peak_rss_mb": memory_mb("VmHWM")}


def _read_in_child(data_dir: str, file_format: str) -> dict:
    """Runs :func:`read_ratings` in a fresh interpreter, so its peak RSS is the read's alone."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--read-only",
        data_dir,
        "--format",
        file_format,
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _generate_in_child(out_dir: str, n_ratings: int, file_format: str, seed: int) -> dict:
    """Runs ``generate`` in a separate process so its memory does not count in the reported peak."""
    command = [sys.executable, str(Path(__file__).resolve()), "--generate-only", out_dir, "--ratings", str(n_ratings),
               "--format", file_format, "--seed", str(seed)]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratings", type=int, default=1_000_000, help="number of ratings to generate")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv", help="ratings file format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and output")
    parser.add_argument("--generate-only", metavar="DIR", help="only generate the data set into DIR")
    parser.add_argument("--read-only", metavar="DIR", help="only read DIR's ratings file (the baseline)")
    args = parser.parse_args(argv)
    if args.generate_only:
        print(json.dumps(generate(args.generate_only, args.ratings, args.format, args.seed)))
        return 0
    if args.read_only:
        print(json.dumps(read_ratings(args.read_only, args.format)))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="metarec-scale-"))
    try:
        started = time.perf_counter()
        generated = _generate_in_child(str(workdir / "raw"), args.ratings, args.format, args.seed)
        generate_seconds = time.perf_counter() - started
        print(f"generated {generated} in {generate_seconds:.1f} s", file=sys.stderr)

        from metarec.preprocessing import run_preprocessing

        config = {
            "name": "scale",
            "ratings": {"file": "u.data", "sep": "\t", "names": ["user_id", "item_id", "rating", "timestamp"],
                        "user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"},
            "users": {"file": "u.user", "sep": "|", "names": ["user_id", "age", "gender", "occupation", "zip"],
                      "id": "user_id", "features": [
                          {"name": "age", "column": "age", "kind": "numeric"},
                          {"name": "gender", "column": "gender", "kind": "categorical"},
                          {"name": "occupation", "column": "occupation", "kind": "categorical"},
                          {"name": "zip", "column": "zip", "kind": "hashed", "buckets": 64}]},
            "items": {"file": "u.item", "sep": "|", "encoding": "latin-1",
                      "names": ["item_id", "title", "release_date", "video_date", "url"] + [f"g{i}" for i in range(19)],
                      "id": "item_id", "features": [
                          {"name": "genres", "kind": "multi_hot", "columns": [f"g{i}" for i in range(19)]},
                          {"name": "year", "kind": "numeric", "column": "release_date", "parse": "date_year"}]},
        }  # fmt: skip
        if args.format == "parquet":
            config["ratings"] = {
                "file": "ratings.parquet",
                "user": "user_id",
                "item": "item_id",
                "rating": "rating",
                "timestamp": "timestamp",
            }
        from metarec.data.config import parse_dataset_config

        started = time.perf_counter()
        summary = run_preprocessing(
            str(workdir / "raw"), parse_dataset_config(config, "scale"), None, str(workdir / "out")
        )
        seconds = time.perf_counter() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        read = _read_in_child(str(workdir / "raw"), args.format)
        print(f"baseline: read {read['rows']} ratings in {read['seconds']:.2f} s, peak RSS "
              f"{read['peak_rss_mb']:.0f} MB", file=sys.stderr)  # fmt: skip
        # Details on stderr: stdout holds the one result line.
        details = {"summary_counts": summary["counts"], "generate_seconds": round(generate_seconds, 1)}
        print(json.dumps(details), file=sys.stderr)
        print(
            json.dumps(
                {
                    "ratings": generated["ratings"],
                    "seconds": round(seconds, 2),
                    "peak_rss_mb": round(peak_rss_mb, 1),
                    "ratings_per_s": round(generated["ratings"] / seconds),
                    "seconds_over_read": round(seconds / read["seconds"], 2),
                    "peak_rss_over_read": round(peak_rss_mb / read["peak_rss_mb"], 2),
                    "read_seconds": round(read["seconds"], 4),
                    "read_peak_rss_mb": round(read["peak_rss_mb"], 1),
                    "format": args.format,
                    "users_kept": summary["n_users"],
                    "interactions_written": summary["n_interactions"],
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
