"""Reading and validating the ratings file (CSV, multi-character separators, Parquet).

Ratings are streamed in chunks with pyarrow and kept as compact numpy arrays (int32 ids when they fit,
float32 ratings, int64 timestamps), so tens of millions of ratings fit in a few GB.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from metarec.data.config import RatingsConfig
from metarec.data.delimited import _data_rows, _header_names, _undecodable
from metarec.data.errors import _bad
from metarec.data.ids import _STRING_IDS_HINT, _compact_ids, _nonempty_ids, dense_codes

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_PARQUET_BATCH_ROWS = 1 << 20
_TIMESTAMP_HINT = "ratings.timestamp must hold unix seconds, or be a Parquet timestamp column"
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _numeric_column(
    values: pa.Array | pa.ChunkedArray, key: str, file: str, column: str, first_row: int
) -> np.ndarray:
    """One chunk of a column as int64 (ids, timestamps) or float64 (ratings); raises on the first bad row.

    An integer column accepts integral numbers however they are written (``7``, ``7.0``, ``7e0``).
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    noun = "id" if key in ("user", "item") else key
    kind = values.type
    if key == "timestamp" and pa.types.is_timestamp(kind):
        # A Parquet datetime column: whole unix seconds, as the CSV layouts give them (a missing one is
        # left for the integer check below to report).
        values = values.cast(pa.int64())
        if not values.null_count:
            values = pa.array(values.to_numpy() // _UNITS_PER_SECOND[kind.unit])
        kind = values.type
    text = None
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        text = values.to_numpy(zero_copy_only=False)
        stripped = pd.Series(text, dtype=object).fillna("").astype(str).str.strip()
        parsed = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64)
        missing = ((stripped == "") | stripped.str.lower().isin(["nan", "na", "null"])).to_numpy()
        nonnumeric = np.isnan(parsed) & ~missing
        bad = np.flatnonzero(missing | nonnumeric)
        if bad.size:
            i = int(bad[0])
            what = f"non-numeric {noun} {text[i]!r}" if nonnumeric[i] else "missing value (empty or NaN)"
            if nonnumeric[i] and noun == "id":
                what += f" ({_STRING_IDS_HINT})"
            elif nonnumeric[i] and key == "timestamp":
                what += f" ({_TIMESTAMP_HINT})"
            raise _bad(file, column, first_row + i, what)
        out = parsed
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        if values.null_count:
            i = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise _bad(file, column, first_row + i, "missing value (empty or NaN)")
        out = values.to_numpy(zero_copy_only=False)
        if pa.types.is_integer(kind):
            return out.astype(np.int64, copy=False)
        out = out.astype(np.float64, copy=False)
        nan = np.flatnonzero(np.isnan(out))
        if nan.size:
            raise _bad(file, column, first_row + int(nan[0]), "missing value (empty or NaN)")
    else:
        raise _bad(file, column, first_row, f"unsupported column type {kind}")
    if key != "rating":
        fractional = np.flatnonzero((out != np.round(out)) | (np.abs(out) >= 2.0**63))
        if fractional.size:
            i = int(fractional[0])
            shown = repr(text[i]) if text is not None else f"{out[i]:g}"
            if abs(out[i]) >= 2.0**63:
                why = f"{noun} {shown} is outside the 64-bit integer range"
            elif noun == "id":
                why = f"id {shown} is not an integer ({_STRING_IDS_HINT})"
            else:
                why = f"timestamp {shown} is not a whole number of seconds ({_TIMESTAMP_HINT})"
            raise _bad(file, column, first_row + i, why)
        return out.astype(np.int64)
    return out


def _rating_columns(cfg: RatingsConfig) -> list[tuple[str, str, bool]]:
    """(config key, column name, integer?) for the columns the ratings table must provide."""
    cols = [("user", cfg.user, True), ("item", cfg.item, True), ("rating", cfg.rating, False)]
    if cfg.timestamp:
        cols.append(("timestamp", cfg.timestamp, True))
    return cols


