"""Markdown report and K-shot curve plot from an evaluation document (``evaluation.json``).

Used by :func:`metarec.evaluation.run_evaluation` and by the KFP evaluate component to emit a
Markdown artifact. matplotlib is imported only when a plot is drawn (Agg backend, no display).
"""

from __future__ import annotations

import math
from pathlib import Path

from metarec.metrics import METRIC_NAMES, higher_is_better

SCENARIO_ORDER = ("user_cold", "warm", "item_cold", "user_item_cold")
SCENARIO_TITLES = {
    "warm": "Warm (train users, known items)",
    "user_cold": "User cold-start (new users, known items)",
    "item_cold": "Item cold-start (train users, new items)",
    "user_item_cold": "User and item cold-start (new users, new items)",
}
TABLE_METRICS = METRIC_NAMES
PLOT_METRICS = ("mae", "ndcg@3")


def _format_value(scores: dict, metric: str) -> str:
    value = scores.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    std = scores.get(f"{metric}_std")
    if std and std > 0:
        return f"{value:.4f} ± {std:.4f}"
    return f"{value:.4f}"


def _kind(document: dict, method: str) -> str:
    return document.get("methods", {}).get(method, {}).get("kind", "baseline")


def _ordered_methods(document: dict, scores: dict) -> list[str]:
    """Meta-learned methods first, then baselines, each in document order."""
    names = list(scores)
    return [n for n in names if _kind(document, n) == "meta"] + [
        n for n in names if _kind(document, n) != "meta"
    ]


