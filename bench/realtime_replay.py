"""Prequential replay of the real-time loop: each test user's ratings in timestamp order.

Preprocesses the data (seeded split), meta-trains the default model on the training users, and serves
it with a :class:`metarec.recommender.Recommender` on an embedded state store in a temporary
directory. Each test user starts from nothing (the archive never ships test users' ratings). Before
each of their ratings, every method predicts it from the ratings seen so far and ranks the user's not
yet seen items; then the rating is fed back:

* ``served_loop``: the Recommender itself: a recommend request over the remaining items, then a
  ``feedback`` request (append, re-adapt from the meta-learned start, store).
* ``prior_only``: the same model, never updated (the user's features alone).
* ``mf_foldin``: biased MF by ALS on the training users; the new user's factors and bias re-folded by
  ridge after every rating.
* ``item_user_bias``: mean + item bias + the user's shrunk mean residual, updated after every rating.

The baselines' regularisation is tuned by the same replay on the validation users (never the test
users). Metrics per event: absolute error of the predicted rating; nDCG@3 of the user's remaining
items (events with at least 3 left). ``by_history`` groups events by how many ratings the user had
given before: "0", "1" (1-4), "5" (5-19), "20" (20 and more). ``feedback_p50_ms`` is the in-process
time of one feedback request (the HTTP figure is in ``bench/serving_latency.py``).

Explanation deletion test: for each test user, adapt on their first 20 ratings, take the top-ranked
unrated item, explain it, then delete the top-attributed rating (largest contribution) or a random one
and re-adapt: the mean drop of that item's score for each.

The line before the last holds the details (event counts, the "0" bucket, the tuned baseline settings,
whether the targets are met). The last line is one JSON object::

    {"users": .., "events": .., "prequential": {"<method>": {"mae": .., "ndcg@3": ..}},
     "by_history": {"1": {"<method>": {...}}, "5": {...}, "20": {...}}, "feedback_p50_ms": ..,
     "explain_deletion": {"top": .., "random": ..},
     "served_over_mf_foldin": {"mae": .., "ndcg@3": ..}, "deletion_ratio": ..}

(targets: ``served_over_mf_foldin`` MAE below 1 and nDCG@3 above 1, ``deletion_ratio`` at least 2).

``--seeds 0 1 2`` replays three seeded splits (each its own training, tuning and test users) and pools
their events; the details line then also holds a paired bootstrap 95% interval, over users, of the
served loop minus MF fold-in (``ci95_served_minus_mf_foldin``: event-weighted MAE and nDCG@3).

Exit status: 0 after a run; 77 (``bench_data.SKIP_EXIT_STATUS``) when the ``--data`` directory does not
exist: nothing runs, the reason goes to stderr and the last line is ``{"skipped": true, "reason": ..}``.

Usage: ``python bench/realtime_replay.py --data ../shared/data/ml-100k [--seeds 0 1 2] [--max-users N]
[--meta-steps N] [--replay-split val]``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_data import SKIP_EXIT_STATUS, default_data_dir, missing_data, skip

from metarec.baselines import ItemUserBias, MFFoldIn
from metarec.explain import Explainer
from metarec.metrics import ndcg_per_user
from metarec.serving.requests import RequestParser
from metarec.serving.routes import answer_batch
from metarec.serving_settings import RequestLimits
from metarec.state.open import open_store
from metarec.tasks import Preprocessed, build_task_batch

METHODS = ("served_loop", "prior_only", "mf_foldin", "item_user_bias")
BUCKETS = ((0, "0"), (1, "1"), (5, "5"), (20, "20"))
NDCG_K = 3
DELETION_HISTORY = 20
BIAS_GRID = [{"item_reg": i, "user_reg": u} for i in (5.0, 10.0, 25.0) for u in (1.0, 2.0, 5.0, 10.0)]
MF_GRID = [
    {"factors": f, "reg": r, "foldin_reg": r * s, "foldin_bias_reg": b}
    for f in (10,)
    for r in (10.0, 30.0)
    for s in (0.3, 1.0, 3.0)
    for b in (1.0, 5.0)
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default=default_data_dir(),
        help="raw data directory (METAREC_ML100K_DIR), or synthetic[:tiny]",
    )
    parser.add_argument("--max-users", type=int, default=0, help="replay at most N test users (0 = all)")
    parser.add_argument("--meta-steps", type=int, default=0, help="meta-training steps (0 = the default)")
    # reptile: the best ranker of the three in this replay on the validation users (split seed 0, default
    # model: nDCG@3 0.7274 vs 0.7186 fomaml and 0.7184 maml, MAE within 0.001 of each other;
    # `--replay-split val`, docs/realtime.md)
    parser.add_argument("--method", default="reptile", help="meta-learning method to train")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0],
        help="split/training seeds; each replays its own split, the figures pool every seed's events",
    )  # fmt: skip
    parser.add_argument(
        "--replay-split", default="test", choices=("test", "val"),
        help="whose ratings are replayed: the test users, or the validation users (to choose settings "
        "without reading the test users; the baselines are then tuned on the replayed users themselves)",
    )  # fmt: skip
    parser.add_argument(
        "--train", action="append", default=[], metavar="KEY=JSON",
        help="a training setting for the meta-learner (repeatable), e.g. --train 'freeze=[\"hidden\"]'",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def user_events(pre: Preprocessed, split: str, max_users: int) -> dict[int, pd.DataFrame]:
    """Each user's ratings of one split in timestamp order (user_idx -> frame)."""
    frame = pre.interactions[pre.interactions["user_split"] == split]
    frame = frame.sort_values(["user_idx", "timestamp"], kind="stable")
    users = sorted(frame["user_idx"].unique().tolist())
    if max_users:
        users = users[:max_users]
    return {int(u): frame[frame["user_idx"] == u].reset_index(drop=True) for u in users}


