"""Few-shot tasks: one per user, a support set to adapt on and a query set to score."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TaskBatch:
    """T tasks padded to S support and Q query rows; a mask of 1 marks a real row.

    Attributes:
        user_cat: Long[T, C] encoded categorical user features.
        user_num: Float[T, D] encoded numeric user features.
        user_multi: Float[T, M] encoded multi-hot user features.
        support_items: Long[T, S] item indices (padding rows hold 0).
        support_ratings: Float[T, S] ratings (padding rows hold 0).
        support_mask: Float[T, S] 1 for a real row, 0 for padding.
        query_items: Long[T, Q] item indices.
        query_ratings: Float[T, Q] ratings.
        query_mask: Float[T, Q] 1 for a real row, 0 for padding.
    """

    user_cat: torch.Tensor
    user_num: torch.Tensor
    user_multi: torch.Tensor
    support_items: torch.Tensor
    support_ratings: torch.Tensor
    support_mask: torch.Tensor
    query_items: torch.Tensor
    query_ratings: torch.Tensor
    query_mask: torch.Tensor

    def __len__(self) -> int:
        return self.support_items.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor | slice) -> TaskBatch:
        """Returns the tasks at ``index`` (used to shard a meta-batch across ranks)."""
        return TaskBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})
