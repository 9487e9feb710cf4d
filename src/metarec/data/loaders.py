"""Reading and validating raw rating data sets described by a DatasetConfig.

The ratings file is read by ``ratings``. Users, items and tags tables are small and read whole with
the csv module (or pandas for Parquet). Text decoding and row splitting are in ``delimited``, id
checks both share in ``ids``, the error naming the file, column and row in ``errors``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.data.config import (
    DatasetConfig,
    DisplaySpec,
    EntityConfig,
    FeatureSpec,
    TableConfig,
    TagsConfig,
    load_dataset_config,
)
from metarec.data.delimited import _data_rows, _header_names
from metarec.data.errors import _bad
from metarec.data.ids import _STRING_IDS_HINT, _compact_ids, _nonempty_ids, dense_codes
from metarec.data.ratings import drop_duplicates_keep_latest, read_ratings
from metarec.features import canonical_text

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
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


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


def _read_csv_table(path: Path, table: TableConfig) -> pd.DataFrame:
    """All fields as strings; every data row must have exactly one field per column."""
    names = _header_names(path, table)
    rows = list(_data_rows(path, table, len(names)))
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    return pd.DataFrame(
        {name: pd.Series(values, dtype=object) for name, values in zip(names, columns, strict=True)}
    )


def _read_table(path: Path, table: TableConfig) -> pd.DataFrame:
    """A users, items or tags table with every value as a string ("" when missing).

    Raises:
        ValueError: missing file, no header row, or a row with the wrong number of fields.
    """
    if not path.is_file():
        raise ValueError(f"{path.name}: file not found at {path}")
    if table.format == "parquet":
        frame = pd.read_parquet(path)
        # pandas stores integers with gaps as floats: 3.0 must read "3", as a request's 3 is encoded.
        return frame.astype(object).where(frame.notna(), None).map(lambda v: canonical_text(v) or "")
    return _read_csv_table(path, table)


def _int_ids(frame: pd.DataFrame, file: str, column: str) -> np.ndarray:
    """An integer id column (repeats allowed), raising on the first non-integer row."""
    text = frame[column].astype(str).str.strip()
    parsed = pd.to_numeric(text, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy() | (parsed != np.round(parsed)).to_numpy())
    if bad.size:
        i = int(bad[0])
        raise _bad(file, column, i + 1, f"non-numeric id {text.iloc[i]!r} ({_STRING_IDS_HINT})")
    return parsed.to_numpy().astype(np.int64)


def _text_ids(frame: pd.DataFrame, file: str, column: str) -> np.ndarray:
    """A string id column (``id_type: string``; repeats allowed), stripped, raising on an empty id."""
    return _nonempty_ids(frame[column], file, column, 1)


def _parse_ids(frame: pd.DataFrame, file: str, column: str, string_ids: bool = False) -> np.ndarray:
    ids = _text_ids(frame, file, column) if string_ids else _int_ids(frame, file, column)
    duplicated = np.flatnonzero(pd.Series(ids).duplicated().to_numpy())
    if duplicated.size:
        i = int(duplicated[0])
        raise _bad(
            file, column, i + 1, f"duplicate id {ids[i]!r}" if string_ids else f"duplicate id {ids[i]}"
        )
    return ids


def _parse_date(text: str) -> dt.date | None:
    for fmt in ("%d-%b-%Y", "%Y-%m-%d", "%Y"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def _feature_values(frame: pd.DataFrame, spec: FeatureSpec, file: str) -> tuple[pd.Series, pd.Series | None]:
    """Raw values of one feature, plus a release key (float year) for date/title-parsed features."""
    if spec.kind in ("categorical", "hashed"):
        text = frame[spec.column].astype(str).str.strip()
        return text.where(text != "", None).astype(object), None
    if spec.kind == "text":
        parts = [frame[column].astype(str).str.strip().tolist() for column in spec.columns]
        joined = [". ".join(p for p in row if p) for row in zip(*parts, strict=True)] if parts else []
        return pd.Series(joined or [""] * len(frame), index=frame.index, dtype=object), None
    if spec.kind == "multi_hot":
        if spec.columns:
            flags = []
            for column, label in zip(spec.columns, spec.labels, strict=True):
                text = frame[column].astype(str).str.strip()
                value = pd.to_numeric(text.where(text != "", "0"), errors="coerce")
                bad = np.flatnonzero(~value.isin([0, 1]).to_numpy())
                if bad.size:
                    i = int(bad[0])
                    raise _bad(file, column, i + 1, f"flag must be 0 or 1, got {text.iloc[i]!r}")
                flags.append(np.where(value.to_numpy() == 1, label, ""))
            joined = ["|".join(x for x in row if x) for row in zip(*flags, strict=True)] if flags else []
            return pd.Series(joined, index=frame.index, dtype=object), None
        sep = spec.sep or "|"
        joined = [
            "|".join(p.strip() for p in str(v).split(sep) if p.strip()) for v in frame[spec.column].tolist()
        ]
        return pd.Series(joined, index=frame.index, dtype=object), None
    # numeric
    text = frame[spec.column].astype(str).str.strip()
    if spec.parse == "date_year":
        dates = [_parse_date(t) if t else None for t in text.tolist()]
        for i, (t, d) in enumerate(zip(text.tolist(), dates, strict=True)):
            if t and d is None:
                raise _bad(file, spec.column, i + 1, f"unparseable date {t!r} (expected like 01-Jan-1995)")
        years = [float(d.year) if d else np.nan for d in dates]
        release = [d.year + (d.timetuple().tm_yday - 1) / 366.0 if d else np.nan for d in dates]
        return pd.Series(years, index=frame.index), pd.Series(release, index=frame.index)
    if spec.parse == "title_year":
        years = [float(m.group(1)) if (m := _TITLE_YEAR.search(t)) else np.nan for t in text.tolist()]
        series = pd.Series(years, index=frame.index)
        return series, series.copy()
    value = pd.to_numeric(text.where(text != "", None), errors="coerce")
    bad = np.flatnonzero(value.isna().to_numpy() & (text != "").to_numpy())
    if bad.size:
        i = int(bad[0])
        raise _bad(file, spec.column, i + 1, f"non-numeric value {text.iloc[i]!r}")
    return value.astype(float), None


def _display_values(frame: pd.DataFrame, out: pd.DataFrame, spec: DisplaySpec, table: EntityConfig) -> list:
    """Values of one display field: readable text, a list of labels, or a number (None when missing)."""
    if spec.column:
        return [t or None for t in frame[spec.column].astype(str).str.strip().tolist()]
    feature = next(f for f in table.features if f.name == spec.feature)
    values = out[feature.name].tolist()
    if feature.kind == "multi_hot":
        return [[label for label in str(v).split("|") if label] for v in values]
    if feature.kind == "numeric":
        return [None if pd.isna(v) else (int(v) if float(v).is_integer() else float(v)) for v in values]
    return [v if v not in ("", None) else None for v in values]


def read_entities(
    path: Path,
    table: EntityConfig,
    id_name: str,
    display: tuple[DisplaySpec, ...] = (),
    string_ids: bool = False,
) -> pd.DataFrame:
    """Reads a users or items table and extracts its raw feature columns.

    Args:
        path: the file.
        table: its EntityConfig.
        id_name: name of the id column in the result (``user_id`` or ``item_id``).
        display: display fields to extract (items only).
        string_ids: ids are strings (``id_type: string``), not integers.

    Returns:
        A DataFrame with ``id_name`` (int64, or stripped str with ``string_ids``), one column per feature (named as the feature), one
        ``display_<name>`` column per display field and, for items with a date- or title-parsed
        feature, ``release``.

    Raises:
        ValueError: missing or empty file, missing column, non-numeric or duplicate id, a bad feature
            value, a row with the wrong number of fields.
    """
    frame = _read_table(path, table)
    if frame.empty:  # a feature table without rows would leave every user or item featureless
        raise ValueError(f"{path.name}: no data rows")
    needed = [table.id] + [c for spec in table.features for c in spec.source_columns()]
    needed += [spec.column for spec in display if spec.column]
    for column in needed:
        if column not in frame.columns:
            raise _bad(path.name, column, None, f"missing column (file has {list(frame.columns)})")
    out = pd.DataFrame({id_name: _parse_ids(frame, path.name, table.id, string_ids)})
    release = None
    for spec in table.features:
        values, key = _feature_values(frame, spec, path.name)
        out[spec.name] = values.to_numpy()
        if key is not None and release is None:
            release = key
    for spec in display:
        out[f"display_{spec.name}"] = pd.Series(_display_values(frame, out, spec, table), dtype=object)
    if release is not None:
        out["release"] = release.to_numpy(dtype=float)
    return out


def read_tags(path: Path, table: TagsConfig, string_ids: bool = False) -> pd.DataFrame:
    """Reads a tags table (one user-applied tag per row).

    Args:
        path: the file.
        table: its TagsConfig.
        string_ids: ids are strings (``id_type: string``), not integers.

    Returns:
        ``user_id``, ``item_id`` (int64, or stripped str with ``string_ids``) and ``tag``
        (stripped); rows with an empty tag are dropped.

    Raises:
        ValueError: missing file or column, or a non-integer id (naming the file, column and row).
    """
    frame = _read_table(path, table)
    for column in (table.user, table.item, table.tag):
        if column not in frame.columns:
            raise _bad(path.name, column, None, f"missing column (file has {list(frame.columns)})")
    ids = _text_ids if string_ids else _int_ids
    tags = pd.DataFrame(
        {
            "user_id": ids(frame, path.name, table.user),
            "item_id": ids(frame, path.name, table.item),
            "tag": frame[table.tag].astype(str).str.strip().to_numpy(),
        }
    )
    return tags[tags["tag"] != ""].reset_index(drop=True)


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