def replay_baseline(baseline, pre: Preprocessed, events: dict[int, pd.DataFrame], window: int) -> list[dict]:
    """One record per event: the baseline's prediction and nDCG@3, re-fitting the user after each rating."""
    records = []
    for user, rows in events.items():
        items, ratings = rows["item_idx"].to_numpy(), rows["rating"].to_numpy(dtype=np.float32)
        n = len(rows)
        supports = [(items[max(0, t - window) : t], ratings[max(0, t - window) : t]) for t in range(n)]
        queries = [(items[t:], ratings[t:]) for t in range(n)]
        features = pre.user_features
        index = torch.full((n,), user, dtype=torch.long)
        users = type(features)(features.cat[index], features.num[index], features.multi[index])
        batch = build_task_batch(users, supports, queries)
        predictions = baseline.predict(batch)
        records += _event_records(predictions, batch.query_ratings, batch.query_mask, user)
    return records


def _event_records(
    predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, unit: object = None
) -> list[dict]:
    """Per event t (row t = the user's state before rating t): error on rating t, nDCG over the rest;
    ``unit`` names the user (the bootstrap resamples users)."""
    ndcg = ndcg_per_user(predictions, targets, NDCG_K, mask)
    remaining = mask.sum(1)
    return [
        {
            "history": t,
            "error": abs(float(predictions[t, 0]) - float(targets[t, 0])),
            "ndcg": float(ndcg[t]) if remaining[t] >= NDCG_K else math.nan,
            "unit": unit,
        }
        for t in range(predictions.shape[0])
    ]


def ask(parser, body: dict, route: str) -> tuple[int, dict]:
    """One request through the serving protocol layer and the Recommender (as the handler runs it)."""
    ((status, text),) = answer_batch(parser, [body], [route])
    answer = json.loads(text)
    assert status == 200, answer
    return status, answer