def render_markdown(document: dict, plot_file: str | None = "kshot.png") -> str:
    """Renders the evaluation document as a Markdown report.

    Args:
        document: Evaluation document (see ``docs/ARCHITECTURE.md``).
        plot_file: Relative path of the K-shot plot to embed as an image link; None embeds none.

    Returns:
        The Markdown text: a summary (best meta-learned model vs best baseline per scenario), one
        table per scenario, and the K-shot table and plot.
    """
    from metarec.selection import best_methods

    seeds = document.get("seeds", [])
    lines = [
        f"# MetaRec evaluation: {document.get('dataset', 'unknown data set')}",
        "",
        f"Seeds: {', '.join(str(s) for s in seeds) or 'n/a'}"
        + (" (mean ± std over seeds)" if len(seeds) > 1 else "")
        + ". MAE/RMSE over all query ratings; nDCG@k ranks each user's query items (gain 2^r - 1) and "
        "averages over users. Baselines are fitted on train users' support ratings only and tuned on "
        "validation users.",
        "",
    ]
    if any(info.get("kind") == "reference" for info in document.get("methods", {}).values()):
        lines += [
            "Methods of kind `reference` are established library models (scikit-surprise, LightFM) shown for "
            "comparison, never served: each is retrained from scratch with every observed support rating of "
            "the users it scores (a full retrain per scenario and K), a cost the meta-learners do not pay.",
            "",
        ]
    scenarios = document.get("scenarios", {})
    ordered = [s for s in SCENARIO_ORDER if s in scenarios] + [
        s for s in scenarios if s not in SCENARIO_ORDER
    ]

    metric = document.get("selection_metric", "ndcg@3")
    higher = higher_is_better(metric)
    lines += [
        "## Summary",
        "",
        f"The meta-learner of each row is the one best by {metric} on the validation users; the other "
        "method is the strongest on the row's own (test) users, so the comparison is not flattered by "
        "choosing on the figures it reports.",
        "",
        f"| scenario | meta-learner, chosen on validation ({metric}) | strongest other ({metric}) | meta wins |",
    ]
    lines.append("|---|---|---|---|")
    for scenario in ordered:
        meta, baseline = best_methods(document, metric, scenario)
        if meta is None or baseline is None or meta not in scenarios[scenario]:
            meta_cell = meta or "none (no validation scores)"
            lines.append(f"| {scenario} | {meta_cell} | {baseline or 'none evaluated'} | n/a |")
            continue
        meta_scores, base_scores = scenarios[scenario][meta], scenarios[scenario][baseline]
        wins_metric = (meta_scores[metric] > base_scores[metric]) == higher and (
            meta_scores[metric] != base_scores[metric]
        )
        wins_mae = meta_scores["mae"] < base_scores["mae"]
        lines.append(
            f"| {scenario} | {meta}: {meta_scores[metric]:.4f} (MAE {meta_scores['mae']:.4f}) "
            f"| {baseline}: {base_scores[metric]:.4f} (MAE {base_scores['mae']:.4f}) "
            f"| {metric}: {'yes' if wins_metric else 'NO'}, MAE: {'yes' if wins_mae else 'NO'} |"
        )
    lines.append("")

    for scenario in ordered:
        scores = scenarios[scenario]
        lines += [f"## {SCENARIO_TITLES.get(scenario, scenario)}", ""]
        lines.append("| method | kind | " + " | ".join(TABLE_METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(TABLE_METRICS))
        for method in _ordered_methods(document, scores):
            cells = " | ".join(_format_value(scores[method], m) for m in TABLE_METRICS)
            lines.append(f"| {method} | {_kind(document, method)} | {cells} |")
        lines.append("")

    for scenario, curves in document.get("kshot", {}).items():
        shots = sorted({int(k) for per_method in curves.values() for k in per_method})
        lines += [f"## K-shot curve ({scenario}): MAE / nDCG@3 with K support ratings", ""]
        lines.append("| method | " + " | ".join(f"K={k}" for k in shots) + " |")
        lines.append("|---|" + "---|" * len(shots))
        for method in _ordered_methods(document, curves):
            cells = []
            for k in shots:
                point = curves[method].get(str(k), {})
                cells.append(f"{point.get('mae', math.nan):.3f} / {point.get('ndcg@3', math.nan):.3f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if plot_file and document.get("kshot"):
        lines += [f"![K-shot curves]({plot_file})", ""]
    return "\n".join(lines)


def plot_kshot(document: dict, path: str | Path, metrics: tuple[str, ...] = PLOT_METRICS) -> Path | None:
    """Draws the K-shot curves (one panel per metric and scenario, one line per method) as a PNG.

    Args:
        document: Evaluation document with a ``kshot`` section.
        path: Output PNG path (parent directories are created).
        metrics: Metrics to plot, one panel each.

    Returns:
        The written path, or None when the document has no K-shot curves.
    """
    curves_by_scenario = document.get("kshot", {})
    if not curves_by_scenario:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(scenario, metric) for scenario in curves_by_scenario for metric in metrics]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (scenario, metric) in zip(axes[0], panels, strict=True):
        curves = curves_by_scenario[scenario]
        for method in _ordered_methods(document, curves):
            shots = sorted(curves[method], key=int)
            values = [curves[method][k].get(metric, math.nan) for k in shots]
            style = "-o" if _kind(document, method) == "meta" else "--s"
            axis.plot([int(k) for k in shots], values, style, label=method, markersize=4)
        axis.set_xscale("log")
        all_shots = sorted({int(k) for method in curves for k in curves[method]})
        axis.set_xticks(all_shots, [str(k) for k in all_shots])
        axis.minorticks_off()
        axis.set_xlabel("K (support ratings)")
        axis.set_ylabel(metric)
        axis.set_title(f"{scenario}: {metric}")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(document: dict, output_dir: str | Path) -> dict[str, str]:
    """Writes ``report.md`` and ``kshot.png`` for an evaluation document.

    Args:
        document: Evaluation document.
        output_dir: Directory to write into (created if missing).

    Returns:
        ``{"report": path of report.md, "plot": path of kshot.png or "" when there is no curve}``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_kshot(document, output_dir / "kshot.png")
    report = output_dir / "report.md"
    report.write_text(render_markdown(document, "kshot.png" if plot else None))
    return {"report": str(report), "plot": str(plot) if plot else ""}
