"""A real fast-adapt round trip against a running server (the last step of ``make demo``).

It plays a new user who loves one genre and dislikes the rest: the support set rates items of the
catalogue's most common genre at the top of the scale and other items at the bottom. It asks the
recommend endpoint (no adaptation, prior from features alone) and the fast-adapt endpoint for the
same top-k, and shows how much of each list belongs to that genre.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd

GENRE_FEATURE = "genres"


def read_catalogue(archive_dir: Path, model_name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Reads the item table and the feature schema packed into the served ``.mar``.

    Args:
        archive_dir: The archive directory (``model-store/<model_name>.mar``).
        model_name: Name of the served model.

    Returns:
        ``(items, schema)``: raw item ids with their raw features, and ``schema.json``.
    """
    with zipfile.ZipFile(archive_dir / "model-store" / f"{model_name}.mar") as archive:
        items = pd.read_parquet(io.BytesIO(archive.read("items.parquet")))
        schema = json.loads(archive.read("schema.json"))
    return items, schema


def genre_lover_support(
    items: pd.DataFrame, schema: dict[str, Any], per_side: int = 10
) -> tuple[str, list[dict[str, Any]]]:
    """Builds the support set of a user who rates one genre high and everything else low.

    Args:
        items: Item table from the archive (``item_id`` and a ``|``-joined ``genres`` column).
        schema: Feature schema (rating range).
        per_side: Ratings given to items in the genre, and again to items outside it.

    Returns:
        ``(genre, support)`` with support entries ``{"item_id", "rating"}``.

    Raises:
        ValueError: The catalogue has no genre feature to build the demo from.
    """
    if GENRE_FEATURE not in items.columns:
        raise ValueError(f"the served catalogue has no '{GENRE_FEATURE}' feature to build the demo user from")
    labels = items[GENRE_FEATURE].fillna("").str.split("|")
    counts = labels.explode().loc[lambda s: (s != "") & (s != "unknown")].value_counts()
    genre = str(counts.index[0])
    in_genre = labels.apply(lambda ls: genre in ls)
    loved = items.loc[in_genre, "item_id"].astype(str).head(per_side)
    disliked = items.loc[~in_genre, "item_id"].astype(str).head(per_side)
    top, bottom = float(schema["rating_max"]), float(schema["rating_min"])
    support = [{"item_id": i, "rating": top} for i in loved] + [
        {"item_id": i, "rating": bottom} for i in disliked
    ]
    return genre, support


def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{url} answered {error.code}: {error.read().decode(errors='replace')}") from error


def run_demo_request(workdir: str | Path, k: int = 10) -> dict[str, Any]:
    """Sends the genre lover's support set to the fast-adapt endpoint of the server in ``workdir``.

    Args:
        workdir: Work directory of a server started by ``metarec serve``.
        k: Items to rank.

    Returns:
        ``{"genre", "request", "unadapted", "adapted", "genre_share_before", "genre_share_after"}``:
        the adapt request sent, both answers, and the share of the genre in each top-k.
    """
    from metarec.serve_local import read_server_info

    info, archive_dir = read_server_info(workdir)
    items, schema = read_catalogue(archive_dir, info.model_name)
    genre, support = genre_lover_support(items, schema)
    exclude = [entry["item_id"] for entry in support]
    base = f"{info.inference_url}/predictions/{info.model_name}"
    unadapted = _post(base, {"user": {}, "k": k, "exclude": exclude}, info.inference_headers())
    adapt_request = {"user": {}, "support": support, "k": k}
    version = unadapted.get("model_version", "1.0")
    adapted = _post(f"{base}/{version}/adapt", adapt_request, info.inference_headers())
    genres_of = dict(
        zip(items["item_id"].astype(str), items[GENRE_FEATURE].fillna("").str.split("|"), strict=True)
    )

    def share(answer: dict[str, Any]) -> float:
        ranked = [entry["item_id"] for entry in answer["items"]]
        return sum(genre in genres_of[item] for item in ranked) / max(len(ranked), 1)

    return {
        "genre": genre,
        "request": {"url": f"{base}/{version}/adapt", "body": adapt_request},
        "unadapted": unadapted,
        "adapted": adapted,
        "genre_share_before": share(unadapted),
        "genre_share_after": share(adapted),
    }


def format_demo(result: dict[str, Any]) -> str:
    """Renders the demo round trip for a terminal.

    Args:
        result: What :func:`run_demo_request` returned.

    Returns:
        Several lines: the request, the adapted answer as JSON, the top items by title (when the
        catalogue has display fields) and the genre shift.
    """
    adapted = result["adapted"]
    support = result["request"]["body"]["support"]
    readable = [
        f"  {entry['score']:.2f}  {_title(entry)}" for entry in adapted["items"][:10] if "title" in entry
    ]
    return "\n".join(
        [
            f"POST {result['request']['url']}  ({len(support)} support ratings: "
            f"'{result['genre']}' items rated high, other items low)",
            json.dumps(adapted),
            *readable,
            f"support loss {adapted['support_loss_before']:.3f} -> {adapted['support_loss_after']:.3f} "
            f"after {adapted['steps']} inner steps",
            f"share of '{result['genre']}' in the top {len(adapted['items'])}: "
            f"{result['genre_share_before']:.0%} without adaptation -> {result['genre_share_after']:.0%} adapted",
        ]
    )


def _title(entry: dict[str, Any]) -> str:
    """An item's title with its year, e.g. ``Toy Story (1995)`` (display fields of the answer)."""
    year = entry.get("year")
    if isinstance(year, float) and year.is_integer():
        year = int(year)
    title = str(entry["title"])
    return title if year is None or str(year) in title else f"{title} ({year})"
