"""The error every data-set reader raises for a bad value.

Every validation error is a ``ValueError`` naming the file, the column and the first offending row
(1-based data row: the header line, when there is one, and blank lines are not counted, as the
message says; pyarrow's CSV reader does not report physical line numbers).
"""

from __future__ import annotations


def _bad(file: str, column: str, row: int | None, message: str) -> ValueError:
    where = (
        f"data row {row} (1-based; the header and blank lines are not counted)"
        if row is not None
        else "header"
    )
    return ValueError(f"{file}: column {column!r}, {where}: {message}")
