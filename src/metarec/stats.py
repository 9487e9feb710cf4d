"""Per-user metric parts and the paired bootstrap over users (confidence intervals of differences).

The evaluation's MAE pools every query row, and nDCG@k averages the users whose ideal DCG is positive.
So each user is kept as ``(sum of absolute errors, number of rows, nDCG@k)``: a resample of users gives
the pooled MAE ``sum(errors) / sum(rows)`` and the mean nDCG of the informative users, exactly as the
evaluator computes them. The bootstrap is *paired*: the same resampled users score both methods, so
per-user difficulty cancels out of the difference. Several seeds (each with its own test users) are
resampled independently and their differences averaged, like the reported mean over seeds.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CI_METRICS = ("mae", "ndcg@3")


def per_user_parts(predictions: torch.Tensor, batch, ks=(3,)) -> dict[str, list]:
    """One method's per-user metric parts on a scenario's tasks.

    Args:
        predictions: Float[T, Q] predicted ratings.
        batch: The TaskBatch scored (query ratings and mask).
        ks: nDCG cut-offs to keep per user.

    Returns:
        ``{"abs_err": [sum |error| per user], "ndcg@<k>": [per user, None without information]}``.
    """
    from metarec.metrics import ndcg_per_user

    mask = batch.query_mask.to(torch.float64)
    errors = ((predictions.to(torch.float64) - batch.query_ratings.to(torch.float64)).abs() * mask).sum(dim=1)
    parts = {"abs_err": [round(float(v), 6) for v in errors]}
    for k in ks:
        values = ndcg_per_user(predictions, batch.query_ratings, int(k), batch.query_mask)
        parts[f"ndcg@{k}"] = [None if math.isnan(v) else round(float(v), 6) for v in values.tolist()]
    return parts


def query_rows(batch) -> list[int]:
    """Number of real query rows of each task (the MAE weights of the users)."""
    return [int(v) for v in batch.query_mask.sum(dim=1).tolist()]


def _metric_values(parts: dict, rows: np.ndarray, metric: str, index: np.ndarray) -> np.ndarray:
    """The metric of each bootstrap resample (``index``: Int[B, U] user positions)."""
    if metric == "mae":
        errors = np.asarray(parts["abs_err"], dtype=np.float64)
        return errors[index].sum(axis=1) / np.maximum(rows[index].sum(axis=1), 1)
    values = np.array([np.nan if v is None else v for v in parts[metric]], dtype=np.float64)
    sampled = values[index]
    counts = (~np.isnan(sampled)).sum(axis=1)
    return np.where(counts > 0, np.nansum(sampled, axis=1) / np.maximum(counts, 1), np.nan)


def paired_bootstrap(per_seed: list[dict], method_a: str, method_b: str, metric: str,
                     samples: int = 2000, seed: int = 0) -> dict:  # fmt: skip
    """95% percentile interval of ``metric(a) - metric(b)`` by a paired bootstrap over users.

    Args:
        per_seed: One entry per seed: ``{"n_rows": [...], "methods": {name: per_user_parts}}`` (the
            evaluation document's ``per_user[scenario]``).
        method_a: First method (e.g. the best meta-learner).
        method_b: Second method (e.g. the best other method).
        metric: ``"mae"`` or ``"ndcg@<k>"`` (a cut-off kept per user).
        samples: Bootstrap resamples.
        seed: Resampling seed.

    Returns:
        ``{"diff": observed mean-over-seeds difference, "ci95": [lo, hi], "includes_zero": bool}``.

    Raises:
        ValueError: A seed lacks one of the methods, or their user lists differ in length.
    """
    rng = np.random.default_rng(seed)
    observed, resampled = [], []
    for entry in per_seed:
        methods = entry["methods"]
        for name in (method_a, method_b):
            if name not in methods:
                raise ValueError(f"per-user metrics of {name!r} missing; have {sorted(methods)}")
        rows = np.asarray(entry["n_rows"], dtype=np.float64)
        n_users = len(rows)
        if len(methods[method_a]["abs_err"]) != n_users or len(methods[method_b]["abs_err"]) != n_users:
            raise ValueError("paired bootstrap needs both methods scored on the same users")
        everyone = np.arange(n_users)[None, :]
        index = rng.integers(0, n_users, size=(samples, n_users))
        a, b = methods[method_a], methods[method_b]
        observed.append(
            float((_metric_values(a, rows, metric, everyone) - _metric_values(b, rows, metric, everyone))[0])
        )
        resampled.append(_metric_values(a, rows, metric, index) - _metric_values(b, rows, metric, index))
    differences = np.nanmean(np.stack(resampled), axis=0) if resampled else np.array([np.nan])
    low, high = (float(v) for v in np.nanpercentile(differences, [2.5, 97.5]))
    return {"diff": round(float(np.mean(observed)), 6), "ci95": [round(low, 6), round(high, 6)],
            "includes_zero": bool(low <= 0.0 <= high)}  # fmt: skip


def render_ci_markdown(comparisons: dict) -> str:
    """A Markdown section for the bench report: one row per scenario and metric.

    Args:
        comparisons: scenario -> metric -> ``{"meta", "other", "diff", "ci95", "includes_zero"}``.

    Returns:
        The section text.
    """
    lines = ["## Paired bootstrap: best meta-learner minus best other method", "",
             "95% percentile intervals over test users (resampled per seed, differences averaged over seeds). "
             "MAE: negative favours the meta-learner; nDCG@3: positive does.", "",
             "| scenario | metric | best meta | best other | difference | 95% CI | includes zero |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for scenario, per_metric in comparisons.items():
        for metric, c in per_metric.items():
            lo, hi = c["ci95"]
            lines.append(f"| {scenario} | {metric} | {c['meta']} | {c['other']} | {c['diff']:+.4f} | "
                         f"[{lo:+.4f}, {hi:+.4f}] | {'YES' if c['includes_zero'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"
