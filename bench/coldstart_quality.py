"""Cold-start quality benchmark: meta-learned recommenders vs honest baselines, over several seeds.

Per seed: preprocess the data with a seeded split, meta-train each meta-learner with the training
module's defaults (only the seed is set), evaluate every scenario with ``run_evaluation`` (baselines
fitted on the same train rows, tuned on validation users), then aggregate mean and std over seeds.
Intermediate outputs go to a temporary directory (never the repository). The last stdout line is one
JSON object::

    {"dataset": ..., "seeds": [...], "scenarios": {"user_cold": {"<method>": {"mae": .., "rmse": ..,
     "ndcg@1": .., "ndcg@3": .., "ndcg@5": ..}, ...}, "warm": ..., "item_cold": ..., "user_item_cold": ...},
     "per_seed": {"<seed>": {"<scenario>": {"<method>": {"mae": .., "ndcg@3": ..}}}},
     "ci95": {"user_cold": {"mae": [lo, hi], "ndcg@3": [lo, hi]}, ...},
     "ci95_vs": {"user_cold": {"mae": {"meta": .., "other": .., "diff": .., "includes_zero": ..}}, ...},
     "peer_cost": {"<peer>": {"retrains": .., "retrain_s": ..}},   # summed over seeds, validation grid incl.
     "meta_over_baseline": {"user_cold": {"mae": .., "ndcg@3": ..}, ...},
     "best_meta": "<method>", "best_baseline": "<method>", "elapsed_s": ..}

``meta_over_baseline`` holds the quality targets as ratios against a baseline measured in the same run:
per scenario, ``best_meta``'s mean metric over ``best_baseline``'s (MAE below 1 and nDCG@3 above 1 favour
the meta-learner).

Peer references (``surprise_svdpp``, ``surprise_knn``, ``lightfm``; ``metarec.peers``, the ``bench``
extra) are evaluated beside the baselines unless ``--peers`` is given without names. ``ci95`` is a
paired bootstrap over test users (``metarec.stats``) of a meta-learner minus the best other method
(baselines and peers), per scenario and metric: the meta-learner is the one best on the validation users
(``metarec.selection.best_methods``; on the mean over seeds), so its test figure is not the best of
several test scores; the other method is the strongest on the test users, the hardest opponent.

Exit status: 0 after a run; 77 (``bench_data.SKIP_EXIT_STATUS``) when the ``--data`` directory does not
exist: nothing runs, the reason goes to stderr and the last line is ``{"skipped": true, "reason": ..}``.

Usage:
    python bench/coldstart_quality.py --data ../shared/data/ml-100k --seeds 0 1 2
    python bench/coldstart_quality.py --data synthetic:tiny --seeds 0 --quick      # smoke run
    python bench/coldstart_quality.py --users-over-max drop     # heavy users dropped, not trained on
    python bench/coldstart_quality.py --peers                   # no peer references
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from bench_data import SKIP_EXIT_STATUS, default_data_dir, missing_data, skip

META_METHODS = ("maml", "fomaml", "reptile")
# metarec.baselines.BASELINE_NAMES (tests/test_coldstart_bench.py keeps them equal; imported lazily here).
BASELINE_METHODS = ("global_mean", "item_user_bias", "mf_foldin", "global_model", "finetune", "fitted_start")
REPORTED_METRICS = ("mae", "rmse", "ndcg@1", "ndcg@3", "ndcg@5")
PEER_METHODS = ("surprise_svdpp", "surprise_knn", "lightfm")
PER_SEED_METRICS = ("mae", "ndcg@3")
# --quick: a smoke run of the whole protocol, NOT a quality measurement.
QUICK_TRAINING = {"meta_steps": 30, "val_every": 0, "checkpoint_every": 0}
QUICK_EVALUATION = {
    "mf_foldin": {"factors": [10], "reg": [10.0], "foldin_reg_scale": [1.0], "foldin_bias_reg": [2.0]},
    "global_model": {"epochs": 3},
    "finetune": {"steps": [5], "lr": [0.01]},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments (None = sys.argv[1:]).

    Returns:
        Namespace with data, seeds, dataset_config, methods, quick, users_over_max, workdir, threads.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=default_data_dir(), help="raw data directory, or synthetic[:tiny]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--dataset-config", default=None, help="data-set config name or path (default by data)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(BASELINE_METHODS + META_METHODS),
        choices=list(BASELINE_METHODS + META_METHODS),
        help="methods to evaluate (baselines and meta-learners)",
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=list(PEER_METHODS),
        choices=list(PEER_METHODS),
        help="peer references to evaluate (default all; the flag alone: none)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: short training and small tuning grids"
    )
    parser.add_argument(
        "--users-over-max",
        choices=["train", "drop"],
        default="train",
        help="preprocessing's users_over_max: keep users above max_ratings as training users (default) "
        "or drop them (the stricter protocol)",
    )
    parser.add_argument(
        "--workdir", default=None, help="keep intermediate outputs here (default: a temp dir)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these small models gain little from more, and on a shared "
        "machine extra threads mostly spin; 0 keeps torch's default)",
    )
    return parser.parse_args(argv)


def run_seed(args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    """Preprocesses, meta-trains and evaluates one seed.

    Args:
        args: Parsed command line.
        seed: Split, training and evaluation seed.
        workdir: Directory for this seed's outputs.

    Returns:
        The seed's evaluation document.
    """
    from metarec.evaluation import run_evaluation
    from metarec.preprocessing import run_preprocessing
    from metarec.training import run_meta_training

    started = time.monotonic()
    finished = workdir / "evaluation" / "evaluation.json"
    if finished.is_file():
        # --workdir re-runs reuse completed seeds (interrupted training resumes from its checkpoints).
        print(f"seed {seed}: reusing {finished}", file=sys.stderr, flush=True)
        return json.loads(finished.read_text())
    pre_dir = workdir / "preprocessed"
    run_preprocessing(
        args.data, args.dataset_config, {"seed": seed, "users_over_max": args.users_over_max}, str(pre_dir)
    )
    model_dirs = {}
    for method in [m for m in args.methods if m in META_METHODS]:
        training_config = {"seed": seed, **(QUICK_TRAINING if args.quick else {})}
        result = run_meta_training(str(pre_dir), method, training_config, str(workdir / method))
        model_dirs[method] = str(workdir / method)
        print(f"seed {seed} {method}: {json.dumps(result)}", file=sys.stderr, flush=True)
    evaluation_config = {"seed": seed, "baselines": [m for m in args.methods if m in BASELINE_METHODS],
                         "peers": list(args.peers), "per_user": True}  # fmt: skip
    if args.quick:
        from metarec.peers import DEFAULT_GRIDS

        evaluation_config.update(QUICK_EVALUATION)
        # The first (default) grid point of each peer: no validation retrains.
        evaluation_config["peers"] = {p: {k: v[:1] for k, v in DEFAULT_GRIDS[p].items()} for p in args.peers}
    document = run_evaluation(str(pre_dir), model_dirs, evaluation_config, str(workdir / "evaluation"))
    print(f"seed {seed} done in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return document


def confidence_intervals(aggregated: dict, documents: list[dict]) -> dict:
    """Paired bootstrap of the meta-learner chosen on validation users minus the strongest other method
    on the test users, per scenario and metric.

    Args:
        aggregated: Output of :func:`metarec.evaluation.aggregate_seeds` (ranks the methods).
        documents: The per-seed evaluation documents, with their ``per_user`` sections.

    Returns:
        scenario -> metric -> ``{"meta", "other", "diff", "ci95": [lo, hi], "includes_zero"}``; scenarios
        without a meta-learner, another method or per-user parts are left out.
    """
    from metarec.selection import best_methods
    from metarec.stats import CI_METRICS, paired_bootstrap

    comparisons: dict[str, dict] = {}
    for scenario in aggregated["scenarios"]:
        per_seed = [doc["per_user"][scenario] for doc in documents if scenario in doc.get("per_user", {})]
        if len(per_seed) != len(documents):
            continue
        for metric in CI_METRICS:
            meta, other = best_methods(aggregated, metric, scenario)
            if meta is None or other is None:
                continue
            result = paired_bootstrap(per_seed, meta, other, metric)
            comparisons.setdefault(scenario, {})[metric] = {"meta": meta, "other": other, **result}
    return comparisons


def per_seed_results(documents: list[dict]) -> dict:
    """seed -> scenario -> method -> the headline metrics of that seed alone."""
    return {
        str(doc["seeds"][0]): {
            scenario: {
                method: {m: round(scores[m], 4) for m in PER_SEED_METRICS if scores.get(m) is not None}
                for method, scores in per_method.items()
            }
            for scenario, per_method in doc["scenarios"].items()
        }
        for doc in documents
    }


def peer_costs(documents: list[dict]) -> dict:
    """peer -> full retrains and their seconds, summed over seeds (grid search on validation users included)."""
    costs: dict[str, dict] = {}
    for doc in documents:
        for name, info in doc.get("methods", {}).items():
            if info.get("kind") == "reference":
                entry = costs.setdefault(name, {"retrains": 0, "retrain_s": 0.0})
                entry["retrains"] += int(info["retrains"]) + int(info["tuning_retrains"])
                entry["retrain_s"] = round(
                    entry["retrain_s"] + float(info["retrain_s"]) + float(info["tuning_s"]), 1
                )
    return costs


def meta_over_baseline(scenarios: dict, meta: str | None, baseline: str | None) -> dict:
    """The meta-learner's metric over the baseline's, per scenario where both have it.

    Args:
        scenarios: scenario -> method -> metric -> mean value (as reported).
        meta: The meta-learner chosen on the validation users (``best_meta``), if any.
        baseline: The strongest baseline (``best_baseline``), if any.

    Returns:
        scenario -> ``{"mae": .., "ndcg@3": ..}``; empty without a meta-learner or a baseline.
    """
    ratios: dict[str, dict] = {}
    for scenario, per_method in scenarios.items():
        ours, theirs = per_method.get(meta) or {}, per_method.get(baseline) or {}
        for metric in PER_SEED_METRICS:
            if ours.get(metric) is not None and theirs.get(metric):
                ratios.setdefault(scenario, {})[metric] = round(ours[metric] / theirs[metric], 4)
    return ratios


def summarise(aggregated: dict, elapsed_s: float, documents: list[dict] | None = None,
              comparisons: dict | None = None) -> dict:  # fmt: skip
    """Reduces an aggregated evaluation document to the benchmark's one-line result.

    Args:
        aggregated: Output of :func:`metarec.evaluation.aggregate_seeds`.
        elapsed_s: Wall time of the whole benchmark.
        documents: The per-seed documents (for ``per_seed``), if any.
        comparisons: Output of :func:`confidence_intervals`, if any.

    Returns:
        The result object printed as the last line.
    """
    scenarios = {
        scenario: {
            method: {metric: round(scores[metric], 4) for metric in REPORTED_METRICS if metric in scores}
            for method, scores in per_method.items()
        }
        for scenario, per_method in aggregated["scenarios"].items()
    }
    comparisons = comparisons or {}
    return {
        "dataset": aggregated["dataset"],
        "seeds": aggregated["seeds"],
        "scenarios": scenarios,
        "per_seed": per_seed_results(documents or []),
        "ci95": {s: {m: c["ci95"] for m, c in per_metric.items()} for s, per_metric in comparisons.items()},
        "ci95_vs": {
            s: {
                m: {k: c[k] for k in ("meta", "other", "diff", "includes_zero")}
                for m, c in per_metric.items()
            }
            for s, per_metric in comparisons.items()
        },
        "peer_cost": peer_costs(documents or []),
        "meta_over_baseline": meta_over_baseline(
            aggregated["scenarios"], aggregated.get("best_meta"), aggregated.get("best_baseline")
        ),
        "best_meta": aggregated.get("best_meta"),
        "best_baseline": aggregated.get("best_baseline"),
        "elapsed_s": round(elapsed_s, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark and prints the result as the last stdout line.

    Args:
        argv: Command-line arguments (None = sys.argv[1:]).

    Returns:
        The printed result object; ``{"skipped": true, ..}`` when the data directory does not exist.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    reason = missing_data(args.data)
    if reason:
        return skip(reason, args.data)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from metarec.evaluation import aggregate_seeds
    from metarec.report import write_report
    from metarec.stats import render_ci_markdown

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="metarec-coldstart-") as temporary:
        root = Path(args.workdir or temporary)
        documents = [run_seed(args, seed, root / f"seed{seed}") for seed in args.seeds]
        aggregated = aggregate_seeds(documents)
        comparisons = confidence_intervals(aggregated, documents)
        if args.workdir:
            (root / "evaluation.json").write_text(json.dumps(aggregated, indent=2, default=str))
            report = Path(write_report(aggregated, root)["report"])
            report.write_text(report.read_text() + "\n" + render_ci_markdown(comparisons))
            print(f"aggregated report: {report}", file=sys.stderr)
    result = summarise(aggregated, time.monotonic() - started, documents, comparisons)
    for scenario, per_metric in comparisons.items():
        for metric, c in per_metric.items():
            lo, hi = c["ci95"]
            print(f"{scenario} {metric}: {c['meta']} - {c['other']} = {c['diff']:+.4f}, 95% CI [{lo:+.4f}, "
                  f"{hi:+.4f}]{': INCLUDES ZERO' if c['includes_zero'] else ''}", file=sys.stderr)  # fmt: skip
    user_cold = aggregated["scenarios"].get("user_cold", {})
    meta, baseline = result["best_meta"], result["best_baseline"]
    if meta and baseline:
        for metric in ("mae", "ndcg@3"):
            ours, theirs = user_cold[meta][metric], user_cold[baseline][metric]
            better = ours < theirs if metric == "mae" else ours > theirs
            print(
                f"user_cold {metric}: meta {meta} (chosen on validation) {ours:.4f} vs best baseline "
                f"{baseline} {theirs:.4f}: "
                f"{'meta wins' if better else 'META LOSES'}",
                file=sys.stderr,
            )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(SKIP_EXIT_STATUS if main().get("skipped") else 0)
