"""Feature encoding shared by preprocessing, training and serving.

A schema (``schema.json`` written by preprocessing) describes every user and item feature; the
encoder turns raw values into three tensors so that a new user's request is encoded exactly as the
training data was.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class EncodedFeatures(NamedTuple):
    """Encoded features of N entities.

    Attributes:
        cat: Long[N, C] one slot per categorical or hashed feature (0 = missing / out of vocabulary).
        num: Float[N, D] standardised numeric features (missing = 0).
        multi: Float[N, M] concatenated multi-hot features.
    """

    cat: torch.Tensor
    num: torch.Tensor
    multi: torch.Tensor


class FeatureDims(NamedTuple):
    """Sizes a model needs to embed one entity type.

    Attributes:
        cat_sizes: embedding-table size of each categorical slot (vocabulary + 1 for index 0).
        n_num: number of numeric features.
        n_multi: total width of the multi-hot features.
    """

    cat_sizes: list[int]
    n_num: int
    n_multi: int
