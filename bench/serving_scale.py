"""Serving cost against catalogue size: per-request time and memory of the Recommender, in process.

    python bench/serving_scale.py                              # 2k, 20k and 100k items (~1-2 min)
    python bench/serving_scale.py --items 2000,200000 --profile

For each catalogue size the embedded synthetic data set is generated with that many items
(``metarec.data.synthetic.generate_synthetic``, ``--users`` users) into a temporary directory outside
the repository, preprocessed, and a tiny model is meta-trained on it (``--meta-steps`` MAML steps: the
architecture is the default one, only its weights are barely trained, which costs serving nothing).
A fresh child process (``--serve-only DIR``) then loads the Recommender as the TorchServe handler does
(``Recommender.from_dir`` with an SQLite state store, ``RequestParser``) and answers JSON bodies through
``answer_batch``, one request at a time, ``--repeats`` times each after two warm-up requests:

* ``recommend_known``: a user of the catalogue's user table without stored state (the prior);
* ``recommend_new``: a user described by features;
* ``adapt``: a new user adapted on 5 ratings;
* ``feedback``: 5 ratings of a new named user (re-adapted, stored, top-k answered);
* ``recommend_stateful``: a user with a stored state (read from the store, personalised);
* ``recommend_explain`` / ``adapt_explain``: the same with ``explain`` (k = 10 explained items).

Every request asks for k = 10. Baseline, measured in the same run: the smallest catalogue;
``over_smallest`` is each size's median time per request over the smallest size's. Where serving has
a cheaper path than the former one, both are timed in the same child: ``score_by_index_ms`` scores the
whole catalogue by item index (gathering the cached catalogue rows, as every request did before) and
``score_catalogue_ms`` reads them in place (``Adapter.score_catalogue``, what requests use now), for one
user's prior state.

Memory, per size, of the child: ``rss_loaded_mb`` (VmRSS after loading, minus VmRSS before: the model
and catalogue as served) and ``peak_rss_mb`` (VmHWM at the end: imports, load and every request).

Prints one JSON line last:
``{"items": [..], "users": .., "threads": .., "repeats": .., "per_request_ms": {size: {kind: median}},
"over_smallest": {size: {kind: ratio}}, "rss_loaded_mb": {size: ..}, "peak_rss_mb": {size: ..},
"load_s": {size: ..}, "score_by_index_ms": {size: ..}, "score_catalogue_ms": {size: ..},
"score_by_index_over_catalogue": {size: ..}}`` (sizes as strings). ``--profile`` prints a cProfile of
the largest size's requests on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_memory import memory_mb

KINDS = (
    "recommend_known",
    "recommend_new",
    "adapt",
    "feedback",
    "recommend_stateful",
    "recommend_explain",
    "adapt_explain",
)
K = 10
N_SUPPORT = 5
WARMUP = 2
NEW_USER = {"age": 30, "gender": "F", "occupation": "student"}


def build(size_dir: Path, n_items: int, n_users: int, meta_steps: int, seed: int) -> dict:
    """Generates, preprocesses and meta-trains one catalogue size into ``size_dir``.

    Args:
        size_dir: Output directory (``raw/``, ``pre/``, ``model/``).
        n_items: Catalogue size.
        n_users: Synthetic users.
        meta_steps: MAML meta-steps.
        seed: Data and training seed.

    Returns:
        ``{"n_items", "n_warm_items", "n_users", "build_s"}``.
    """
    import torch

    from metarec.data.synthetic import generate_synthetic
    from metarec.preprocessing import run_preprocessing
    from metarec.training import run_meta_training

    started = time.perf_counter()
    generate_synthetic(size_dir / "raw", n_users=n_users, n_items=n_items, seed=seed)
    summary = run_preprocessing(str(size_dir / "raw"), "synthetic", None, str(size_dir / "pre"))
    train = {"meta_steps": meta_steps, "meta_batch": 4, "val_every": 0, "checkpoint_every": 0,
             "log_every": 10_000, "device": "cpu", "seed": seed}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend for the (shared) cores
    try:
        run_meta_training(str(size_dir / "pre"), "maml", train, str(size_dir / "model"))
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(size_dir / "model" / "checkpoints", ignore_errors=True)
    return {"n_items": summary["n_items"], "n_warm_items": summary["n_warm_items"],
            "n_users": summary["n_users"], "build_s": round(time.perf_counter() - started, 2)}  # fmt: skip


def bodies(item_ids: list[str], known_user: str) -> dict[str, tuple[str, object]]:
    """Each request kind's route and a body factory (``repeat -> JSON text``; feedback names a new user
    each time, so every feedback request adapts on the same 5 ratings)."""
    support = [{"item_id": item, "rating": 1 + (i * 3) % 5} for i, item in enumerate(item_ids[:N_SUPPORT])]
    adapt = {"user": NEW_USER, "k": K, "support": support}
    stateful = "bench-stateful"
    return {
        "recommend_known": ("", lambda i: {"user_id": known_user, "k": K}),
        "recommend_new": ("", lambda i: {"user": NEW_USER, "k": K}),
        "adapt": ("adapt", lambda i: adapt),
        "feedback": (
            "feedback",
            lambda i: {"user_id": f"bench-feedback-{i}", "user": NEW_USER, "k": K, "ratings": support},
        ),  # fmt: skip
        "recommend_stateful": ("", lambda i: {"user_id": stateful, "k": K}),
        "recommend_explain": ("", lambda i: {"user_id": stateful, "k": K, "explain": True}),
        "adapt_explain": ("adapt", lambda i: {**adapt, "explain": True}),
        # Not timed: gives "bench-stateful" a stored state before the stateful kinds run.
        "_setup": ("feedback", lambda i: {"user_id": stateful, "user": NEW_USER, "ratings": support}),
    }


def serve(size_dir: str, repeats: int, threads: int, profile: bool) -> dict:
    """Loads one size's Recommender as the handler does and times each request kind (run in a fresh
    process: its memory is then the served model's and catalogue's alone).

    Args:
        size_dir: A directory written by :func:`build`.
        repeats: Timed requests per kind.
        threads: Torch intra-op threads (the handler's ``torch_threads``).
        profile: Print a cProfile of the timed requests on stderr.

    Returns:
        ``{"ms": {kind: median}, "load_s", "rss_loaded_mb", "peak_rss_mb", "score_by_index_ms",
        "score_catalogue_ms"}``.
    """
    import torch

    from metarec.recommender import Recommender
    from metarec.serving.requests import RequestParser
    from metarec.serving.routes import answer_batch
    from metarec.serving_settings import RequestLimits
    from metarec.state.open import open_store

    torch.set_num_threads(threads)
    import pyarrow.parquet  # noqa: F401 - imported by the load otherwise: its RSS is no catalogue's

    folder = Path(size_dir)
    before = memory_mb("VmRSS")
    started = time.perf_counter()
    store = open_store(f"sqlite:///{folder / 'state.sqlite'}")
    recommender = Recommender.from_dir(folder / "model", catalogue_dir=folder / "pre", store=store)
    parser = RequestParser(recommender, RequestLimits())
    load_s = time.perf_counter() - started
    rss_loaded = memory_mb("VmRSS") - before

    kinds = bodies(recommender.item_ids, next(iter(recommender.user_index)))
    route, body = kinds.pop("_setup")
    ((status, text),) = answer_batch(parser, [json.dumps(body(0))], [route])
    assert status == 200, text
    profiler = cProfile.Profile() if profile else None
    ms = {}
    for kind in KINDS:
        route, body = kinds[kind]
        times = []
        for repeat in range(WARMUP + repeats):
            text = json.dumps(body(repeat))
            if profiler is not None and repeat >= WARMUP:
                profiler.enable()
            started = time.perf_counter()
            ((status, answer),) = answer_batch(parser, [text], [route])
            elapsed = time.perf_counter() - started
            if profiler is not None:
                profiler.disable()
            if status != 200 or len(json.loads(answer).get("items", [])) != K:
                raise RuntimeError(f"{kind}: status {status}: {answer[:300]}")
            if repeat >= WARMUP:
                times.append(elapsed * 1000)
        ms[kind] = round(statistics.median(times), 3)
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue(), file=sys.stderr)

    # The former whole-catalogue scoring (a gather by index) against the in-place read, same user.
    adapter = recommender.adapter
    user = recommender.known_user(next(iter(recommender.user_index)))
    state = adapter.prior_state(1)
    every = recommender.all_items.expand(1, -1)
    result = {"ms": ms, "load_s": round(load_s, 3), "rss_loaded_mb": round(rss_loaded, 1),
              "score_by_index_ms": _median_ms(lambda: adapter.score(user, state, every), repeats)}  # fmt: skip
    if hasattr(adapter, "score_catalogue"):  # absent before it was added: time a checkout of that too
        result["score_catalogue_ms"] = _median_ms(lambda: adapter.score_catalogue(user, state), repeats)
    result["peak_rss_mb"] = round(memory_mb("VmHWM"), 1)
    return result


def _median_ms(call, repeats: int) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def _serve_in_child(size_dir: Path, repeats: int, threads: int, profile: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-only", str(size_dir),
               "--repeats", str(repeats), "--threads", str(threads)] + ["--profile"] * profile  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-20_000:])
    if done.returncode != 0:
        raise RuntimeError(f"serving child failed with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", default="2000,20000,100000", help="catalogue sizes, comma-separated")
    parser.add_argument("--users", type=int, default=200, help="synthetic users per data set")
    parser.add_argument("--meta-steps", type=int, default=3, help="MAML meta-steps per model")
    parser.add_argument("--repeats", type=int, default=15, help="timed requests per kind and size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while serving")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile the largest size (stderr)")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data and models")
    parser.add_argument("--serve-only", metavar="DIR", help="only serve DIR (built) and print its timings")
    args = parser.parse_args(argv)
    if args.serve_only:
        print(json.dumps(serve(args.serve_only, args.repeats, args.threads, args.profile)))
        return 0

    sizes = sorted({int(size) for size in args.items.split(",")})
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="metarec-serving-scale-"))
    results, built = {}, {}
    try:
        for size in sizes:
            built[size] = build(workdir / str(size), size, args.users, args.meta_steps, args.seed)
            print(f"built {built[size]}", file=sys.stderr, flush=True)
            profile = args.profile and size == sizes[-1]
            results[size] = _serve_in_child(workdir / str(size), args.repeats, args.threads, profile)
            print(f"{size} items: {json.dumps(results[size])}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    smallest = results[sizes[0]]["ms"]
    key = str
    document = {
        "items": sizes,
        "users": args.users,
        "threads": args.threads,
        "repeats": args.repeats,
        "per_request_ms": {key(s): r["ms"] for s, r in results.items()},
        "over_smallest": {
            key(s): {kind: round(r["ms"][kind] / smallest[kind], 2) for kind in KINDS}
            for s, r in results.items()
        },
        "rss_loaded_mb": {key(s): r["rss_loaded_mb"] for s, r in results.items()},
        "peak_rss_mb": {key(s): r["peak_rss_mb"] for s, r in results.items()},
        "load_s": {key(s): r["load_s"] for s, r in results.items()},
        "score_by_index_ms": {key(s): r["score_by_index_ms"] for s, r in results.items()},
        "warm_items": {key(s): b["n_warm_items"] for s, b in built.items()},
    }
    if all("score_catalogue_ms" in r for r in results.values()):
        document["score_catalogue_ms"] = {key(s): r["score_catalogue_ms"] for s, r in results.items()}
        document["score_by_index_over_catalogue"] = {
            key(s): round(r["score_by_index_ms"] / r["score_catalogue_ms"], 2) for s, r in results.items()
        }
    print(json.dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
