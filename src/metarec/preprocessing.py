"""Preprocessing: raw ratings -> indexed, split, feature-encoded few-shot task tables.

``run_preprocessing`` reads a data set (or generates the embedded synthetic one), splits users into
train / val / test and items into warm / cold, filters users, assigns every kept rating a role
(support / query / cold_query / unused) and writes ``schema.json``, ``users.parquet``,
``items.parquet`` and ``interactions.parquet`` (layout in docs/ARCHITECTURE.md).

Everything that is fitted (vocabularies, numeric mean/std, the global mean) uses train users and warm
items only, so validation and test users never leak into the model inputs. Ratings stay in compact
numpy arrays throughout, so tens of millions of ratings preprocess on one node.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from metarec import storage
from metarec.data.config import DatasetConfig, dataset_config_location, load_dataset_config
from metarec.data.loaders import RawData, dense_codes, load_raw
from metarec.features import FeatureEncoder, vector_column
from metarec.settings import Settings
from metarec.text_features import tag_texts, text_vectors

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROLES = ("support", "query", "cold_query", "unused")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class PreprocessSettings(Settings):
    """The ``preprocess`` section of a run config: splits, task sizes and K-shot sizes."""

    section = "preprocess"
    # "random": seeded random user split; "time": users ordered by their first rating's time.
    user_split: Literal["random", "time"] = "random"
    # train / val / test fractions of the kept users.
    split_fractions: tuple[float, ...] = (0.7, 0.1, 0.2)
    # "date": the newest items (by release date) are cold; "count": items with few ratings are cold.
    item_split: Literal["date", "count"] = "date"
    # date split: fraction of the catalogue that is cold.
    cold_item_fraction: float = 0.2
    # count split: items with at most this many ratings are cold.
    cold_max_ratings: int = 5
    # users with fewer / more ratings than this are not tasks (neither evaluated nor validated on).
    min_ratings: int = 13
    max_ratings: int = 100
    # users with more than max_ratings ratings: "train" keeps them as meta-training users only (their
    # ratings teach the item side and they add training tasks, capped at max_ratings rows); "drop"
    # discards them. Validation and test users always have min_ratings..max_ratings ratings.
    users_over_max: Literal["train", "drop"] = "train"
    # warm ratings per user held out as the query set; cold-item ratings per user held out as cold_query.
    query_size: int = 10
    cold_query_size: int = 10
    # support-set sizes evaluated (support rows with kshot_rank < K).
    kshots: tuple[int, ...] = (1, 3, 5, 10, 20)
    seed: int = 0

    def validate(self) -> None:
        """Checks ranges the field types cannot express, naming the key."""

        def fail(key: str, why: str) -> ValueError:
            return ValueError(f"preprocess settings: {key}={getattr(self, key)!r}: {why}")

        fractions = self.split_fractions
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise fail(
                "split_fractions", "expected [train, val, test] fractions >= 0 summing to 1, train > 0"
            )
        if fractions[0] <= 0:
            raise fail(
                "split_fractions", "expected [train, val, test] fractions >= 0 summing to 1, train > 0"
            )
        if not 0 <= self.cold_item_fraction < 1:
            raise fail("cold_item_fraction", "expected a number in [0, 1)")
        for key, low in (
            ("cold_max_ratings", 0),
            ("min_ratings", 1),
            ("query_size", 1),
            ("cold_query_size", 0),
        ):
            if getattr(self, key) < low:
                raise fail(key, f"expected an integer >= {low}")
        if self.max_ratings < self.min_ratings:
            raise fail("max_ratings", "expected an integer >= min_ratings")
        if not self.kshots or any(k < 1 for k in self.kshots):
            raise fail("kshots", "expected a non-empty list of positive integers")


DEFAULTS: dict[str, Any] = PreprocessSettings().to_dict()


def resolve_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Fills defaults and validates a preprocessing config (:class:`PreprocessSettings`).

    Args:
        config: overrides of ``DEFAULTS`` (None = all defaults).

    Returns:
        The full config as a dict, ``kshots`` sorted and unique.

    Raises:
        ValueError: an unknown key or an invalid value, naming the key.
    """
    full = PreprocessSettings.from_dict(config).to_dict()
    full["kshots"] = sorted(set(full["kshots"]))
    return full


