"""One user's personalisation for serving: ratings window -> support set -> adapted state -> scores.

The only place the real-time loop touches the meta-learning API (:class:`metarec.meta.Adapter`): the
inner loop that training and evaluation use, run on one user's ratings, and scoring with its result. The
adapted state (the per-user tensors the inner loop produces, by name) is stored as a blob
(:mod:`metarec.state.blob`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metarec.features import EncodedFeatures, stack_features
from metarec.meta import Adapter, select_users
from metarec.state import Rating
from metarec.tasks import build_task_batch

Params = dict[str, torch.Tensor]


class Personaliser:
    """Adapts one model to single users and scores items with the adapted state.

    Args:
        adapter: the model's :class:`metarec.meta.Adapter` (the one adapt/score API of training,
            evaluation and serving).
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.model = adapter.model

    def adapt(self, user: EncodedFeatures, items: torch.Tensor, ratings: torch.Tensor, steps: int) -> Params:
        """Runs the meta-learned inner loop on one user's ratings.

        Args:
            user: the user's encoded features (leading dimension 1).
            items: Long[S] rated items (S >= 1).
            ratings: Float[S] their ratings.
            steps: inner steps.

        Returns:
            The adapted state (tensors by name, leading dimension 1).
        """
        ratings = ratings.reshape(1, -1).float()
        return self.adapter.adapt(user, items.reshape(1, -1), ratings, torch.ones_like(ratings), steps)

    def adapt_many(
        self,
        users: Sequence[EncodedFeatures],
        supports: Sequence[tuple[Sequence[int], Sequence[float]]],
        steps: int,
    ) -> list[Params]:
        """Runs the inner loop for several users in one batched :meth:`Adapter.adapt` call.

        The supports are padded to the longest one and masked (padding rows change nothing), so each
        user gets what :meth:`adapt` gives them alone (up to float rounding).

        Args:
            users: each user's encoded features (leading dimension 1).
            supports: each user's ``(item indices, ratings)``, at least one rating each.
            steps: inner steps.

        Returns:
            Each user's adapted state (tensors by name, leading dimension 1), in order.
        """
        if not users:
            return []
        device = next(self.model.parameters()).device
        empty = [(torch.zeros(0, dtype=torch.long), torch.zeros(0))] * len(supports)
        batch = build_task_batch(stack_features(users), supports, empty).to(device)
        stacked = EncodedFeatures(batch.user_cat, batch.user_num, batch.user_multi)
        state = self.adapter.adapt(
            stacked, batch.support_items, batch.support_ratings, batch.support_mask, steps
        )
        # Views of each user's rows (blobs copy the bytes; a clone per tensor and user cost more than
        # the batch's state takes in memory).
        return [select_users(state, row) for row in range(len(supports))]

    def score(self, user: EncodedFeatures, adapted: Params | None, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of items for one user.

        Args:
            user: the user's encoded features (leading dimension 1).
            adapted: the output of :meth:`adapt`, or None for the un-adapted prior.
            items: Long[N] items.

        Returns:
            Float[N] predicted ratings.
        """
        state = self.adapter.prior_state(1) if adapted is None else adapted
        return self.adapter.score(user, state, items.reshape(1, -1))[0]


def support_from_window(
    window: Sequence[Rating], item_index: dict[str, int]
) -> tuple[list[int], list[float]]:
    """The support set of a ratings window: the latest rating of each item still in the catalogue.

    Args:
        window: ratings, oldest first.
        item_index: raw item id -> item index of the serving catalogue.

    Returns:
        ``(item indices, ratings)`` in order of each item's latest rating.
    """
    latest: dict[int, float] = {}
    for entry in window:
        index = item_index.get(entry.item_id)
        if index is None:
            continue  # an item the current model no longer has
        latest.pop(index, None)
        latest[index] = float(entry.rating)
    return list(latest), list(latest.values())
