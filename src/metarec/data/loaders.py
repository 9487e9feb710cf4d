"""Reading and validating raw rating data sets described by a DatasetConfig: ``load_raw`` -> RawData.

This module assembles a data set from its files and joins them (string id codes, unknown items,
duplicate ratings); each file is read elsewhere: ``ratings`` (the ratings file), ``entities`` (users,
items, tags), ``delimited`` (text decoding and row splitting), ``ids`` and ``errors`` (shared by
them). Their public names are importable from here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.data.config import DatasetConfig, load_dataset_config
from metarec.data.entities import read_entities, read_tags
from metarec.data.ids import _compact_ids, dense_codes
from metarec.data.ratings import drop_duplicates_keep_latest, read_ratings

__all__ = [
    "RawData",
    "dense_codes",
    "drop_duplicates_keep_latest",
    "load_raw",
    "load_raw_from_dir",
    "read_entities",
    "read_ratings",
    "read_tags",
]

log = logging.getLogger(__name__)


@dataclass
class RawData:
    """A validated raw data set.

    Attributes:
        ratings: one row per kept rating with columns ``user_id`` and ``item_id`` (integer raw ids,
            or with ``id_type: string`` integer codes into ``user_vocab`` / ``item_vocab``; int32
            when they fit), ``rating`` (float32) and ``timestamp`` (int64, 0 when the data set
            has none). Duplicates (same user and item) are resolved to the latest rating; ratings of
            items missing from the items table are dropped.
        users: ``user_id`` (as in ``ratings``) plus one raw column per user feature (named as the
            feature), or None when the data set has no users table.
        items: ``item_id`` (as in ``ratings``) plus one raw column per item feature (a text
            feature: its columns joined), ``display_<name>`` per display field, and ``release``
            (float year, with the day as a fraction when a full date is known; NaN when unknown)
            when an item feature is parsed from a date or title.
        config: the data-set config used.
        counts: ``ratings_read``, ``duplicates_dropped``, ``unknown_item_ratings_dropped``,
            ``ratings_kept``, ``users_without_features``; with a tags table ``tags_read`` and
            ``unknown_item_tags_dropped``.
        tags: ``user_id``, ``item_id`` (int64, as in ``ratings``) and ``tag`` (stripped, non-empty)
            per tag of a known item, or None when the config has no tags table. Which tags may reach
            the model is decided by preprocessing (it knows the user split).
        user_vocab: with ``id_type: string``, the raw id (str) of each user code, in ascending
            string order; None when ids are integers (the id is its own code).
        item_vocab: the same for items.
    """

    ratings: pd.DataFrame
    users: pd.DataFrame | None
    items: pd.DataFrame
    config: DatasetConfig
    counts: dict[str, int] = field(default_factory=dict)
    tags: pd.DataFrame | None = None
    user_vocab: np.ndarray | None = None
    item_vocab: np.ndarray | None = None


def _codes_for_string_ids(
    arrays: dict[str, np.ndarray],
    users: pd.DataFrame | None,
    items: pd.DataFrame,
    tags: pd.DataFrame | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces string ids by integer codes in place, in every table, so they join as integer ids do.

    Item codes index the items table's ids in ascending string order (a rated or tagged item missing
    from it gets -1 and is dropped as an unknown item); user codes index every user id seen in the
    ratings, users and tags tables.

    Returns:
        (raw id of each user code, raw id of each item code).
    """
    item_vocab = np.sort(items["item_id"].to_numpy(dtype=object))
    item_index = pd.Index(item_vocab)
    items["item_id"] = item_index.get_indexer(items["item_id"])
    arrays["item"] = _compact_ids(item_index.get_indexer(arrays.pop("item_strings"))[arrays["item"]])
    rating_users = arrays.pop("user_strings")
    seen = [rating_users] + [
        frame["user_id"].to_numpy(dtype=object) for frame in (users, tags) if frame is not None
    ]
    user_vocab = np.unique(np.concatenate(seen)).astype(object)
    user_index = pd.Index(user_vocab)
    arrays["user"] = _compact_ids(user_index.get_indexer(rating_users)[arrays["user"]])
    if users is not None:
        users["user_id"] = user_index.get_indexer(users["user_id"])
    if tags is not None:
        tags["user_id"] = user_index.get_indexer(tags["user_id"])
        tags["item_id"] = item_index.get_indexer(tags["item_id"])
    return user_vocab, item_vocab