def _check_fits_dataset(cfg: dict[str, Any], dataset: DatasetConfig) -> None:
    """Raises when a setting asks for data the data set does not declare (it would be ignored)."""
    if cfg["user_split"] == "time" and not dataset.ratings.timestamp:
        raise ValueError(
            f"preprocess config: user_split='time' needs a timestamp column (ratings.timestamp) in "
            f"dataset config {dataset.source}; use user_split: random"
        )


def _cold_items(
    raw: RawData, item_idx_of_rating: np.ndarray, cfg: dict[str, Any], counts: dict[str, int]
) -> np.ndarray:
    """Boolean cold flag per item (item_idx order = items sorted by raw id); counts undated items."""
    items = raw.items
    n_items = len(items)
    if cfg["item_split"] == "count":
        counts = np.bincount(item_idx_of_rating, minlength=n_items)
        return counts <= cfg["cold_max_ratings"]
    if "release" not in items.columns:
        raise ValueError(
            f"preprocess config: item_split='date' needs an item feature parsed from a date or a title "
            f"(parse: date_year | title_year) in dataset config {raw.config.source}; use item_split: count"
        )
    release = items["release"].to_numpy(dtype=np.float64)
    known = np.flatnonzero(~np.isnan(release))
    counts["items_without_release"] = int(n_items - known.size)
    wanted = int(round(cfg["cold_item_fraction"] * n_items))
    n_cold = min(wanted, known.size)
    if n_cold < wanted:  # only dated items can be the newest: say so rather than split fewer silently
        if n_cold == 0:
            raise ValueError(
                f"preprocess config: item_split='date' found no release date or year in any of the "
                f"{n_items} items of {raw.config.items.file}, so no item can be cold; use item_split: count"
            )
        log.warning("item_split=date: %d of %d items have no release date or year; %d cold items instead "
                    "of the %d asked for (cold_item_fraction=%g)", counts["items_without_release"], n_items,
                    n_cold, wanted, cfg["cold_item_fraction"])  # fmt: skip
    # Newest first; ties broken by the larger raw id (added later to the catalogue).
    newest = known[np.lexsort((-items["item_id"].to_numpy()[known], -release[known]))]
    cold = np.zeros(n_items, dtype=bool)
    cold[newest[:n_cold]] = True
    return cold


def _split_users(
    n_users: int, first_time: np.ndarray, cfg: dict[str, Any], rng: np.random.Generator
) -> np.ndarray:
    """Split code per user (0 train, 1 val, 2 test)."""
    if cfg["user_split"] == "random":
        order = rng.permutation(n_users)
    else:
        order = np.lexsort((np.arange(n_users), first_time))  # earliest users train, latest test
    train_f, val_f, _ = cfg["split_fractions"]
    n_train = int(round(train_f * n_users))
    n_val = min(int(round(val_f * n_users)), n_users - n_train)
    split = np.full(n_users, 2, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train : n_train + n_val]] = 1
    return split


def _training_tags(
    tags: pd.DataFrame,
    heldout_user_ids: np.ndarray,
    query_pairs: pd.DataFrame,
    warm_item_ids: np.ndarray,
) -> pd.DataFrame:
    """The tags the model may see: only what training sees, so no evaluated rating leaks through a tag.

    A tag counts when its user is not a validation or test user, its item is warm (a cold item is new:
    nobody has tagged it yet, and a train user's tag on it would hint at that user's item-cold query
    rating) and the (user, item) pair is not one of a train user's held-out query ratings.
    """
    keep = ~tags["user_id"].isin(heldout_user_ids) & tags["item_id"].isin(warm_item_ids)
    pair = pd.MultiIndex.from_arrays([tags["user_id"], tags["item_id"]])
    held_out = pd.MultiIndex.from_arrays([query_pairs["user_id"], query_pairs["item_id"]])
    keep &= ~pair.isin(held_out)
    return tags[keep.to_numpy()]


