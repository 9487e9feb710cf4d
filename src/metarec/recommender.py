"""Framework-neutral serving core: load a model directory, then recommend and adapt for validated requests.

The HTTP / KServe request protocol (decoding, validation, error answers, batching) lives in
``metarec.serving.requests`` and builds the :class:`RecommendRequest` / :class:`AdaptRequest` objects
this module answers; the TorchServe handler (``metarec.serving.handler``) is a thin adapter over both.
All adapt requests of a batch that take the same number of steps are adapted together in one batched
pass (padded supports, masks): :class:`metarec.meta.fast_adapt.FastAdapter` in modes
"decision"/"head", otherwise the vmapped :func:`metarec.meta.adapt`. Both compute the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metarec.features import EncodedFeatures, FeatureEncoder
from metarec.meta import adapt as meta_adapt
from metarec.meta import masked_mse
from metarec.meta import predict as meta_predict
from metarec.meta.fast_adapt import FastAdapter, supports_fast_path
from metarec.model import PreferenceModel, read_model_json
from metarec.tasks import TaskBatch, build_task_batch

MODEL_CARD_FILE = "model_card.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"


@dataclass
class RecommendRequest:
    """One validated recommend request.

    Attributes:
        user_features: Encoded features of the user (leading dimension 1).
        user_id: Raw id of a known user, None for a user described by features.
        k: Number of items to return.
        candidate_mask: Bool[n_items] items that may be returned (candidates minus exclusions).
    """

    user_features: EncodedFeatures
    user_id: str | None
    k: int
    candidate_mask: torch.Tensor


@dataclass
class AdaptRequest(RecommendRequest):
    """One validated adapt request (a recommend request plus a support set).

    Attributes:
        support_items: Long[S] item indices of the support ratings.
        support_ratings: Float[S] the ratings.
        steps: Inner steps to take (already capped by ``max_steps``).
    """

    support_items: torch.Tensor = None
    support_ratings: torch.Tensor = None
    steps: int = 0


class Recommender:
    """A meta-learned recommender ready to serve: model, catalogue, feature encoder, limits.

    Args:
        model: The trained PreferenceModel (catalogue buffers included).
        schema: The preprocessing ``schema.json`` mapping.
        items: ``items.parquet`` table (``item_idx``, raw ``item_id``, raw features), one row per
            catalogue item in model order.
        users: ``users.parquet`` table (``user_idx``, raw ``user_id``, raw features) or None.
        adapt_settings: ``mode``, ``inner_steps`` and ``inner_lr`` from ``model.json``.
        model_card: The model card shown by ``describe`` (None when the directory has none).
        device: Torch device to run on.
        fast_adapt: Adapt with :class:`metarec.meta.fast_adapt.FastAdapter` (no autograd, same math)
            when it supports the model's adapt mode; False always uses the generic
            :func:`metarec.meta.adapt` / :func:`metarec.meta.predict`.
    """

    def __init__(
        self,
        model: PreferenceModel,
        schema: dict[str, Any],
        items: pd.DataFrame,
        users: pd.DataFrame | None,
        adapt_settings: dict[str, Any],
        model_card: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        fast_adapt: bool = True,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.schema = schema
        self.encoder = FeatureEncoder(schema)
        self.model_card = model_card
        # Echoed in every answer so a caller can tell which model ranked for it.
        self.model_version = str((model_card or {}).get("version", "unversioned"))
        self.adapt_mode = str(adapt_settings.get("mode", "decision"))
        self.inner_lr = float(adapt_settings.get("inner_lr", 0.01))
        # Requests without "steps" take the trained number (the request layer caps it).
        self.default_steps = int(adapt_settings.get("inner_steps", 5))
        self.rating_min = float(schema.get("rating_min", model.rating_min))
        self.rating_max = float(schema.get("rating_max", model.rating_max))

        items = items.sort_values("item_idx").reset_index(drop=True)
        if len(items) != model.n_items or not np.array_equal(
            items["item_idx"].to_numpy(), np.arange(len(items))
        ):
            raise ValueError(
                f"items table has {len(items)} rows with item_idx not 0..n-1; model has {model.n_items}"
            )
        self.item_ids = [str(item_id) for item_id in items["item_id"]]
        self.item_index = {item_id: idx for idx, item_id in enumerate(self.item_ids)}
        self.all_items = torch.arange(model.n_items, device=self.device)

        self.user_index: dict[str, int] = {}
        self.user_features: EncodedFeatures | None = None
        if users is not None:
            users = users.sort_values("user_idx").reset_index(drop=True)
            self.user_index = {str(user_id): row for row, user_id in enumerate(users["user_id"])}
            encoded = self.encoder.encode_users(users)
            self.user_features = EncodedFeatures(*(tensor.to(self.device) for tensor in encoded))
        # Single requests are dominated by torch.func dispatch overhead: adapt by hand when possible.
        self.fast_adapter: FastAdapter | None = None
        if fast_adapt and supports_fast_path(self.model, self.adapt_mode):
            self.fast_adapter = FastAdapter(self.model, self.adapt_mode)

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        catalogue_dir: str | Path | None = None,
        fast_adapt: bool = True,
    ) -> Recommender:
        """Loads a model directory (or an unpacked archive).

        Args:
            model_dir: Directory holding ``model.pt``, ``model.json``, ``schema.json`` and, for an
                archive, ``items.parquet``/``users.parquet``/``model_card.json``.
            device: Torch device.
            catalogue_dir: Where to find ``items.parquet``/``users.parquet`` when ``model_dir`` lacks
                them (a preprocessing output directory).
            fast_adapt: See :class:`Recommender`.

        Returns:
            The Recommender.

        Raises:
            FileNotFoundError: A required file is missing.
        """
        model_dir = Path(model_dir)
        search = [model_dir] + ([Path(catalogue_dir)] if catalogue_dir is not None else [])

        def find(name: str, required: bool) -> Path | None:
            for folder in search:
                if (folder / name).is_file():
                    return folder / name
            if required:
                raise FileNotFoundError(f"{name} not found in {', '.join(str(f) for f in search)}")
            return None

        schema = json.loads(find("schema.json", True).read_text())
        model = PreferenceModel.from_dir(model_dir, map_location=device)
        document = read_model_json(model_dir)
        items = pd.read_parquet(find(ITEMS_FILE, True))
        users_path = find(USERS_FILE, False)
        users = pd.read_parquet(users_path) if users_path is not None else None
        card_path = find(MODEL_CARD_FILE, False)
        card = json.loads(card_path.read_text()) if card_path is not None else None
        adapt_settings = document.get("adapt") or {}
        return cls(model, schema, items, users, adapt_settings, card, device, fast_adapt)

    def known_user(self, user_id: str) -> EncodedFeatures | None:
        """Returns the encoded features of a user of the user table (None: unknown or no table)."""
        row = self.user_index.get(user_id)
        if row is None or self.user_features is None:
            return None
        return EncodedFeatures(*(tensor[row : row + 1] for tensor in self.user_features))

    # ------------------------------------------------------------------------------- inference

    def _top_k(self, scores: torch.Tensor, request: RecommendRequest) -> list[dict[str, Any]]:
        masked = scores.masked_fill(~request.candidate_mask, -math.inf)
        k = min(request.k, int(request.candidate_mask.sum()))
        values, indices = torch.topk(masked, k)
        return [
            {"item_id": self.item_ids[index], "score": round(float(value), 4)}
            for value, index in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def _stack_users(self, requests: Sequence[RecommendRequest]) -> EncodedFeatures:
        return EncodedFeatures(
            *(torch.cat(parts, dim=0) for parts in zip(*(r.user_features for r in requests), strict=True))
        )

    def recommend(self, requests: Sequence[RecommendRequest]) -> list[dict[str, Any]]:
        """Ranks the catalogue for a batch of users without adaptation (one forward pass).

        Args:
            requests: Validated recommend requests.

        Returns:
            One answer per request: ``{"user": {...}, "items": [{"item_id", "score"}, ...],
            "model_version": ...}``, items by descending predicted rating.
        """
        if not requests:
            return []
        users = self._stack_users(requests)
        items = self.all_items.expand(len(requests), -1)
        with torch.no_grad():
            scores = self.model.forward_batch(users.cat, users.num, users.multi, items)
        answers = []
        for row, request in enumerate(requests):
            user = {"user_id": request.user_id} if request.user_id is not None else {"features": True}
            answers.append(
                {
                    "user": user,
                    "items": self._top_k(scores[row], request),
                    "model_version": self.model_version,
                }
            )
        return answers

    def adapt(self, requests: Sequence[AdaptRequest]) -> list[dict[str, Any]]:
        """Adapts the model to a batch of new users on their support ratings and ranks for each.

        Requests taking the same number of steps share one batched pass of the meta-learning inner
        loop (supports padded and masked): the autograd-free :class:`~metarec.meta.fast_adapt.FastAdapter`
        when it supports the adapt mode, else :func:`metarec.meta.adapt` vmapped over the users.

        Args:
            requests: Validated adapt requests.

        Returns:
            One answer per request: ``{"items": [...], "steps": n, "support_size": s,
            "support_loss_before": mse, "support_loss_after": mse, "model_version": ...}`` (mean squared error on the
            support ratings before and after adaptation).
        """
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        by_steps: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            by_steps.setdefault(request.steps, []).append(position)
        for steps, positions in by_steps.items():
            group = [requests[p] for p in positions]
            for position, answer in zip(positions, self._adapt_group(group, steps), strict=True):
                answers[position] = answer
        return answers

    def _adapt_group(self, requests: Sequence[AdaptRequest], steps: int) -> list[dict[str, Any]]:
        users = self._stack_users(requests)
        supports = [(r.support_items, r.support_ratings) for r in requests]
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        batch = build_task_batch(users, supports, [empty] * len(requests)).to(self.device)
        n_support = batch.support_items.shape[1]
        with torch.no_grad():
            if self.fast_adapter is not None:
                before, after = self._fast_adapt_group(users, batch, steps)
            else:
                before, after = self._generic_adapt_group(users, batch, steps)
        answers = []
        for row, request in enumerate(requests):
            mask = batch.support_mask[row]
            loss_before = masked_mse(before[row], batch.support_ratings[row], mask)
            loss_after = masked_mse(after[row, :n_support], batch.support_ratings[row], mask)
            answers.append(
                {
                    "items": self._top_k(after[row, n_support:], request),
                    "steps": steps,
                    "support_size": int(mask.sum()),
                    "support_loss_before": round(float(loss_before), 6),
                    "support_loss_after": round(float(loss_after), 6),
                    "model_version": self.model_version,
                }
            )
        return answers

    def _fast_adapt_group(
        self, users: EncodedFeatures, batch: TaskBatch, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Support predictions before adaptation and [support, catalogue] predictions after (fast path)."""
        result = self.fast_adapter.adapt_and_score(
            users.cat,
            users.num,
            users.multi,
            batch.support_items,
            batch.support_ratings,
            batch.support_mask,
            steps,
            self.inner_lr,
        )
        return result.support_before, torch.cat([result.support_after, result.scores], dim=1)

    def _generic_adapt_group(
        self, users: EncodedFeatures, batch: TaskBatch, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`_fast_adapt_group`, with the generic ``torch.func`` inner loop (any adapt mode)."""
        before = self.model.forward_batch(users.cat, users.num, users.multi, batch.support_items)
        adapted = meta_adapt(
            self.model, None, batch, steps, self.inner_lr, self.adapt_mode, create_graph=False
        )
        # Support rows and the whole catalogue scored in one pass with each user's parameters.
        items = torch.cat([batch.support_items, self.all_items.expand(len(batch), -1)], dim=1)
        after = meta_predict(self.model, adapted, users.cat, users.num, users.multi, items, self.adapt_mode)
        return before, after

    def describe(self) -> dict[str, Any]:
        """Returns the model card (or a minimal description when the directory has no card)."""
        if self.model_card is not None:
            return self.model_card
        return {"n_items": self.model.n_items, "adapt": {"mode": self.adapt_mode, "inner_lr": self.inner_lr}}
