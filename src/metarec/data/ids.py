"""Id columns: the checks the ratings and the entity tables share, compact dtypes, dense codes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from metarec.data.errors import _bad

_STRING_IDS_HINT = "ids that are not numbers need ratings.id_type: string in the dataset config"


def _nonempty_ids(values: pd.Series, file: str, column: str, first_row: int) -> np.ndarray:
    """String ids, stripped, as str objects; raises on the first missing (empty) one."""
    text = values.fillna("").astype(str).str.strip()
    missing = np.flatnonzero((text == "").to_numpy())
    if missing.size:
        raise _bad(file, column, first_row + int(missing[0]), "missing id (empty)")
    return text.to_numpy(dtype=object)


def _compact_ids(values: np.ndarray) -> np.ndarray:
    if values.size == 0 or (
        values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max
    ):
        return values.astype(np.int32)
    return values


def dense_codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps integer ids to dense codes 0..n-1 in ascending id order.

    Uses a lookup table (linear time) when the id range is compact, a sort otherwise.

    Args:
        ids: integer ids (any order, repeats allowed).

    Returns:
        (sorted unique ids, int32 code per input row).
    """
    if ids.size == 0:
        return ids.copy(), np.zeros(0, dtype=np.int32)
    low, high = int(ids.min()), int(ids.max())
    if high - low <= 4 * ids.size + 1_000_000:
        present = np.zeros(high - low + 1, dtype=bool)
        present[ids - low] = True
        uniques = np.flatnonzero(present) + low
        code_of = np.cumsum(present, dtype=np.int32) - 1
        return uniques.astype(ids.dtype), code_of[ids - low]
    uniques, codes = np.unique(ids, return_inverse=True)
    return uniques, codes.astype(np.int32)
