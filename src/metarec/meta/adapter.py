"""The one way to adapt the model to users and score items with the adapted model.

Training (the meta-gradient), validation, evaluation of meta-learned models, the fine-tune baseline
and serving all go through :class:`Adapter`::

    adapter = Adapter(model, AdaptSettings(mode="head", inner_steps=5, inner_lr=0.05))
    state = adapter.adapt(users, support_items, support_ratings, support_mask)  # UserState
    scores = adapter.score(users, state, items)                                   # Float[T, N]
    prior = adapter.prior_state(len(users))                                       # un-adapted state

``users`` are :class:`~metarec.features.EncodedFeatures` of T users (leading dim T); support tensors
are [T, S] (padding rows have mask 0 and change nothing); ``items`` are Long[T, N].

A :data:`UserState` is a plain dict of tensors by parameter name, each with leading dim T: the
adapted parameters (``user_bias`` [T], ``user_factors`` [T, F], and the adapted decoder layers, e.g.
``decoder.4.weight`` [T, 1, 32] in mode "head"). It is what a user's personalisation *is*: store it
with ``torch.save`` / ``safetensors``, reload it and pass it to :meth:`Adapter.score`; slice user t
out with :func:`select_users` (``{name: tensor[t:t+1]}``). The names are
``adapted_parameter_names(model, mode)``.

How the model splits (its decomposition, :meth:`metarec.model.PreferenceModel.tail_start`): the
encoder and the decoder layers before the first adapted layer do not change during adaptation, so
they run once per task (``Adapter.inputs``); the inner loop runs only the adapted *tail* plus the
per-user terms (:mod:`metarec.meta.user_terms`: design rows ``d logit / d user terms`` and the
Gauss-Newton step). The inner loop is a pure function of (adapted parameters, one task) that
``torch.func.grad`` differentiates and ``torch.func.vmap`` maps over the T tasks, so the meta-gradient
(:class:`~metarec.meta.learners.MetaLearner`) differentiates through the very same code.

``Adapter(..., fast=True)`` (serving) runs modes "decision"/"head" on
:class:`~metarec.meta.fast_adapt.FastAdapter` instead: the same math with a hand-written backward pass,
see that module for when and why it pays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from torch.func import functional_call, grad, vmap

from metarec.features import EncodedFeatures
from metarec.meta.fast_adapt import FastAdapter, supports_fast_path
from metarec.meta.losses import OUTER_LOSSES, masked_mse
from metarec.meta.user_terms import user_design, user_newton_step
from metarec.model import USER_PARAMETERS, PreferenceModel, adapted_parameter_names, inner_learning_rates
from metarec.settings import Settings

if TYPE_CHECKING:
    from metarec.tasks import TaskBatch

Params = dict[str, torch.Tensor]
# A user's adapted parameters by name, each with a leading user dimension T (see the module docstring).
UserState = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class AdaptSettings(Settings):
    """How a model adapts to a user: the ``adapt`` section of model.json.

    Attributes:
        mode: which parameters adapt: "all", "decision" (the decoder MLP, MeLU) or "head" (the last
            layer, ANIL); the per-user bias and factors adapt in every mode.
        inner_steps: inner steps on the support rows.
        inner_lr: inner SGD learning rate.
    """

    section = "adapt"
    mode: Literal["all", "decision", "head"] = "decision"
    inner_steps: int = 5
    inner_lr: float = 0.01

    def validate(self) -> None:
        """Refuses a negative step count."""
        if self.inner_steps < 0:
            raise ValueError(f"adapt settings: inner_steps must be >= 0, got {self.inner_steps!r}")


def select_users(state: UserState, index: int | slice | torch.Tensor) -> UserState:
    """The state of some users of a batch (an int keeps the leading dim: ``[t:t+1]``).

    Args:
        state: a batch's state.
        index: a user position, a slice or an index tensor.

    Returns:
        The selected users' state.
    """
    if isinstance(index, int):
        index = slice(index, index + 1)
    return {name: tensor[index] for name, tensor in state.items()}


class Adapter:
    """Adapts a model to T users on their support rows and scores items with each user's state.

    Args:
        model: the model (its module structure; the weights used are ``params``).
        settings: adapt mode, steps and learning rate.
        params: every model parameter by name (meta-training passes the trainable ones so that the
            meta-gradient flows); None uses the model's own.
        fast: use the autograd-free :class:`~metarec.meta.fast_adapt.FastAdapter` for :meth:`adapt`
            and :meth:`score` when it supports the model and mode (serving; build after the weights
            are final).
    """

    def __init__(
        self,
        model: PreferenceModel,
        settings: AdaptSettings,
        params: Params | None = None,
        fast: bool = False,
    ):
        self.model = model
        self.settings = settings
        self.adapted_names = adapted_parameter_names(model, settings.mode)
        self.params = dict(model.named_parameters()) if params is None else params
        self.split = model.tail_start(settings.mode)
        self.fast = (
            FastAdapter(model, settings.mode) if fast and supports_fast_path(model, settings.mode) else None
        )
        if self.split is None:
            return
        self.prefix = model.decoder[: self.split]
        self.tail = model.decoder[self.split :]
        self.tail_fixed = {
            name[len("decoder.") :]: tensor
            for name, tensor in self.params.items()
            if name.startswith("decoder.")
            and int(name.split(".")[1]) >= self.split
            and name not in self.adapted_names
        }

    # ------------------------------------------------------------------------------ public API

    def prior_state(self, n_users: int) -> UserState:
        """The un-adapted state of ``n_users`` users (the meta-learned starting point, expanded)."""
        return {
            name: tensor.detach().expand(n_users, *tensor.shape) for name, tensor in self.initial().items()
        }

    @torch.no_grad()
    def adapt(
        self,
        users: EncodedFeatures,
        support_items: torch.Tensor,
        support_ratings: torch.Tensor,
        support_mask: torch.Tensor,
        steps: int | None = None,
    ) -> UserState:
        """Adapts T users on their support rows (no graph: evaluation, serving).

        Args:
            users: T users' encoded features.
            support_items: Long[T, S] support items (padding rows may hold any valid index).
            support_ratings: Float[T, S] support ratings.
            support_mask: Float[T, S] 1 for real rows, 0 for padding.
            steps: inner steps; None uses the settings' ``inner_steps`` (0 returns :meth:`prior_state`).

        Returns:
            The users' adapted state.
        """
        steps = self.settings.inner_steps if steps is None else int(steps)
        if self.fast is not None:
            support = (support_items, support_ratings, support_mask)
            return self.fast.adapt(users, support, steps, self.settings.inner_lr)
        inputs = tuple(tensor.detach() for tensor in self.inputs(users, support_items))
        return self._inner_loop(inputs, support_ratings, support_mask, steps)

    @torch.no_grad()
    def score(self, users: EncodedFeatures, state: UserState, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of each user's items with that user's state.

        Args:
            users: T users' encoded features.
            state: their state (:meth:`adapt` or :meth:`prior_state`).
            items: Long[T, N] item indices.

        Returns:
            Float[T, N] predicted ratings.
        """
        if self.fast is not None:
            return self.fast.predict(state, users, items)
        return vmap(self.predict)(state, self.inputs(users, items))

    @torch.no_grad()
    def score_catalogue(self, users: EncodedFeatures, state: UserState) -> torch.Tensor:
        """Predicted ratings of every catalogue item for each user: :meth:`score` of all item indices.

        The fast path reads its cached catalogue rows in place instead of gathering them by index (at
        10^5 items the gather copied ~25 MB per request); the values are the same.

        Args:
            users: T users' encoded features.
            state: their state (:meth:`adapt` or :meth:`prior_state`).

        Returns:
            Float[T, n_items] predicted ratings, in item order.
        """
        if self.fast is not None:
            return self.fast.predict(state, users, None)
        device = self.model.encoder.item_warm_idx.device
        items = torch.arange(self.model.n_items, device=device).expand(users.cat.shape[0], -1)
        return self.score(users, state, items)

    def score_tasks(self, batch: TaskBatch, chunk: int | None = None) -> torch.Tensor:
        """Adapts every task on its support rows and scores its query rows, ``chunk`` tasks at a time.

        Args:
            batch: T few-shot tasks.
            chunk: tasks adapted per vectorised pass (bounds memory); None adapts all at once.

        Returns:
            Float[T, Q] predicted ratings of the query rows.
        """
        parts = []
        chunk = max(1, len(batch)) if chunk is None else chunk
        for start in range(0, len(batch), chunk):
            part = batch.select(slice(start, start + chunk))
            users = EncodedFeatures(part.user_cat, part.user_num, part.user_multi)
            state = self.adapt(users, part.support_items, part.support_ratings, part.support_mask)
            parts.append(self.score(users, state, part.query_items))
        if not parts:
            return torch.zeros(batch.query_items.shape)
        return torch.cat(parts)

    # ------------------------------------------------------------- the engine (meta-training too)

    def initial(self) -> Params:
        """The starting point of the inner loop (the shared, meta-learned adapted parameters)."""
        return {name: self.params[name] for name in self.adapted_names}

    def inputs(
        self, users: EncodedFeatures, items: torch.Tensor, hidden_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The fixed (per-task) inputs of the adapted tail, batched over T tasks.

        Args:
            users: T users' encoded features.
            items: Long[T, N] item indices.
            hidden_ids: Bool[T, N] rows whose item is seen as a cold item (its id embedding, bias and
                factors replaced by the cold fallback row): id dropout. Not in mode "all".

        Returns:
            A tuple of tensors with leading dim T (the raw inputs in mode "all"; otherwise the decoder
            rows up to the first adapted layer, the item-bias offsets and, when the model has user
            factors, the item factor rows; when the tail starts at layer 0 the user part of the rows
            comes first, once per task).
        """
        if self.split is None:
            if hidden_ids is not None:
                raise ValueError('id dropout needs an adapt mode that keeps the item side fixed, not "all"')
            return (users.cat, users.num, users.multi, items)
        model = self.model
        warm = model.encoder.item_warm_idx[items]
        if hidden_ids is not None:
            warm = warm.masked_fill(hidden_ids, 0)
        # The item bias and item factors are not adapted in these modes: precompute them with the rows.
        per_row = [model.item_offset(items, self.params.get("item_bias.weight"), warm)]
        factor_rows = model.item_factor_rows(items, self.params.get("item_factors.weight"), warm)
        if factor_rows is not None:
            per_row.append(factor_rows)
        encoder_params = _strip(self.params, "encoder.")
        encoder_inputs = (users.cat, users.num, users.multi, items)
        if self.split == 0:
            # The first layer is adapted: keep the user part apart, it is the same for all of a task's rows.
            user_vec, item_rows = functional_call(
                model.encoder, encoder_params, encoder_inputs, {"split": True, "warm_idx": warm}
            )
            return (user_vec, item_rows, *per_row)
        rows = functional_call(model.encoder, encoder_params, encoder_inputs, {"warm_idx": warm})
        prefix_params = {
            name: tensor
            for name, tensor in _strip(self.params, "decoder.").items()
            if int(name.split(".")[0]) < self.split
        }
        rows = functional_call(self.prefix, prefix_params, (rows,))
        return (rows, *per_row)

    def shared_inputs(self) -> int:
        """How many leading tensors of :meth:`inputs` hold one row per task rather than per item row."""
        return 1 if self.split == 0 else 0

    def support_query_inputs(
        self, batch: TaskBatch, hidden_ids: torch.Tensor | None = None
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """:meth:`inputs` for the support and the query rows of a batch (one encoder pass for both).

        Args:
            batch: T tasks.
            hidden_ids: Bool[T, S + Q] id dropout of the support rows, then the query rows.

        Returns:
            ``(support_inputs, query_inputs)``.
        """
        users = EncodedFeatures(batch.user_cat, batch.user_num, batch.user_multi)
        if self.split is None:
            if hidden_ids is not None:
                raise ValueError('id dropout needs an adapt mode that keeps the item side fixed, not "all"')
            return self.inputs(users, batch.support_items), self.inputs(users, batch.query_items)
        n_support = batch.support_items.shape[1]
        inputs = self.inputs(users, torch.cat([batch.support_items, batch.query_items], dim=1), hidden_ids)
        shared, per_row = inputs[: self.shared_inputs()], inputs[self.shared_inputs() :]
        return (
            (*shared, *(tensor[:, :n_support] for tensor in per_row)),
            (*shared, *(tensor[:, n_support:] for tensor in per_row)),
        )

    def predict(self, adapted: Params, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Predicts one task's ratings with its adapted parameters (vmap this over tasks).

        Args:
            adapted: the adapted parameters of one task.
            inputs: one task's slice of :meth:`inputs`.

        Returns:
            Float[N] predicted ratings.
        """
        model = self.model
        if self.split is None:
            return functional_call(model, {**self.params, **adapted}, inputs)
        tail_params = {**self.tail_fixed, **_strip(adapted, "decoder.")}
        if self.split == 0:
            user_vec, item_rows, offsets, *factor_rows = inputs
            # First layer on [user, item] rows = user part once per task + item part per row.
            user_weight, item_weight = model.split_first_layer(tail_params["0.weight"])
            hidden = item_rows @ item_weight.T + (user_weight @ user_vec + tail_params["0.bias"])
            rest = {name: tensor for name, tensor in tail_params.items() if not name.startswith("0.")}
            logits = functional_call(self.tail[1:], rest, (hidden,))
        else:
            rows, offsets, *factor_rows = inputs
            logits = functional_call(self.tail, tail_params, (rows,))
        logits = model.user_offset(
            logits.squeeze(-1) + offsets,
            adapted.get("user_bias"),
            factor_rows[0] if factor_rows else None,
            adapted.get("user_factors"),
        )
        return model.to_rating(logits)

    def item_factor_rows(self, adapted: Params, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The item factors of one task's rows (None when the model has no user factors).

        Args:
            adapted: the task's current adapted parameters (mode "all" adapts the item factors too).
            inputs: one task's slice of :meth:`inputs`.

        Returns:
            Float[N, F] or None.
        """
        if self.split is None:
            table = adapted.get("item_factors.weight", self.params.get("item_factors.weight"))
            return self.model.item_factor_rows(inputs[3], table)
        per_row = inputs[self.shared_inputs() :]
        return per_row[2] if len(per_row) > 2 else None

    def loss(self, adapted: Params, inputs: tuple[torch.Tensor, ...], ratings, mask) -> torch.Tensor:
        """Masked MSE of one task (the inner loop's loss; see :meth:`predict`)."""
        return masked_mse(self.predict(adapted, inputs), ratings, mask)

    def outer_loss(self, kind: str) -> Callable:
        """One task's query loss of the given kind (``"mse"`` or ``"l1"``), same arguments as :meth:`loss`."""
        measure = OUTER_LOSSES[kind]
        return lambda adapted, inputs, ratings, mask: measure(self.predict(adapted, inputs), ratings, mask)

    def adapt_inputs(
        self,
        inputs: tuple[torch.Tensor, ...],
        ratings: torch.Tensor,
        mask: torch.Tensor,
        first_order: bool = False,
    ) -> Params:
        """Adapts T tasks from precomputed :meth:`inputs`, keeping the graph to ``params`` (meta-training).

        Args:
            inputs: the tasks' support :meth:`inputs`.
            ratings: Float[T, S] support ratings.
            mask: Float[T, S] support mask.
            first_order: drop second-order terms: the adapted parameters depend on ``params`` only
                through the identity (FOMAML, Reptile).

        Returns:
            The adapted parameters, each with leading dim T.
        """
        steps = self.settings.inner_steps
        if not first_order:
            return self._inner_loop(inputs, ratings, mask, steps)
        # Run the loop without an outer graph, then attach the result to the starting point through the
        # identity: d(adapted)/d(params) = I, the first-order approximation.
        with torch.no_grad():
            moved = self._inner_loop(tuple(tensor.detach() for tensor in inputs), ratings, mask, steps)
        start = self.initial()
        return {name: start[name] + (moved[name] - start[name]).detach() for name in moved}

    def _inner_loop(
        self, inputs: tuple[torch.Tensor, ...], ratings: torch.Tensor, mask: torch.Tensor, steps: int
    ) -> Params:
        """Runs ``steps`` inner steps on every task at once; returns adapted parameters with leading dim T."""
        start = self.initial()
        n_tasks = ratings.shape[0]
        if steps == 0:
            return {name: tensor.expand(n_tasks, *tensor.shape) for name, tensor in start.items()}
        task_grad: Callable = grad(self.loss)
        rates = inner_learning_rates(self.model, self.adapted_names, self.settings.inner_lr, self.params)
        model = self.model
        newton = model.user_bias_prior is not None and any(name in start for name in USER_PARAMETERS)

        def adapt_one(task_inputs, task_ratings, task_mask):
            current = start
            for _ in range(steps):
                gradients = task_grad(current, task_inputs, task_ratings, task_mask)
                updated = {name: current[name] - rates[name] * gradients[name] for name in current}
                if newton:
                    predictions = self.predict(current, task_inputs)
                    design = user_design(model, predictions, self.item_factor_rows(current, task_inputs))
                    updated.update(
                        user_newton_step(model, predictions, design, task_mask, current, start, gradients)
                    )
                current = updated
            return current

        return vmap(adapt_one)(inputs, ratings, mask)


def _strip(params: Params, prefix: str) -> Params:
    return {name[len(prefix) :]: tensor for name, tensor in params.items() if name.startswith(prefix)}