def replay_served(
    rec, pre: Preprocessed, events: dict[int, pd.DataFrame]
) -> tuple[list[dict], list[dict], list[float]]:
    """Replays through the Recommender: recommend over the remaining items, then feedback.

    Returns:
        ``(served records, prior-only records, feedback times in ms)``.
    """
    served, prior, feedback_ms = [], [], []
    item_ids = rec.item_ids
    # k up to the whole catalogue: the replay ranks every item a user has not rated yet.
    parser = RequestParser(rec, RequestLimits(max_k=len(item_ids)))
    for user, rows in events.items():
        user_id = str(pre.users.loc[pre.users["user_idx"] == user, "user_id"].iloc[0])
        items, ratings = rows["item_idx"].tolist(), rows["rating"].tolist()
        stamps = rows["timestamp"].tolist()
        n = len(rows)
        # Row t: the state before rating t, scoring items t.. (column 0 = the item rated next).
        served_rows, prior_rows, target_rows = torch.zeros(n, n), torch.zeros(n, n), torch.zeros(n, n)
        mask = torch.zeros(n, n)
        features = rec.known_user(user_id)
        for t in range(n):
            remaining = [item_ids[i] for i in items[t:]]
            body = {"user_id": user_id, "candidates": remaining, "k": len(remaining)}
            status, answer = ask(parser, body, "")
            scores = {entry["item_id"]: entry["score"] for entry in answer["items"]}
            served_rows[t, : n - t] = torch.tensor([scores[i] for i in remaining])
            prior_rows[t, : n - t] = rec.personaliser.score(features, None, torch.tensor(items[t:]))
            target_rows[t, : n - t] = torch.tensor(ratings[t:], dtype=torch.float32)
            mask[t, : n - t] = 1.0
            feedback = {"user_id": user_id, "ratings": [
                {"item_id": item_ids[items[t]], "rating": ratings[t], "timestamp": int(stamps[t])}]}  # fmt: skip
            start = time.perf_counter()
            status, answer = ask(parser, feedback, "feedback")
            feedback_ms.append((time.perf_counter() - start) * 1000)
        served += _event_records(served_rows, target_rows, mask, user)
        prior += _event_records(prior_rows, target_rows, mask, user)
    return served, prior, feedback_ms