def _is_string_id(cfg: RatingsConfig, key: str) -> bool:
    return cfg.id_type == "string" and key in ("user", "item")


def _string_ids(values: pa.Array | pa.ChunkedArray, file: str, column: str, first_row: int) -> np.ndarray:
    """One chunk of a string id column as stripped str objects, raising on the first missing id."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_integer(values.type):
        values = values.cast(pa.string())
    elif not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if not pa.types.is_null(values.type):
            raise _bad(file, column, first_row, f"unsupported column type {values.type} for string ids")
    return _nonempty_ids(
        pd.Series(values.to_numpy(zero_copy_only=False), dtype=object), file, column, first_row
    )


class _FirstSeenCodes:
    """Integer codes for string ids in first-seen order, built chunk by chunk (one dict of the ids)."""

    def __init__(self) -> None:
        self._code: dict[str, int] = {}

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """Codes (int64) of ``ids``, adding the ids not seen before."""
        codes, uniques = pd.factorize(ids)
        code = self._code
        mapped = np.fromiter((code.setdefault(u, len(code)) for u in uniques), np.int64, len(uniques))
        return mapped[codes]

    def strings(self) -> np.ndarray:
        """The id of each code."""
        return np.array(list(self._code), dtype=object)


def _check_header(file: str, available: list[str], cfg: RatingsConfig) -> None:
    for _key, column, _ in _rating_columns(cfg):
        if column not in available:
            raise _bad(file, column, None, f"missing column (file has {available})")


def _column_names(path: Path, cfg: RatingsConfig) -> list[str]:
    """The ratings file's column names, checked to hold the configured columns."""
    names = _header_names(path, cfg)
    _check_header(path.name, names, cfg)
    return names


def _csv_read_options(path: Path, cfg: RatingsConfig, **kwargs) -> pacsv.ReadOptions:
    # The header row is skipped and its stripped names given, so " movieId" still names movieId.
    return pacsv.ReadOptions(
        column_names=_column_names(path, cfg),
        skip_rows=1 if cfg.header else 0,
        encoding=cfg.encoding,
        block_size=DEFAULT_CHUNK_BYTES,
        **kwargs,
    )


def _find_shape_error(path: Path, cfg: RatingsConfig) -> None:
    """Single-threaded string read that reports the first row with a wrong number of fields."""
    found: list = []

    def handler(row):  # pyarrow calls this for rows with a wrong number of fields
        found.append(row)
        return "error"

    read = _csv_read_options(path, cfg, use_threads=False)
    parse = pacsv.ParseOptions(
        delimiter=cfg.sep, quote_char='"' if cfg.quote else False, invalid_row_handler=handler
    )
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for _, c, _ in _rating_columns(cfg)})
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for _ in reader:
            pass
    except pa.ArrowInvalid:
        if found:
            row = found[0]
            # pyarrow numbers rows from 1 with the header (skipped or not) and without blank lines.
            data_row = row.number - (1 if cfg.header else 0) if row.number is not None else None
            raise _bad(
                path.name,
                "(all)",
                data_row,
                f"expected {row.expected_columns} fields, got {row.actual_columns}: {row.text[:80]!r}",
            ) from None


def _iter_csv_chunks(path: Path, cfg: RatingsConfig, strings: bool) -> Iterator[pa.RecordBatch]:
    columns = _rating_columns(cfg)
    read = _csv_read_options(path, cfg)
    parse = pacsv.ParseOptions(delimiter=cfg.sep, quote_char='"' if cfg.quote else False)
    types = {
        c: (pa.string() if strings or _is_string_id(cfg, key) else (pa.int64() if integer else pa.float64()))
        for key, c, integer in columns
    }
    convert = pacsv.ConvertOptions(column_types=types, include_columns=[c for _, c, _ in columns])
    yield from pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)


def _string_batch(rows: list[list[str]], columns: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(c, pa.string()) for c in zip(*rows, strict=True)], names=columns
    )


