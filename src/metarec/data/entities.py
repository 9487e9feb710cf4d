"""Reading the users, items and tags tables and extracting their features and display fields.

The tables are small and read whole with the csv module (or pandas for Parquet), every value as a
string until its feature parses it.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.data.config import DisplaySpec, EntityConfig, FeatureSpec, TableConfig, TagsConfig
from metarec.data.delimited import _data_rows, _header_names
from metarec.data.errors import _bad
from metarec.data.ids import _STRING_IDS_HINT, _nonempty_ids
from metarec.features import canonical_text

_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


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
        values = frame[spec.column].tolist()
        joined = ["|".join(p.strip() for p in str(v).split(sep) if p.strip()) for v in values]
        if sep != "|":  # labels are kept joined by "|": one holding it would split into two labels
            piped = [i for i, v in enumerate(values) if "|" in str(v)]
            if piped:
                i = piped[0]
                raise _bad(file, spec.column, i + 1, f"label with a '|' in {values[i]!r} (sep is {sep!r})")
        return pd.Series(joined, index=frame.index, dtype=object), None
    # numeric
    text = frame[spec.column].astype(str).str.strip()
    if spec.parse == "date_year":
        dates = [_parse_date(t) if t else None for t in text.tolist()]
        for i, (t, d) in enumerate(zip(text.tolist(), dates, strict=True)):
            if t and d is None:
                raise _bad(
                    file,
                    spec.column,
                    i + 1,
                    f"unparseable date {t!r} (expected 01-Jan-1995, 1995-01-01 or 1995)",
                )
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
