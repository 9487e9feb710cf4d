"""Framework-neutral serving core: load a model directory, then recommend and adapt for validated requests.

The HTTP / KServe request protocol lives in ``metarec.serving``: ``bodies`` decodes a request body,
``requests`` builds the :class:`RecommendRequest` / :class:`AdaptRequest` objects this module answers
and ``routes`` answers a batch; the TorchServe handler (``metarec.serving.handler``) is a thin adapter
over both.
All adapt requests of a batch that take the same number of steps are adapted together in one batched
pass (padded supports, masks) of :class:`metarec.meta.Adapter` (autograd-free in modes
"decision"/"head", otherwise the vmapped ``torch.func`` loop; both compute the same).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metarec.explain import Explainer, explanation_documents
from metarec.features import EncodedFeatures, FeatureEncoder, stack_features
from metarec.meta import Adapter, AdaptSettings, masked_mse
from metarec.model import PreferenceModel, read_model_json, weights_fingerprint
from metarec.personalise import Personaliser
from metarec.realtime import HISTORY_FILE, HistoryOnly, RealtimeUsers, UserView, read_history
from metarec.state import Rating, StoreUnavailableError, UserStateStore
from metarec.state.store import DEFAULT_WINDOW
from metarec.tasks import build_task_batch

logger = logging.getLogger(__name__)

MODEL_CARD_FILE = "model_card.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
EXPLAIN_TOP_RATINGS = 5  # ratings named per explained item (the rest are summed)


@dataclass
class RecommendRequest:
    """One validated recommend request.

    Attributes:
        user_features: Encoded features of the user (leading dimension 1).
        user_id: Raw id of a known user, None for a user described by features.
        k: Number of items to return.
        candidate_mask: Bool[n_items] items that may be returned (candidates minus exclusions).
        include_rated: Keep the items the user has rated (excluded by default).
        explain: Add an ``explanation`` to every returned item.
        described: The request gave ``user`` features (with a new ``user_id``).
    """

    user_features: EncodedFeatures
    user_id: str | None
    k: int
    candidate_mask: torch.Tensor
    include_rated: bool = False
    explain: bool = False
    described: bool = False


@dataclass
class FeedbackRequest(RecommendRequest):
    """One validated feedback request: ratings to append to a user's state.

    Attributes:
        ratings: The validated ratings (catalogue items, in range), in request order.
        answer_items: Whether to answer the new top-k (the request gave ``k``).
    """

    ratings: list[Rating] = None
    answer_items: bool = False


@dataclass
class AdaptRequest(RecommendRequest):
    """One validated adapt request (a recommend request plus a support set).

    Attributes:
        support_items: Long[S] item indices of the support ratings.
        support_ratings: Float[S] the ratings.
        steps: Inner steps to take (already capped by ``max_steps``).
        support_ids: The raw item ids of the support ratings.
    """

    support_items: torch.Tensor = None
    support_ratings: torch.Tensor = None
    steps: int = 0
    support_ids: list[str] = None


@dataclass
class ForgetRequest:
    """One validated forget request: erase a user's stored ratings and state.

    Attributes:
        user_id: Raw user id (any valid id: forgetting a user the store does not hold is no error).
    """

    user_id: str


# Said in a forget answer for a user whose ratings ship in the archive's history.parquet.
HISTORY_NOTE = (
    "this user's ratings in the model's training data (the archive's history and the trained weights) "
    "are not erased by forget and still personalise them; they leave with a model trained without them"
)


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
            when it supports the model's adapt mode; False always uses the generic ``torch.func`` loop
            (``Adapter(..., fast=False)``).
        store: The per-user state store (feedback, stored adapted states); None: no per-user state
            (feedback is refused; users of ``history`` are still adapted from it, once per worker:
            :class:`~metarec.realtime.HistoryOnly`).
        history: Raw user id -> known ratings (the archive's ``history.parquet``).
        window: Most ratings of a support set without a store (a store has its own window).
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
        store: UserStateStore | None = None,
        history: dict[str, list[Rating]] | None = None,
        window: int = DEFAULT_WINDOW,
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
        # The data set's granularity (half stars: 0.5); None for a schema from before it was written.
        self.rating_step = float(schema["rating_step"]) if schema.get("rating_step") else None

        items = items.sort_values("item_idx").reset_index(drop=True)
        if len(items) != model.n_items or not np.array_equal(
            items["item_idx"].to_numpy(), np.arange(len(items))
        ):
            raise ValueError(
                f"items table has {len(items)} rows with item_idx not 0..n-1; model has {model.n_items}"
            )
        self.item_ids = [str(item_id) for item_id in items["item_id"]]
        self.item_index = {item_id: idx for idx, item_id in enumerate(self.item_ids)}
        self.item_display = DisplayFields(items)
        # Every item index, for callers that score the whole catalogue by index (the benches' baselines).
        self.all_items = torch.arange(model.n_items, device=self.device)

        self.user_index: dict[str, int] = {}
        self.user_features: EncodedFeatures | None = None
        if users is not None:
            users = users.sort_values("user_idx").reset_index(drop=True)
            self.user_index = {str(user_id): row for row, user_id in enumerate(users["user_id"])}
            encoded = self.encoder.encode_users(users)
            self.user_features = encoded.to(self.device)
        # Single requests are dominated by torch.func dispatch overhead: adapt by hand when possible.
        settings = AdaptSettings.from_dict(
            mode=self.adapt_mode, inner_steps=self.default_steps, inner_lr=self.inner_lr
        )
        self.adapter = Adapter(self.model, settings, fast=fast_adapt)
        self.personaliser = Personaliser(self.adapter)
        self.store = store
        self.history = history or {}
        # Stored states are caches of this exact model: keyed by the version string *and* what makes the
        # state (weights, adapt settings), so a retrained model packaged again as "1.0" against the same
        # Redis never serves (or crashes on) the previous model's states: they are recomputed.
        # The store's window too: it bounds the support set a state was adapted on.
        adapt_key = (
            f"{self.adapt_mode}/{self.default_steps}/{self.inner_lr!r}/{getattr(store, 'window', None)}"
        )
        self.model_id = weights_fingerprint(self.model)
        self.state_tag = f"{self.model_version}/{self.model_id}/{adapt_key}"
        self.users = (
            RealtimeUsers(self.personaliser, store, self.item_index, self.history, self.state_tag,
                          self.default_steps, features_key=self.encoder.user_fingerprint)
            if store is not None
            else None
        )  # fmt: skip
        # Without a store (the multi-replica manifests' METAREC_STATE_URL=none) the users of the archive's
        # history are still personalised from it: adapted once per worker and kept there, nothing stored.
        self.history_users = (
            RealtimeUsers(self.personaliser, HistoryOnly(window), self.item_index, self.history, self.state_tag,
                          self.default_steps, features_key=self.encoder.user_fingerprint)
            if store is None and self.history
            else None
        )  # fmt: skip
        self._explainer: Explainer | None = None

    @property
    def served_by(self) -> dict[str, str]:
        """The fields naming the model in every answer: the pipeline packages each run as version 1.0,
        so during a rollout only ``model_id`` (:func:`weights_fingerprint`) tells which training answered."""
        return {"model_version": self.model_version, "model_id": self.model_id}

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        catalogue_dir: str | Path | None = None,
        fast_adapt: bool = True,
        store: UserStateStore | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> Recommender:
        """Loads a model directory (or an unpacked archive).

        Args:
            model_dir: Directory holding ``model.pt``, ``model.json``, ``schema.json`` and, for an
                archive, ``items.parquet``/``users.parquet``/``model_card.json``.
            device: Torch device.
            catalogue_dir: Where to find ``items.parquet``/``users.parquet`` when ``model_dir`` lacks
                them (a preprocessing output directory).
            fast_adapt: See :class:`Recommender`.
            store: The per-user state store (:func:`metarec.state.open.open_store`); None: none.
            window: Most ratings of a known user's support set without a store.

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
        history = read_history(find(HISTORY_FILE, False))
        return cls(
            model, schema, items, users, adapt_settings, card, device, fast_adapt, store, history, window
        )

    def known_user(self, user_id: str) -> EncodedFeatures | None:
        """Returns the encoded features of a user of the user table (None: unknown or no table)."""
        row = self.user_index.get(user_id)
        if row is None or self.user_features is None:
            return None
        return EncodedFeatures(*(tensor[row : row + 1] for tensor in self.user_features))

    def has_state(self, user_id: str) -> bool:
        """Whether the state store holds this user (feedback or an adapt with a new ``user_id``)."""
        return self.users is not None and self.store.get(user_id) is not None

    @property
    def keeps_state(self) -> bool:
        """Whether this Recommender has a state store (feedback, new users created by ``user_id``)."""
        return self.users is not None

    # ------------------------------------------------------------------------------- inference

    def _top_k(
        self, scores: torch.Tensor, request: RecommendRequest, mask: torch.Tensor | None = None
    ) -> list[dict[str, Any]]:
        mask = request.candidate_mask if mask is None else mask
        masked = scores.masked_fill(~mask, -math.inf)
        k = min(request.k, int(mask.sum()))
        values, indices = torch.topk(masked, k)
        return [
            {"item_id": self.item_ids[index], "score": round(float(value), 4), **self.item_display[index]}
            for value, index in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def _stack_users(self, requests: Sequence[RecommendRequest]) -> EncodedFeatures:
        # On the model's device whoever built the requests (a library caller may encode on the CPU).
        return stack_features([r.user_features for r in requests]).to(self.device)

    def recommend(self, requests: Sequence[RecommendRequest]) -> list[dict[str, Any]]:
        """Ranks the catalogue for a batch of users.

        Users with a state (known users with history, users who sent feedback or adapted with a
        ``user_id``) are scored with their adapted state, their rated items excluded unless
        ``include_rated``; the others share one forward pass of the un-adapted model.

        Args:
            requests: Validated recommend requests.

        Returns:
            One answer per request: ``{"user": {...}, "items": [{"item_id", "score"}, ...],
            "model_version", "model_id": ...}``, items by descending predicted rating; for a named user also
            ``personalised``, and with a state ``state_version`` and ``support_size``. While the store
            is unavailable, each request naming a user gets the :class:`StoreUnavailableError` instead
            (the others are answered).
        """
        answers: list[dict[str, Any] | StoreUnavailableError | None] = [None] * len(requests)
        prior_rows = []
        personal = []
        for position, view in enumerate(self._views(requests)):
            if isinstance(view, StoreUnavailableError):
                answers[position] = view
            elif view is None:
                prior_rows.append(position)
            else:
                personal.append((position, view))
        answered = self._personal_answers([requests[p] for p, _ in personal], [v for _, v in personal])
        for (position, _), answer in zip(personal, answered, strict=True):
            answers[position] = answer
        if prior_rows:
            users = self._stack_users([requests[p] for p in prior_rows])
            scores = self.adapter.score_catalogue(users, self.adapter.prior_state(len(prior_rows)))
            for row, position in enumerate(prior_rows):
                request = requests[position]
                answer = {"user": _user_field(request), "items": self._top_k(scores[row], request)}
                if request.user_id is not None:
                    answer["personalised"] = False
                if request.explain:
                    self._explain(answer["items"], request.user_features, [], [])
                answers[position] = {**answer, **self.served_by}
        return answers

    def _views(self, requests: Sequence[RecommendRequest]) -> list[UserView | StoreUnavailableError | None]:
        """Each named user's state (None: no state; the error for every named user while the store is
        unavailable); stale states are re-adapted in one batched pass."""
        users = self.users if self.users is not None else self.history_users
        named = [p for p, r in enumerate(requests) if users is not None and r.user_id is not None]
        views: list[UserView | StoreUnavailableError | None] = [None] * len(requests)
        if not named:
            return views
        try:
            found = users.view_many(
                [
                    (requests[p].user_id, requests[p].user_features, self._authoritative(requests[p]))
                    for p in named
                ]
            )
        except StoreUnavailableError as error:
            logger.warning("recommend for named users refused: %s", error)
            for position in named:
                views[position] = error
            return views
        for position, view in zip(named, found, strict=True):
            views[position] = view
        _log_users(
            "recommend",
            [(requests[p].user_id, v) for p, v in zip(named, found, strict=True) if v is not None],
        )
        return views

    def _authoritative(self, request: RecommendRequest) -> bool:
        """Whether the request's features are the user's (catalogue or given), not a stand-in."""
        return request.described or request.user_id in self.user_index

    def _personal_answers(
        self, requests: Sequence[RecommendRequest], views: Sequence[UserView]
    ) -> list[dict[str, Any]]:
        """Top-k of users with a state, all scored in one pass, each with their own state (the prior for
        a user without ratings); rated items excluded unless asked for."""
        if not requests:
            return []
        users = stack_features([view.features for view in views]).to(self.device)
        states = [self.adapter.prior_state(1) if view.adapted is None else view.adapted for view in views]
        state = {name: torch.cat([s[name] for s in states], dim=0) for name in states[0]}
        scores = self.adapter.score_catalogue(users, state)
        answers = []
        for row, (request, view) in enumerate(zip(requests, views, strict=True)):
            mask = request.candidate_mask.clone()
            if not request.include_rated:
                mask[view.support_items] = False
            items = self._top_k(scores[row], request, mask) if mask.any() else []
            if request.explain and items:
                self._explain(items, view.features, view.support_items, view.support_ratings)
            answers.append(
                {
                    "user": _user_field(request),
                    "items": items,
                    "personalised": view.adapted is not None,
                    "state_version": view.version,
                    "support_size": len(view.support_items),
                    **self.served_by,
                }
            )
        return answers

    def _explain(
        self, items: list[dict[str, Any]], user: EncodedFeatures, support_items, support_ratings, steps=None
    ) -> None:
        """Adds an ``explanation`` to each returned item (see docs/explanations.md)."""
        if self._explainer is None:
            self._explainer = Explainer(self.model, self.adapt_mode, self.inner_lr, self.schema)
        indices = [self.item_index[entry["item_id"]] for entry in items]
        documents = explanation_documents(
            self._explainer, tuple(tensor[0].cpu() for tensor in user), list(support_items), list(support_ratings),
            indices, self.default_steps if steps is None else steps, self.item_ids, EXPLAIN_TOP_RATINGS,
        )  # fmt: skip
        for entry, document in zip(items, documents, strict=True):
            entry["explanation"] = document

    def feedback(self, requests: Sequence[FeedbackRequest]) -> list[dict[str, Any]]:
        """Appends each request's ratings to its user's state, re-adapts and stores it.

        The user is re-adapted from the meta-learned initialisation on their history plus all their
        feedback (the same inner loop and steps as evaluation), never from the previous state. A batch
        is handled together (:meth:`metarec.realtime.RealtimeUsers.record_many`): every request's
        ratings are appended (one atomic append each), then all its users are re-adapted in one batched
        pass and stored, and the answers with ``k`` are scored in one pass. A user with several requests
        in one batch is adapted once, on the window after the last of them, and each of those requests
        is answered from that state (its ``state_version`` and ``support_size``).

        Args:
            requests: Validated feedback requests.

        Returns:
            One answer per request: ``{"user", "stored": true, "state_version", "support_size",
            "model_version", "model_id"}`` and, when the request gave ``k``, the new top-k ``items``; while the
            store is unavailable, the :class:`StoreUnavailableError` for every request (nothing of the
            batch was stored).
        """
        try:
            views = self.users.record_many(
                [(r.user_id, r.ratings, r.user_features, self._authoritative(r)) for r in requests]
            )
        except StoreUnavailableError as error:
            logger.warning("feedback refused: %s", error)
            return [error] * len(requests)
        _log_users(
            "feedback", [(request.user_id, view) for request, view in zip(requests, views, strict=True)]
        )
        ranked = [p for p, request in enumerate(requests) if request.answer_items]
        personal = self._personal_answers([requests[p] for p in ranked], [views[p] for p in ranked])
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        for position, answer in zip(ranked, personal, strict=True):
            answers[position] = answer
        for position, (request, view) in enumerate(zip(requests, views, strict=True)):
            answer = answers[position] or {
                "user": _user_field(request), "state_version": view.version,
                "support_size": len(view.support_items), **self.served_by,
            }  # fmt: skip
            answers[position] = {**answer, "stored": True}
        return answers

    def forget(self, requests: Sequence[ForgetRequest]) -> list[dict[str, Any]]:
        """Erases each request's user from the state store: their feedback, the ratings an adapt stored
        for them, their adapted state and the features kept with it.

        Every worker reads a user from the store on each request (no worker keeps a copy), so the next
        request anywhere no longer sees them; a re-adaptation in flight cannot store its state back (the
        store refuses a state of ratings it no longer holds, and one of the user's forgotten record when
        they came back with as many new ratings before it lands: docs/realtime.md#erasure). Not erased:
        a known user's ratings in the archive's ``history.parquet`` and what training learned from them
        (the answer says so in ``notes``); their next recommend is personalised from that history alone.

        Args:
            requests: Validated forget requests.

        Returns:
            One answer per request: ``{"user_id", "deleted": whether the store held the user,
            "model_version", "model_id"}`` (plus ``notes`` for a user with shipped history); while the store is
            unavailable, the :class:`StoreUnavailableError` for every request not yet erased.
        """
        answers: list[dict[str, Any]] = []
        refused: list[StoreUnavailableError] = []
        for position, request in enumerate(requests):
            try:
                deleted = self.store.delete(request.user_id)
            except StoreUnavailableError as error:
                logger.warning("forget refused: %s", error)
                refused = [error] * (len(requests) - position)
                break
            answer = {"user_id": request.user_id, "deleted": deleted, **self.served_by}
            if request.user_id in self.history:
                answer["notes"] = [HISTORY_NOTE]
            answers.append(answer)
        if answers and logger.isEnabledFor(logging.INFO):
            # The audit trail of erasures (one record per batch, as _log_users).
            logger.info("\n".join(f"realtime user={a['user_id']} route=forget deleted={a['deleted']}"
                                   for a in answers))  # fmt: skip
        return [*answers, *refused]

    def adapt(self, requests: Sequence[AdaptRequest]) -> list[dict[str, Any]]:
        """Adapts the model to a batch of new users on their support ratings and ranks for each.

        Requests taking the same number of steps share one batched :meth:`metarec.meta.Adapter.adapt`
        (supports padded and masked; autograd-free in modes "decision"/"head" unless ``fast_adapt``
        is off). A named user that neither the request describes nor the user table knows is scored with
        the features stored for them (a new user who described themselves once), as recommend does.

        Args:
            requests: Validated adapt requests.

        Returns:
            One answer per request: ``{"items": [...], "steps": n, "support_size": s,
            "support_loss_before": mse, "support_loss_after": mse, "model_version", "model_id": ...}`` (mean squared error on the
            support ratings before and after adaptation). A new named user's answer adds ``"stored": true``
            and ``state_version``; while the store is unavailable, ``"stored": false`` and a note.
        """
        requests, notes = self._with_stored_features(requests)
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        by_steps: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            by_steps.setdefault(request.steps, []).append(position)
        for steps, positions in by_steps.items():
            group = [requests[p] for p in positions]
            for position, answer in zip(positions, self._adapt_group(group, steps), strict=True):
                answers[position] = answer
        for request, answer in zip(requests, answers, strict=True):
            if request.explain:
                self._explain(answer["items"], request.user_features, request.support_items.tolist(),
                              request.support_ratings.tolist(), request.steps)  # fmt: skip
        for position, note in notes.items():
            answers[position]["notes"] = [note]
        try:
            self._keep_new_users(requests, answers)
        except StoreUnavailableError as error:
            # The answers stand (adaptation needs no store); only keeping the new users' state failed.
            logger.warning("adapted new users not kept: %s", error)
            for request, answer in zip(requests, answers, strict=True):
                if self._may_be_new_user(request.user_id):
                    answer.update(
                        stored=False,
                        notes=[*answer.get("notes", []), f"{error}; this user's ratings were not kept"],
                    )
        return answers

    def _with_stored_features(
        self, requests: Sequence[AdaptRequest]
    ) -> tuple[list[AdaptRequest], dict[int, str]]:
        """Each request naming a user that neither the request describes nor the user table knows, with
        the features stored for that user (a new user who described themselves in feedback or an earlier
        adapt: recommend scores them so too); while the store is unavailable those requests keep their
        own (no) features and get a note, by position."""
        named = [p for p, r in enumerate(requests) if self.users is not None and r.user_id is not None
                 and not self._authoritative(r)]  # fmt: skip
        requests = list(requests)
        if not named:
            return requests, {}
        try:
            found = self.users.stored_features(
                [(requests[p].user_id, requests[p].user_features) for p in named]
            )
        except StoreUnavailableError as error:
            logger.warning("stored features of adapting users not read: %s", error)
            note = f"{error}; this user's stored features could not be read, so the answer is scored without them"
            return requests, {p: note for p in named}
        for position, features in zip(named, found, strict=True):
            requests[position] = replace(requests[position], user_features=features)
        return requests, {}

    def _keep_new_users(self, requests: Sequence[AdaptRequest], answers: list[dict[str, Any]]) -> None:
        """Stores the ratings and state of each new named user of an adapt batch, so their next plain
        recommend is personalised (the same batched append, re-adapt and store as feedback)."""
        new_users: list[int] = []
        created: set[str] = set()
        for position, request in enumerate(requests):
            if request.user_id not in created and self._is_new_user(request.user_id):
                created.add(request.user_id)  # a later request of the batch finds the user stored
                new_users.append(position)
        if not new_users:
            return
        views = self.users.record_many(
            [(requests[p].user_id, _support_ratings(requests[p]), requests[p].user_features,
              self._authoritative(requests[p])) for p in new_users]
        )  # fmt: skip
        _log_users("adapt", [(requests[p].user_id, view) for p, view in zip(new_users, views, strict=True)])
        for position, view in zip(new_users, views, strict=True):
            answers[position].update(stored=True, state_version=view.version)

    def _may_be_new_user(self, user_id: str | None) -> bool:
        """A named user without shipped history: new unless the store has them (not asked here)."""
        return self.users is not None and user_id is not None and user_id not in self.history

    def _is_new_user(self, user_id: str | None) -> bool:
        """A named user the server knows nothing about yet (no history, no stored state)."""
        return self._may_be_new_user(user_id) and self.store.get(user_id) is None

    def _adapt_group(self, requests: Sequence[AdaptRequest], steps: int) -> list[dict[str, Any]]:
        users = self._stack_users(requests)
        supports = [(r.support_items, r.support_ratings) for r in requests]
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        batch = build_task_batch(users, supports, [empty] * len(requests)).to(self.device)
        before = self.adapter.score(users, self.adapter.prior_state(len(requests)), batch.support_items)
        state = self.adapter.adapt(
            users, batch.support_items, batch.support_ratings, batch.support_mask, steps
        )
        # The catalogue apart from the support rows: scoring it whole reads the cached catalogue rows in
        # place (score_catalogue), where one pass over [support, catalogue] gathered all of them.
        after = self.adapter.score(users, state, batch.support_items)
        catalogue = self.adapter.score_catalogue(users, state)
        answers = []
        for row, request in enumerate(requests):
            mask = batch.support_mask[row]
            loss_before = masked_mse(before[row], batch.support_ratings[row], mask)
            loss_after = masked_mse(after[row], batch.support_ratings[row], mask)
            answers.append(
                {
                    "items": self._top_k(catalogue[row], request),
                    "steps": steps,
                    "support_size": int(mask.sum()),
                    "support_loss_before": round(float(loss_before), 6),
                    "support_loss_after": round(float(loss_after), 6),
                    **self.served_by,
                }
            )
        return answers

    def describe(self) -> dict[str, Any]:
        """Returns the model card (or a minimal description when the directory has no card)."""
        if self.model_card is not None:
            return self.model_card
        return {"n_items": self.model.n_items, "adapt": {"mode": self.adapt_mode, "inner_lr": self.inner_lr}}


# Keys of a returned item that a display field may not take.
RESERVED_ITEM_KEYS = frozenset({"item_id", "score", "explanation"})


class DisplayFields:
    """Each catalogue item's display fields (``display_<name>`` columns of items.parquet), JSON-ready.

    Built on demand for the k items an answer returns: a dict per catalogue item built at load cost about
    40 MB of RSS and 0.3 s of start-up at 10^5 items (docs/serving.md, "Catalogue size").

    Args:
        items: the items table in item-index order.
    """

    def __init__(self, items: pd.DataFrame):
        self.columns = [
            (column[len("display_") :], items[column].tolist())
            for column in items.columns
            if column.startswith("display_") and column[8:] not in RESERVED_ITEM_KEYS
        ]
        self.n_items = len(items)

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, row: int) -> dict[str, Any]:
        """The ``{name: value}`` fields of the item at index ``row`` (missing values left out)."""
        fields = {}
        for name, values in self.columns:
            value = _plain(values[row])
            if value is not None:
                fields[name] = value
        return fields


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values; NaN as None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _log_users(route: str, users: Sequence[tuple[str, UserView]]) -> None:
    """Logs each user a batch read or wrote, one line each (``realtime user=<id> route=<route>
    version=<n>``), as one record: a TorchServe worker's stdout is unbuffered, so each record is a write
    the frontend wakes up for and reads, which a batch of feedback paid once per request."""
    if users and logger.isEnabledFor(logging.INFO):
        logger.info(
            "\n".join(f"realtime user={user} route={route} version={view.version}" for user, view in users)
        )


def _support_ratings(request: AdaptRequest) -> list[Rating]:
    """An adapt request's support as ratings to store."""
    return [Rating(i, r) for i, r in zip(request.support_ids, request.support_ratings.tolist(), strict=True)]


def _user_field(request: RecommendRequest) -> dict[str, Any]:
    return {"user_id": request.user_id} if request.user_id is not None else {"features": True}