def load_raw_from_dir(data_dir: Path, config: DatasetConfig) -> RawData:
    """Reads and validates a data set from a local directory (see ``load_raw``)."""
    ratings_path = data_dir / config.ratings.file
    string_ids = config.ratings.id_type == "string"
    items = read_entities(data_dir / config.items.file, config.items, "item_id", config.display, string_ids)
    users = None
    if config.users:
        users = read_entities(data_dir / config.users.file, config.users, "user_id", string_ids=string_ids)
    tags = read_tags(data_dir / config.tags.file, config.tags, string_ids) if config.tags else None

    arrays = read_ratings(ratings_path, config.ratings)
    counts = {"ratings_read": int(len(arrays["rating"]))}
    user_vocab = item_vocab = None
    if string_ids:
        user_vocab, item_vocab = _codes_for_string_ids(arrays, users, items, tags)

    known_item = np.isin(arrays["item"], items["item_id"].to_numpy())
    unknown_items = int((~known_item).sum())
    if unknown_items == len(known_item):  # e.g. the wrong id column, or ids written differently
        raise ValueError(
            f"{ratings_path.name}: no rated item is in {config.items.file} (ratings column "
            f"{config.ratings.item!r}, items column {config.items.id!r})"
        )
    if unknown_items:
        log.warning("%s: dropped %d ratings of items missing from %s", ratings_path.name, unknown_items,
                    config.items.file)  # fmt: skip
        arrays = {key: value[known_item] for key, value in arrays.items()}
    del known_item
    counts["unknown_item_ratings_dropped"] = unknown_items

    keep, duplicates = drop_duplicates_keep_latest(arrays["user"], arrays["item"], arrays["timestamp"])
    if keep is not None:
        log.warning("%s: dropped %d duplicate (user, item) ratings, keeping the latest of each",
                    ratings_path.name, duplicates)  # fmt: skip
        arrays = {key: value[keep] for key, value in arrays.items()}
    counts["duplicates_dropped"] = duplicates
    counts["ratings_kept"] = int(len(arrays["rating"]))

    if users is not None:
        rated = np.unique(arrays["user"])
        featureless = int(np.setdiff1d(rated, users["user_id"].to_numpy()).size)
        if featureless == rated.size:
            raise ValueError(
                f"{ratings_path.name}: no rated user is in {config.users.file} (ratings column "
                f"{config.ratings.user!r}, users column {config.users.id!r})"
            )
        if featureless:
            log.warning("%s: %d of %d rated users are missing from %s (their features are missing)",
                        ratings_path.name, featureless, rated.size, config.users.file)  # fmt: skip
        counts["users_without_features"] = featureless
    ratings = pd.DataFrame(
        {
            "user_id": arrays["user"],
            "item_id": arrays["item"],
            "rating": arrays["rating"],
            "timestamp": arrays["timestamp"],
        },
        copy=False,
    )
    if tags is not None:
        known = tags["item_id"].isin(items["item_id"])
        counts["tags_read"] = int(len(tags))
        counts["unknown_item_tags_dropped"] = int((~known).sum())
        tags = tags[known].reset_index(drop=True)
    return RawData(
        ratings=ratings,
        users=users,
        items=items,
        config=config,
        counts=counts,
        tags=tags,
        user_vocab=user_vocab,
        item_vocab=item_vocab,
    )


def load_raw(data_uri: str | Path, dataset_config: str | Path | dict | DatasetConfig) -> RawData:
    """Reads and validates a raw data set.

    Args:
        data_uri: a local directory or a ``gs://`` prefix holding the files named in the config.
        dataset_config: a config path, shipped config name, mapping or DatasetConfig.

    Returns:
        The validated RawData (see its attributes). Duplicate (user, item) ratings keep the latest by
        timestamp and ratings of unknown items are dropped; both are logged and counted.

    Raises:
        ValueError: a missing file or column, a non-numeric id, a missing value, a rating out of range
            or off the rating step; the message names the file, column and first offending row.
    """
    config = load_dataset_config(dataset_config)
    uri = str(data_uri)
    if uri.startswith("gs://"):
        from metarec import storage  # lazy: only gs:// use needs the storage client

        with storage.local_copy(uri) as local_dir:
            return load_raw_from_dir(Path(local_dir), config)
    data_dir = Path(uri)
    if not data_dir.is_dir():
        raise ValueError(f"data directory {uri} does not exist")
    return load_raw_from_dir(data_dir, config)