def _add_text_features(
    raw: RawData,
    item_table: pd.DataFrame,
    cold: np.ndarray,
    tags: pd.DataFrame | None,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Writes each text feature's full text and vectors into ``item_table``; returns encoder descriptions."""
    described: dict[str, dict[str, Any]] = {}
    by_item = tag_texts(tags) if tags is not None else {}
    item_ids = raw.items["item_id"].to_numpy()
    for spec in raw.config.items.features:
        if spec.kind != "text":
            continue
        texts = [str(t) if isinstance(t, str) else "" for t in raw.items[spec.name].tolist()]
        if spec.tags:
            texts = [
                ". ".join(p for p in (t, by_item.get(int(i), "")) if p)
                for t, i in zip(texts, item_ids, strict=True)
            ]
        vectors, described[spec.name] = text_vectors(spec, texts, ~cold, seed)
        item_table[spec.name] = texts
        item_table[vector_column(spec.name)] = list(vectors)
    return described


def _dictionary(codes: np.ndarray, labels: tuple[str, ...]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int8)), pa.array(list(labels)))


def preprocess_raw(raw: RawData, config: dict[str, Any] | None, output_dir: str | Path) -> dict[str, Any]:
    """Preprocesses an already loaded RawData into ``output_dir`` (a local directory).

    Args:
        raw: the validated raw data set; its ``ratings`` table is consumed (set to None) to keep the
            peak memory down on large data sets.
        config: preprocessing config (see ``DEFAULTS``).
        output_dir: local directory to write into (created).

    Returns:
        The summary dict returned by ``run_preprocessing``.
    """
    cfg = resolve_config(config)
    _check_fits_dataset(cfg, raw.config)
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Independent streams for the user split and the roles, so each is reproducible on its own.
    split_rng, role_rng = np.random.default_rng(cfg["seed"]).spawn(2)
    counts: dict[str, int] = dict(raw.counts)

    items = raw.items.sort_values("item_id", kind="stable").reset_index(drop=True)
    raw.items = items
    ratings = raw.ratings
    raw.ratings = None  # released: the arrays below replace it (keeps the peak memory down at scale)
    item_ids = items["item_id"].to_numpy()
    item_of_rating = _index_of(item_ids, ratings["item_id"].to_numpy())
    cold = _cold_items(raw, item_of_rating, cfg, counts)
    rating_cold = cold[item_of_rating]

    # Filter users by their rating counts.
    raw_user_ids, user_code = dense_codes(ratings["user_id"].to_numpy())
    per_user = np.bincount(user_code, minlength=len(raw_user_ids))
    warm_per_user = per_user - np.bincount(user_code[rating_cold], minlength=len(raw_user_ids))
    too_few = per_user < cfg["min_ratings"]
    too_many = per_user > cfg["max_ratings"]
    too_few_warm = ~too_few & ~too_many & (warm_per_user < cfg["query_size"] + 1)
    task_user = ~(too_few | too_many | too_few_warm)
    # Heavy users train only; two warm ratings make the smallest training task (one support, one query).
    extra_train = (
        too_many & (warm_per_user >= 2) if cfg["users_over_max"] == "train" else np.zeros_like(too_many)
    )
    keep_user = task_user | extra_train
    counts.update(
        users_read=int(len(raw_user_ids)),
        users_dropped_too_few_ratings=int(too_few.sum()),
        users_dropped_too_many_ratings=int((too_many & ~extra_train).sum()),
        users_dropped_too_few_warm_ratings=int(too_few_warm.sum()),
        users_kept=int(keep_user.sum()),
        users_kept_over_max_for_training=int(extra_train.sum()),
    )
    if not task_user.any():
        raise ValueError(
            f"no user has between {cfg['min_ratings']} and {cfg['max_ratings']} ratings with at least "
            f"{cfg['query_size'] + 1} of warm items; counts: {counts}"
        )
    new_index = np.full(len(raw_user_ids), -1, dtype=np.int64)
    new_index[keep_user] = np.arange(int(keep_user.sum()))
    kept_ids = raw_user_ids[keep_user]
    n_users = len(kept_ids)
    is_extra = extra_train[keep_user]
    del task_user, extra_train

    # Roles: a seeded random rank within each user's warm pool and cold pool. One sort of a composite
    # key (user, cold, random 32 bits) groups the rows by user and shuffles them within each pool.
    user_idx_all = new_index[user_code]
    del user_code
    kept_rows = np.flatnonzero(user_idx_all >= 0)
    counts["ratings_dropped_with_users"] = int(len(user_idx_all) - len(kept_rows))
    sort_key = user_idx_all[kept_rows] << 33
    del user_idx_all
    sort_key |= rating_cold[kept_rows].astype(np.int64) << 32
    del rating_cold
    sort_key |= role_rng.integers(0, 1 << 32, len(kept_rows), dtype=np.int64)
    order = np.argsort(sort_key)
    sort_key = sort_key[order]
    order = kept_rows[order]
    del kept_rows
    user_idx = (sort_key >> 33).astype(np.int32)
    row_cold = ((sort_key >> 32) & 1).astype(bool)
    del sort_key
    item_idx = item_of_rating[order]
    del item_of_rating
    rating = ratings["rating"].to_numpy()[order]
    timestamp = ratings["timestamp"].to_numpy()[order]
    del order, ratings
    group = user_idx.astype(np.int64) * 2 + row_cold
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    del group
    rank = np.arange(len(user_idx), dtype=np.int64)
    rank -= np.repeat(starts, np.diff(np.r_[starts, len(user_idx)]))

    # User split (rows are grouped by user now, so per-user minima are one reduceat).
    user_starts = np.flatnonzero(np.r_[True, user_idx[1:] != user_idx[:-1]])
    first_time = np.minimum.reduceat(timestamp, user_starts)
    # Only task users are split; extra training users are all "train" (the split of the task users
    # does not depend on whether heavy users are kept).
    user_split = np.zeros(n_users, dtype=np.int8)
    user_split[~is_extra] = _split_users(int((~is_extra).sum()), first_time[~is_extra], cfg, split_rng)
    n_per_split = {name: int((user_split == code).sum()) for code, name in enumerate(SPLITS)}
    # A split asked for but left empty fails only after training (no validation scores to select on,
    # NaN test metrics): say so here, where the cause (too few users) is known.
    empty = [
        name
        for name, fraction in zip(SPLITS, cfg["split_fractions"], strict=True)
        if fraction > 0 and n_per_split[name] == 0
    ]
    if empty:
        raise ValueError(
            f"preprocess config: split_fractions={list(cfg['split_fractions'])} of the "
            f"{int((~is_extra).sum())} task users leave no {' and no '.join(empty)} users; the data set "
            f"needs more users with {cfg['min_ratings']}..{cfg['max_ratings']} ratings (counts: {counts}), "
            f"or set those fractions to 0"
        )

    query_size, cold_query_size = cfg["query_size"], cfg["cold_query_size"]
    # Extra training users hold no query rows: every warm rating is a support (training) row, and
    # every cold-item rating is unused (they are not tasks: the item_cold scenario never scores them).
    row_query_size = np.where(is_extra[user_idx], 0, query_size)
    row_cold_query_size = np.where(is_extra[user_idx], 0, cold_query_size)
    role = np.where(
        row_cold,
        np.where(rank < row_cold_query_size, 2, 3),
        np.where(rank < row_query_size, 1, 0),
    ).astype(np.int8)
    del row_cold_query_size
    kshot_rank = np.where(role == 0, rank - row_query_size, -1).astype(np.int32)
    del row_query_size
    del rank
    row_split = user_split[user_idx]
    for code, name in enumerate(ROLES):
        counts[f"rows_{name}"] = int((role == code).sum())
    counts["interactions_written"] = int(len(role))

    # Feature vocabularies / statistics: train users and warm items only.
    train_support = (row_split == 0) & (role == 0)
    global_mean = float(rating[train_support].mean()) if train_support.any() else float(rating.mean())
    del train_support
    users = pd.DataFrame(
        {"user_idx": np.arange(n_users, dtype=np.int64), "user_id": _raw_ids(kept_ids, raw.user_vocab)}
    )
    user_specs = raw.config.users.features if raw.config.users else ()
    if raw.users is not None:
        features = raw.users.set_index("user_id").reindex(kept_ids)
        for spec in user_specs:
            users[spec.name] = features[spec.name].to_numpy()
    users["user_split"] = pd.Categorical.from_codes(user_split, SPLITS)
    warm_idx = np.zeros(len(items), dtype=np.int64)
    warm_idx[~cold] = np.arange(1, int((~cold).sum()) + 1)
    item_table = pd.DataFrame(
        {
            "item_idx": np.arange(len(items), dtype=np.int64),
            "item_id": _raw_ids(items["item_id"].to_numpy(), raw.item_vocab),
            "warm_idx": warm_idx,
            "is_cold": cold,
        }
    )
    for spec in raw.config.items.features:
        item_table[spec.name] = items[spec.name].to_numpy()
    tags = None
    if raw.tags is not None:
        query = role == 1
        tags = _training_tags(
            raw.tags,
            kept_ids[user_split != 0],
            pd.DataFrame({"user_id": kept_ids[user_idx[query]], "item_id": item_ids[item_idx[query]]}),
            item_ids[~cold],
        )
        counts["tags_used"] = int(len(tags))
    text_encoders = _add_text_features(raw, item_table, cold, tags, cfg["seed"])
    display = []
    for spec in raw.config.display:
        item_table[f"display_{spec.name}"] = items[f"display_{spec.name}"].to_numpy()
        display.append(
            {"name": spec.name, "column": f"display_{spec.name}", "source": spec.column or spec.feature}
        )
    encoder = FeatureEncoder.fit(
        users[user_split == 0] if raw.users is not None else None,
        item_table[~cold],
        user_specs,
        raw.config.items.features,
        text_encoders,
    )

    lo, hi = raw.config.ratings.rating_scale
    schema = {
        "format_version": FORMAT_VERSION,
        "dataset": raw.config.name,
        "rating_min": float(lo),
        "rating_max": float(hi),
        "rating_step": float(raw.config.ratings.rating_step),
        "user_features": encoder.schema["user_features"],
        "item_features": encoder.schema["item_features"],
        "display": display,
        "n_users": int(n_users),
        "n_items": int(len(items)),
        "n_warm_items": int((~cold).sum()),
        "global_mean": global_mean,
        "splits": {
            "users": cfg["user_split"],
            "items": cfg["item_split"],
            "seed": cfg["seed"],
            "fractions": cfg["split_fractions"],
            "cold_item_fraction": cfg["cold_item_fraction"],
            "cold_max_ratings": cfg["cold_max_ratings"],
            "n_users": n_per_split,
            "n_cold_items": int(cold.sum()),
        },
        "tasks": {
            "query_size": query_size,
            "cold_query_size": cold_query_size,
            "min_ratings": cfg["min_ratings"],
            "max_ratings": cfg["max_ratings"],
            "users_over_max": cfg["users_over_max"],
            "n_extra_train_users": int(is_extra.sum()),
            "kshots": cfg["kshots"],
        },
        "counts": counts,
    }

    interactions = pa.table(
        {
            "user_idx": pa.array(user_idx, pa.int32()),
            "item_idx": pa.array(item_idx, pa.int32()),
            "rating": pa.array(rating.astype(np.float32), pa.float32()),
            "timestamp": pa.array(timestamp.astype(np.int64), pa.int64()),
            "user_split": _dictionary(row_split, SPLITS),
            "item_cold": pa.array(row_cold, pa.bool_()),
            "role": _dictionary(role, ROLES),
            "kshot_rank": pa.array(kshot_rank, pa.int32()),
        }
    )
    pq.write_table(interactions, out / "interactions.parquet", row_group_size=1 << 20)
    del interactions
    users.to_parquet(out / "users.parquet", index=False)
    item_table.to_parquet(out / "items.parquet", index=False)
    (out / "schema.json").write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - started
    log.info("preprocessed %d ratings of %d users into %s in %.1f s", len(role), n_users, out, seconds)
    return {
        "dataset": raw.config.name,
        "output_dir": str(out),
        "n_users": int(n_users),
        "n_items": int(len(items)),
        "n_warm_items": int((~cold).sum()),
        "n_interactions": int(len(role)),
        "users_per_split": n_per_split,
        "global_mean": global_mean,
        "counts": counts,
    }