def _iter_split_chunks(path: Path, cfg: RatingsConfig) -> Iterator[pa.RecordBatch]:
    """Multi-character separators (``::``): split line by line, as strings, checking each row's fields."""
    names = _column_names(path, cfg)
    columns = [c for _, c, _ in _rating_columns(cfg)]
    positions = [names.index(c) for c in columns]
    rows: list[list[str]] = []
    for fields in _data_rows(path, cfg, len(names)):
        rows.append([fields[i] for i in positions])
        if len(rows) == DEFAULT_PARQUET_BATCH_ROWS:
            yield _string_batch(rows, columns)
            rows = []
    if rows:
        yield _string_batch(rows, columns)


def _iter_parquet_chunks(path: Path, cfg: RatingsConfig) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(path)
    _check_header(path.name, parquet.schema_arrow.names, cfg)
    yield from parquet.iter_batches(
        batch_size=DEFAULT_PARQUET_BATCH_ROWS, columns=[c for _, c, _ in _rating_columns(cfg)]
    )


def _validated_chunks(path: Path, cfg: RatingsConfig, strings: bool) -> Iterator[dict[str, np.ndarray]]:
    """Yields validated chunks as numpy arrays keyed by user / item / rating / timestamp.

    ``strings``: read a CSV's columns as text (slower; parses what pyarrow's typed read rejects).
    """
    if cfg.format == "parquet":
        batches = _iter_parquet_chunks(path, cfg)
    elif len(cfg.sep) > 1:
        batches = _iter_split_chunks(path, cfg)
    else:
        batches = _iter_csv_chunks(path, cfg, strings)
    lo, hi = cfg.rating_scale
    step = cfg.rating_step
    first_row = 1
    for batch in batches:
        chunk: dict[str, np.ndarray] = {}
        for key, column, _ in _rating_columns(cfg):
            if _is_string_id(cfg, key):
                chunk[key] = _string_ids(batch.column(column), path.name, column, first_row)
            else:
                chunk[key] = _numeric_column(batch.column(column), key, path.name, column, first_row)
        rating = chunk["rating"]
        out_of_range = np.flatnonzero((rating < lo - 1e-9) | (rating > hi + 1e-9))
        if out_of_range.size:
            i = int(out_of_range[0])
            raise _bad(path.name, cfg.rating, first_row + i, f"rating {rating[i]:g} outside [{lo:g}, {hi:g}]")
        steps = (rating - lo) / step
        off_step = np.flatnonzero(np.abs(steps - np.round(steps)) > 1e-6)
        if off_step.size:
            i = int(off_step[0])
            raise _bad(
                path.name,
                cfg.rating,
                first_row + i,
                f"rating {rating[i]:g} is not a multiple of step {step:g}",
            )
        first_row += len(rating)
        yield chunk


def _collect_ratings(path: Path, cfg: RatingsConfig, strings: bool) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {"user": [], "item": [], "rating": [], "timestamp": []}
    codes = {"user": _FirstSeenCodes(), "item": _FirstSeenCodes()} if cfg.id_type == "string" else None
    for chunk in _validated_chunks(path, cfg, strings):
        if codes is not None:
            chunk["user"] = codes["user"].encode(chunk["user"])
            chunk["item"] = codes["item"].encode(chunk["item"])
        parts["user"].append(_compact_ids(chunk["user"]))
        parts["item"].append(_compact_ids(chunk["item"]))
        parts["rating"].append(chunk["rating"].astype(np.float32))
        if "timestamp" in chunk:
            parts["timestamp"].append(chunk["timestamp"])
        else:
            parts["timestamp"].append(np.zeros(len(chunk["rating"]), dtype=np.int64))
    if not parts["rating"]:
        raise ValueError(f"{path.name}: no ratings")
    # pyarrow's allocator keeps freed CSV buffers cached (hundreds of MB at scale): hand them back.
    pa.default_memory_pool().release_unused()
    out: dict[str, np.ndarray] = {}
    for key in list(parts):  # one column at a time bounds the peak to one column's chunks plus its copy
        out[key] = np.concatenate(parts.pop(key))
    out["user"] = _compact_ids(out["user"].astype(np.int64, copy=False))
    out["item"] = _compact_ids(out["item"].astype(np.int64, copy=False))
    if len(out["rating"]) == 0:
        raise ValueError(f"{path.name}: no ratings")
    if codes is not None:
        out["user_strings"] = codes["user"].strings()
        out["item_strings"] = codes["item"].strings()
    return out