def summarise(records: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Overall and per-history-bucket MAE / nDCG@3 of every method."""

    def metrics(rows: list[dict]) -> dict:
        ndcgs = [r["ndcg"] for r in rows if not math.isnan(r["ndcg"])]
        return {
            "mae": round(statistics.fmean(r["error"] for r in rows), 4) if rows else None,
            "ndcg@3": round(statistics.fmean(ndcgs), 4) if ndcgs else None,
            "events": len(rows),
        }

    overall = {method: metrics(rows) for method, rows in records.items()}
    by_history = {}
    for position, (low, name) in enumerate(BUCKETS):
        high = BUCKETS[position + 1][0] if position + 1 < len(BUCKETS) else math.inf
        by_history[name] = {
            method: metrics([r for r in rows if low <= r["history"] < high])
            for method, rows in records.items()
        }
    return overall, by_history


def tune(factory, grid: list[dict], pre: Preprocessed, events, window: int):
    """The grid point with the lowest prequential MAE on the validation users, fitted."""
    users, items, ratings = pre.training_rows()
    scale = {"rating_min": float(pre.schema["rating_min"]), "rating_max": float(pre.schema["rating_max"])}
    best = None
    for settings in grid:
        baseline = factory(**settings, **scale).fit(users, items, ratings, pre.n_items)
        mae = statistics.fmean(r["error"] for r in replay_baseline(baseline, pre, events, window))
        if best is None or mae < best[0]:
            best = (mae, settings, baseline)
    return best[2], best[1]


def deletion_test(rec, pre: Preprocessed, events, seed: int) -> dict:
    """Mean score drop of the top item when deleting its top-attributed vs a random support rating."""
    explainer = Explainer(rec.model, rec.adapt_mode, rec.inner_lr, rec.schema)
    rng = random.Random(seed)
    top_drops, random_drops = [], []
    for user, rows in events.items():
        if len(rows) < 6:
            continue
        rows = rows.iloc[:DELETION_HISTORY]
        user_id = str(pre.users.loc[pre.users["user_idx"] == user, "user_id"].iloc[0])
        features = rec.known_user(user_id)
        items = torch.tensor(rows["item_idx"].tolist())
        ratings = torch.tensor(rows["rating"].tolist(), dtype=torch.float32)
        adapted = rec.personaliser.adapt(features, items, ratings, rec.default_steps)
        scores = rec.personaliser.score(features, adapted, rec.all_items)
        scores[items] = -math.inf
        target = int(scores.argmax())
        user_tensors = tuple(tensor[0] for tensor in features)
        explanation = explainer.adapt(user_tensors, items, ratings, torch.tensor([target]), rec.default_steps)
        top = int(explanation.contributions[0].argmax())
        other = rng.randrange(len(items))

        full = float(explanation.scores[0])
        top_drops.append(full - _score_without(rec, features, items, ratings, top, target))
        random_drops.append(full - _score_without(rec, features, items, ratings, other, target))
    return {
        "top": round(statistics.fmean(top_drops), 5),
        "random": round(statistics.fmean(random_drops), 5),
        "users": len(top_drops),
    }


def _score_without(rec, features, items, ratings, position: int, target: int) -> float:
    """The target item's score after re-adapting without one support rating."""
    keep = torch.arange(len(items)) != position
    adapted = rec.personaliser.adapt(features, items[keep], ratings[keep], rec.default_steps)
    return float(rec.personaliser.score(features, adapted, torch.tensor([target]))[0])


def training_config(args: argparse.Namespace, seed: int) -> dict:
    """The meta-training settings of one seed: the defaults, ``--meta-steps`` and every ``--train``.

    Raises:
        ValueError: a ``--train`` value that is not ``KEY=JSON``.
    """
    config = {"seed": seed, "device": "cpu", "checkpoint_every": 0}
    if args.meta_steps:
        config["meta_steps"] = args.meta_steps
    for setting in args.train:
        key, equals, value = setting.partition("=")
        if not (key and equals):
            raise ValueError(f"--train {setting!r}: expected KEY=JSON, e.g. 'inner_lr=0.02'")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--train {setting!r}: the value is not JSON ({error.msg})") from None
    return config


def replay_seed(args: argparse.Namespace, seed: int) -> dict:
    """Preprocesses one seeded split, meta-trains, tunes the baselines on its validation users and
    replays the chosen users through every method; returns records, feedback times and the rest."""
    from metarec.preprocessing import run_preprocessing
    from metarec.recommender import Recommender
    from metarec.training import run_meta_training

    torch.manual_seed(seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metarec-replay-") as workdir:
        work = Path(workdir)
        run_preprocessing(args.data, None, {"seed": seed}, str(work / "pre"))
        config = training_config(args, seed)
        run_meta_training(str(work / "pre"), args.method, config, str(work / "model"))
        trained_s = time.perf_counter() - started
        pre = Preprocessed.load(str(work / "pre"))
        window = RequestLimits().state_window
        rec = Recommender.from_dir(
            work / "model", catalogue_dir=work / "pre", store=open_store(f"sqlite:///{work / 'state.sqlite'}", window),
        )  # fmt: skip
        replayed = user_events(pre, args.replay_split, args.max_users)
        validation = user_events(pre, "val", args.max_users)
        bias, bias_settings = tune(ItemUserBias, BIAS_GRID, pre, validation, window)
        mf, mf_settings = tune(MFFoldIn, MF_GRID, pre, validation, window)
        served, prior, feedback_ms = replay_served(rec, pre, replayed)
        records = {
            "served_loop": served,
            "prior_only": prior,
            "mf_foldin": replay_baseline(mf, pre, replayed, window),
            "item_user_bias": replay_baseline(bias, pre, replayed, window),
        }
        deletion = deletion_test(rec, pre, replayed, seed)
    return {
        "records": records,
        "feedback_ms": feedback_ms,
        "deletion": deletion,
        "baseline_settings": {"item_user_bias": bias_settings, "mf_foldin": mf_settings},
        "train_s": trained_s,
    }


def paired_bootstrap(
    rows_a: list[dict], rows_b: list[dict], metric: str, seed: int, samples: int = 2000
) -> dict:
    """95% interval of the event-weighted ``metric(a) - metric(b)``, resampling users (paired).

    Both methods replay the same events in the same order, so each user's events line up. MAE: negative
    favours ``a``; nDCG@3: positive does.
    """
    key = "error" if metric == "mae" else "ndcg"
    units = sorted({row["unit"] for row in rows_a})
    position = {unit: i for i, unit in enumerate(units)}
    sums = np.zeros((2, len(units)))
    counts = np.zeros(len(units))
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        if math.isnan(row_a[key]):
            continue
        i = position[row_a["unit"]]
        sums[0, i] += row_a[key]
        sums[1, i] += row_b[key]
        counts[i] += 1
    index = np.random.default_rng(seed).integers(0, len(units), size=(samples, len(units)))
    total = np.maximum(counts[index].sum(axis=1), 1)
    diffs = (sums[0][index].sum(axis=1) - sums[1][index].sum(axis=1)) / total
    low, high = np.percentile(diffs, [2.5, 97.5])
    point = (sums[0].sum() - sums[1].sum()) / max(counts.sum(), 1)
    return {"diff": round(float(point), 5), "ci95": [round(float(low), 5), round(float(high), 5)],
            "includes_zero": bool(low <= 0.0 <= high)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and prints the JSON line (``{"skipped": true, ..}`` when the data is absent)."""
    args = parse_args(argv)
    reason = missing_data(args.data)
    if reason:
        return skip(reason, args.data)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    records: dict[str, list[dict]] = {method: [] for method in METHODS}
    feedback_ms, deletions, settings, trained_s = [], [], {}, 0.0
    for seed in args.seeds:
        part = replay_seed(args, seed)
        for method, rows in part["records"].items():
            records[method] += [{**row, "unit": (seed, row["unit"])} for row in rows]
        feedback_ms += part["feedback_ms"]
        deletions.append(part["deletion"])
        settings[str(seed)] = part["baseline_settings"]
        trained_s += part["train_s"]
    overall, by_history = summarise(records)
    deletion = {key: round(statistics.fmean(d[key] for d in deletions), 5) for key in ("top", "random")} | {
        "users": sum(d["users"] for d in deletions)
    }
    feedback_ms.sort()
    details = {
        "prequential": overall,
        "by_history": by_history,
        "explain_deletion": deletion,
        "served_best_mae": min(overall, key=lambda m: overall[m]["mae"]) == "served_loop",
        "served_best_ndcg@3": max(overall, key=lambda m: overall[m]["ndcg@3"]) == "served_loop",
        "deletion_ratio": round(deletion["top"] / deletion["random"], 3) if deletion["random"] else None,
        "explain_deletion_per_seed": deletions,
        "ci95_served_minus_mf_foldin": {
            metric: paired_bootstrap(records["served_loop"], records["mf_foldin"], metric, args.seeds[0])
            for metric in ("mae", "ndcg@3")
        },
        "baseline_settings": settings,
        "seeds": args.seeds,
        "data": args.data,
        "method": args.method,
        "replay_split": args.replay_split,
        "state_window": RequestLimits().state_window,
        "train_s": round(trained_s, 1),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({"details": details}))

    def brief(table: dict) -> dict:
        return {method: {"mae": m["mae"], "ndcg@3": m["ndcg@3"]} for method, m in table.items()}

    # The judged line: the keys, plus the ratios the served loop is judged by, against MF fold-in
    # and the random deletion measured in this run (the line above has event counts, the "0" bucket, ...).
    served, mf = overall["served_loop"], overall["mf_foldin"]
    result = {
        "users": len({row["unit"] for row in records["served_loop"]}),
        "events": len(records["served_loop"]),
        "prequential": brief(overall),
        "by_history": {name: brief(by_history[name]) for name in ("1", "5", "20")},
        "feedback_p50_ms": round(feedback_ms[len(feedback_ms) // 2], 3),
        "explain_deletion": {"top": deletion["top"], "random": deletion["random"]},
        "served_over_mf_foldin": {
            metric: round(served[metric] / mf[metric], 4) if mf[metric] else None
            for metric in ("mae", "ndcg@3")
        },
        "deletion_ratio": details["deletion_ratio"],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(SKIP_EXIT_STATUS if main(sys.argv[1:]).get("skipped") else 0)