def _raw_ids(ids: np.ndarray, vocab: np.ndarray | None) -> np.ndarray:
    """The source data's id strings: what clients send at serving time (codes mapped back, if any)."""
    return (vocab[ids] if vocab is not None else ids).astype(str)


def _index_of(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in ``sorted_ids`` (all must be present), int32; a lookup table when compact."""
    low, high = int(sorted_ids[0]), int(sorted_ids[-1])
    if high - low <= 4 * len(sorted_ids) + 1_000_000:
        table = np.zeros(high - low + 1, dtype=np.int32)
        table[sorted_ids - low] = np.arange(len(sorted_ids), dtype=np.int32)
        return table[ids - low]
    return np.searchsorted(sorted_ids, ids).astype(np.int32)


def _synthetic_preset(data_uri: str) -> str | None:
    if data_uri == "synthetic":
        return "default"
    if data_uri.startswith("synthetic:"):
        from metarec.data.synthetic import PRESETS

        preset = data_uri.split(":", 1)[1]
        if preset not in PRESETS:  # before the cache key is made of it, not only when generating
            raise ValueError(
                f"unknown synthetic preset {preset!r} in {data_uri!r}; choose one of {sorted(PRESETS)}"
            )
        return preset
    return None


def data_fingerprint(data_uri: str, dataset_config: str = "") -> str:
    """Fingerprints what a preprocessing run would read: the cache key of the preprocess step.

    KFP caches a step on its inputs; a recurring run over a refreshed ``gs://`` prefix, or over a data-set
    config (or a sentence-embedding model it names) edited in place, has the same strings, so this value
    (object generations and crc32c, file checksums) is passed in as well.

    Args:
        data_uri: As for :func:`run_preprocessing`.
        dataset_config: As for :func:`run_preprocessing`; empty: the shipped default, part of the image.

    Returns:
        For the data alone: the synthetic preset's name for generated data, else ``storage.fingerprint``
        of the data. With a config: ``sha256:<hex>`` over that, the config's content and the content of
        every model folder it names.

    Raises:
        StorageError: Nothing at ``data_uri`` or at a model folder the config names.
        ValueError: An unknown or invalid data-set config.
    """
    preset = _synthetic_preset(str(data_uri))
    data = f"synthetic:{preset}" if preset is not None else storage.fingerprint(data_uri)
    if not dataset_config:
        return data
    import hashlib

    name = str(dataset_config)
    parts = {"data": data, "config": storage.fingerprint(dataset_config_location(name))}
    dataset = load_dataset_config(name)
    for table in (dataset.items, dataset.users):
        for spec in table.features if table is not None else ():
            if spec.model:
                parts[f"model:{spec.model}"] = storage.fingerprint(spec.model)
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run_preprocessing(
    data_uri: str, dataset_config: str | None, config: dict[str, Any] | None, output_dir: str
) -> dict[str, Any]:
    """Reads a data set and writes the preprocessed task tables.

    Args:
        data_uri: a local directory or ``gs://`` prefix with the raw files; ``"synthetic"`` or
            ``"synthetic:tiny"`` generate the embedded synthetic data set instead.
        dataset_config: config path or shipped name (default: ``synthetic`` for synthetic data,
            ``movielens-100k`` otherwise).
        config: preprocessing settings overriding ``DEFAULTS``; unknown keys raise ValueError.
        output_dir: local directory or ``gs://`` prefix to write schema.json, users.parquet,
            items.parquet and interactions.parquet into.

    Returns:
        Summary: dataset, output_dir, n_users, n_items, n_warm_items, n_interactions, users_per_split,
        global_mean and counts (rows kept / dropped, duplicates dropped, users dropped by reason).

    Raises:
        ValueError: invalid config or invalid input data (naming file, column and row).
    """
    cfg = resolve_config(config)  # fail on a bad config before reading anything
    data_uri = str(data_uri)
    preset = _synthetic_preset(data_uri)
    dataset = load_dataset_config(dataset_config or ("synthetic" if preset else "movielens-100k"))
    _check_fits_dataset(cfg, dataset)
    output = str(output_dir)
    with tempfile.TemporaryDirectory(prefix="metarec-pre-") as tmp:
        if preset is not None:
            from metarec.data.synthetic import generate_synthetic

            source = generate_synthetic(Path(tmp) / "raw", preset=preset)
            raw = load_raw(source, dataset)
        else:
            raw = load_raw(data_uri, dataset)
        with storage.local_output(output) as local_out:
            summary = preprocess_raw(raw, config, local_out)
        summary["output_dir"] = output
        return summary