def read_ratings(path: Path, cfg: RatingsConfig) -> dict[str, np.ndarray]:
    """Streams and validates a ratings file.

    Args:
        path: the ratings file.
        cfg: its RatingsConfig.

    Returns:
        ``user`` and ``item`` (int32 when they fit, else int64), ``rating`` (float32), ``timestamp``
        (int64, zeros when the config has no timestamp column), in file order. With ``id_type:
        string``, ``user`` and ``item`` are codes in first-seen order and ``user_strings`` /
        ``item_strings`` hold the raw id of each code.

    Raises:
        ValueError: missing or empty file, missing column, non-numeric or non-integer id or
            timestamp, missing value, rating out of range or off the rating step, a row with the
            wrong number of fields; the message names the file, column and first offending data row.
    """
    if not path.is_file():
        raise ValueError(f"{path.name}: ratings file not found at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path.name}: empty file")
    try:
        return _collect_ratings(path, cfg, strings=False)
    except pa.ArrowInvalid as exc:
        if cfg.format != "csv" or len(cfg.sep) > 1:
            raise ValueError(f"{path.name}: {exc}") from exc
        # The fast typed read failed: a row with a wrong number of fields, or a number pyarrow's typed
        # parser rejects (7.0 in an integer column). Find the former, then re-read as strings, which
        # names a bad value's column and row or accepts the value.
        _find_shape_error(path, cfg)
    try:
        return _collect_ratings(path, cfg, strings=True)
    except pa.ArrowInvalid as exc:  # left for the string read: text that is not valid in the encoding
        raise _undecodable(path, cfg.encoding) or ValueError(f"{path.name}: {exc}") from exc


def drop_duplicates_keep_latest(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray
) -> tuple[np.ndarray | None, int]:
    """Finds rows to keep so that each (user, item) pair keeps only its latest rating.

    Ties on the timestamp keep the row that comes last in the file.

    Args:
        user: user ids per rating.
        item: item ids per rating.
        timestamp: timestamps per rating.

    Returns:
        (sorted indices of the rows to keep, or None when there are no duplicates; number dropped).
    """
    _, user_code = dense_codes(user)
    item_values, item_code = dense_codes(item)
    key = user_code.astype(np.int64) * len(item_values)
    key += item_code
    del user_code, item_code
    sorted_key = np.sort(key)
    has_duplicates = bool(np.any(sorted_key[1:] == sorted_key[:-1]))
    del sorted_key
    if not has_duplicates:
        return None, 0
    order = np.argsort(key, kind="stable")
    key_sorted = key[order]
    del key
    same_as_next = key_sorted[1:] == key_sorted[:-1]
    in_group = np.zeros(len(order), dtype=bool)
    in_group[:-1] |= same_as_next
    in_group[1:] |= same_as_next
    del same_as_next
    # Only rows of duplicated pairs need ordering by (pair, time, file position); keep the last of each pair.
    rows = order[in_group]
    pair_key = key_sorted[in_group]
    del order, key_sorted, in_group
    latest = np.lexsort((rows, timestamp[rows], pair_key))
    pair_in_order = pair_key[latest]
    last_of_pair = np.ones(len(latest), dtype=bool)
    last_of_pair[:-1] = pair_in_order[1:] != pair_in_order[:-1]
    keep_mask = np.ones(len(user), dtype=bool)
    keep_mask[rows] = False
    keep_mask[rows[latest[last_of_pair]]] = True
    keep = np.flatnonzero(keep_mask)
    return keep, int(len(user) - len(keep))
