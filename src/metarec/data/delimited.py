"""Text decoding and row splitting of delimited files, shared by the ratings and the table readers.

Every row must have one field per column; blank lines are skipped and not counted as data rows.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from pathlib import Path

from metarec.data.config import TableConfig
from metarec.data.errors import _bad


def _text_encoding(encoding: str) -> str:
    """The codec to open a text file with: UTF-8 also drops a leading byte-order mark (Excel writes one)."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r}") from None
    return "utf-8-sig" if name == "utf-8" else encoding


def _undecodable(path: Path, encoding: str) -> ValueError | None:
    """Names the first line that is not valid ``encoding`` (a decoder's offset is into a buffer, not a row).

    Returns:
        The error naming the line, or None when every line decodes (line by line).
    """
    codec = _text_encoding(encoding)
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode(codec)
            except UnicodeDecodeError as exc:
                return ValueError(
                    f"{path.name}: line {number} of the file (1-based, every line counted) is not valid "
                    f"{encoding}: {exc.reason} at byte {exc.start} of {line[:80]!r}; set the config's encoding"
                )
    return None


def _split_rows(handle, table: TableConfig) -> Iterator[list[str]]:
    """Fields of each record, in file order; an empty line yields an empty list."""
    if len(table.sep) > 1:  # a literal multi-character separator (``::``): no quoting
        for line in handle:
            line = line.rstrip("\r\n")
            yield line.split(table.sep) if line else []
        return
    quoting = csv.QUOTE_MINIMAL if table.quote else csv.QUOTE_NONE
    yield from csv.reader(handle, delimiter=table.sep, quoting=quoting)


def _header_names(path: Path, table: TableConfig) -> list[str]:
    """Column names: the header row's (stripped, a UTF-8 BOM dropped) or the configured ``names``."""
    if not table.header:
        return list(table.names)
    try:
        with open(path, encoding=_text_encoding(table.encoding), newline="") as handle:
            header = next(_split_rows(handle, table), None)
    except csv.Error as exc:
        raise ValueError(f"{path.name}: unreadable header row: {exc}") from None
    except UnicodeDecodeError as exc:
        raise _undecodable(path, table.encoding) or ValueError(f"{path.name}: {exc}") from None
    if not header:
        raise ValueError(f"{path.name}: empty file or blank first line (the header row is expected there)")
    names = [name.strip() for name in header]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise _bad(path.name, duplicated[0], None, f"duplicate column name in {names}")
    return names


def _data_rows(path: Path, table: TableConfig, n_fields: int) -> Iterator[list[str]]:
    """Each data row's fields, blank lines skipped, raising on a row without exactly ``n_fields``.

    A row with a field too many or too few would otherwise shift or fill values silently.
    """
    row = 0
    try:
        with open(path, encoding=_text_encoding(table.encoding), newline="") as handle:
            records = _split_rows(handle, table)
            if table.header:
                next(records, None)
            for fields in records:
                if not fields:
                    continue  # blank lines are not data rows (nor counted as rows in messages)
                row += 1
                if len(fields) != n_fields:
                    text = table.sep.join(fields)
                    raise _bad(
                        path.name,
                        "(all)",
                        row,
                        f"expected {n_fields} fields, got {len(fields)}: {text[:80]!r}",
                    )
                yield fields
    except csv.Error as exc:
        raise _bad(path.name, "(all)", row + 1, f"unreadable row: {exc}") from None
    except UnicodeDecodeError as exc:
        raise _undecodable(path, table.encoding) or ValueError(f"{path.name}: {exc}") from None
