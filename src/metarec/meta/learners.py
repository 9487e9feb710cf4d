"""MAML-family meta-learners built on ``torch.func``: one vectorised pass adapts every task.

The inner loop is a pure function of (parameters, one task) that ``torch.func.grad`` differentiates
and ``torch.func.vmap`` maps over the tasks of a :class:`~metarec.tasks.TaskBatch`, so no model is
copied per task. Only the adapted parameters are batched per task; when they are the decoder (modes
``"decision"`` and ``"head"``) the encoder output, which the inner loop cannot change, is computed
once per task before the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call, grad, vmap

from metarec.model import USER_PARAMETERS, PreferenceModel, adapted_parameter_names, inner_learning_rates

if TYPE_CHECKING:
    from metarec.tasks import TaskBatch

METHODS = ("maml", "fomaml", "reptile")
Params = dict[str, torch.Tensor]


def masked_mse(predictions: torch.Tensor, ratings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real rows only (padding rows have mask 0 and weigh nothing).

    Args:
        predictions: Float[N] predicted ratings.
        ratings: Float[N] true ratings.
        mask: Float[N] 1 for real rows, 0 for padding.

    Returns:
        Scalar loss (0 when there is no real row).
    """
    return ((predictions - ratings) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def masked_mae(predictions: torch.Tensor, ratings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the real rows only (see :func:`masked_mse`)."""
    return ((predictions - ratings).abs() * mask).sum() / mask.sum().clamp(min=1.0)


OUTER_LOSSES = {"mse": masked_mse, "l1": masked_mae}


class TaskFunctions:
    """Splits the model into a per-task precomputation and the part the inner loop adapts.

    Args:
        model: the model (its module structure is used; weights come from ``params``).
        params: every model parameter by name (e.g. ``dict(model.named_parameters())``).
        mode: adapt mode, see :func:`metarec.model.adapted_parameter_names`.
    """

    def __init__(self, model: PreferenceModel, params: Params, mode: str):
        self.model = model
        self.mode = mode
        self.adapted_names = adapted_parameter_names(model, mode)
        self.params = params
        if mode == "all":
            self.split = None
            return
        # Everything before the first adapted decoder layer is fixed during adaptation: precompute it.
        first = min(int(name.split(".")[1]) for name in self.adapted_names if name.startswith("decoder."))
        self.split = first
        self.prefix = model.decoder[:first]
        self.tail = model.decoder[first:]
        self.tail_fixed = {
            name[len("decoder.") :]: tensor
            for name, tensor in params.items()
            if name.startswith("decoder.")
            and int(name.split(".")[1]) >= first
            and name not in self.adapted_names
        }

    def initial(self) -> Params:
        """Returns the starting point of the inner loop (the shared, meta-learned adapted parameters)."""
        return {name: self.params[name] for name in self.adapted_names}

    def inputs(
        self,
        user_cat: torch.Tensor,
        user_num: torch.Tensor,
        user_multi: torch.Tensor,
        items: torch.Tensor,
        hidden_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Per-task inputs of :meth:`predict`, batched over T tasks.

        Args:
            user_cat: Long[T, C]; user_num: Float[T, D]; user_multi: Float[T, M] user features.
            items: Long[T, N] item indices.
            hidden_ids: Bool[T, N] rows whose item is seen as a cold item (its id embedding, bias and
                factors replaced by the cold fallback row): id dropout. Not in mode "all".

        Returns:
            A tuple of tensors with leading dim T (the raw inputs in mode "all"; otherwise the decoder
            rows up to the first adapted layer, the item-bias offsets and, when the model has user
            factors, the item factor rows; in mode "decision" the user part of the rows comes first,
            once per task).
        """
        if self.split is None:
            if hidden_ids is not None:
                raise ValueError('id dropout needs an adapt mode that keeps the item side fixed, not "all"')
            return (user_cat, user_num, user_multi, items)
        encoder_params = _strip(self.params, "encoder.")
        warm = self.model.encoder.item_warm_idx[items]
        if hidden_ids is not None:
            warm = warm.masked_fill(hidden_ids, 0)
        # The item bias and item factors are not adapted in these modes: precompute them with the rows.
        per_row = [self.model.item_offset(items, self.params.get("item_bias.weight"), warm)]
        factor_rows = self.model.item_factor_rows(items, self.params.get("item_factors.weight"), warm)
        if factor_rows is not None:
            per_row.append(factor_rows)
        encoder_inputs = (user_cat, user_num, user_multi, items)
        if self.split == 0:
            # The first layer is adapted: keep the user part apart, it is the same for all of a task's rows.
            user_vec, item_rows = functional_call(
                self.model.encoder, encoder_params, encoder_inputs, {"split": True, "warm_idx": warm}
            )
            return (user_vec, item_rows, *per_row)
        rows = functional_call(self.model.encoder, encoder_params, encoder_inputs, {"warm_idx": warm})
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
        """:meth:`inputs` for the support and the query rows of a batch.

        Args:
            batch: T tasks.
            hidden_ids: Bool[T, S + Q] id dropout of the support rows, then the query rows.

        Returns:
            ``(support_inputs, query_inputs)``.
        """
        users = (batch.user_cat, batch.user_num, batch.user_multi)
        n_support = batch.support_items.shape[1]
        if self.split is None:
            if hidden_ids is not None:
                raise ValueError('id dropout needs an adapt mode that keeps the item side fixed, not "all"')
            return self.inputs(*users, batch.support_items), self.inputs(*users, batch.query_items)
        # One encoder pass over support and query rows together.
        inputs = self.inputs(*users, torch.cat([batch.support_items, batch.query_items], dim=1), hidden_ids)
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
        if self.split is None:
            return functional_call(self.model, {**self.params, **adapted}, inputs)
        tail_params = {**self.tail_fixed, **_strip(adapted, "decoder.")}
        if self.split == 0:
            # First layer on [user, item] rows = user part once per task + item part per row.
            user_vec, item_rows, offsets, *factor_rows = inputs
            weight, bias = tail_params["0.weight"], tail_params["0.bias"]
            width = user_vec.shape[-1]
            hidden = item_rows @ weight[:, width:].T + (weight[:, :width] @ user_vec + bias)
            rest = {name: tensor for name, tensor in tail_params.items() if not name.startswith("0.")}
            logits = functional_call(self.tail[1:], rest, (hidden,))
        else:
            rows, offsets, *factor_rows = inputs
            logits = functional_call(self.tail, tail_params, (rows,))
        logits = self.model.user_offset(
            logits.squeeze(-1) + offsets,
            adapted.get("user_bias"),
            factor_rows[0] if factor_rows else None,
            adapted.get("user_factors"),
        )
        return self.model.to_rating(logits)

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
        """Masked MSE of one task (see :meth:`predict`)."""
        return masked_mse(self.predict(adapted, inputs), ratings, mask)

    def outer_loss(self, kind: str) -> Callable:
        """One task's query loss of the given kind (``"mse"`` or ``"l1"``), same arguments as :meth:`loss`."""
        measure = OUTER_LOSSES[kind]
        return lambda adapted, inputs, ratings, mask: measure(self.predict(adapted, inputs), ratings, mask)


def _strip(params: Params, prefix: str) -> Params:
    return {name[len(prefix) :]: tensor for name, tensor in params.items() if name.startswith(prefix)}


def _inner_loop(
    functions: TaskFunctions,
    inputs: tuple[torch.Tensor, ...],
    ratings: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    lr: float,
) -> Params:
    """Runs ``steps`` SGD steps on every task at once; returns adapted parameters with leading dim T."""
    start = functions.initial()
    n_tasks = ratings.shape[0]
    if steps == 0:
        return {name: tensor.expand(n_tasks, *tensor.shape) for name, tensor in start.items()}
    task_grad: Callable = grad(functions.loss)
    rates = inner_learning_rates(functions.model, functions.adapted_names, lr, functions.params)

    model = functions.model
    user_names = [name for name in USER_PARAMETERS if name in start]
    newton = model.user_bias_prior is not None and bool(user_names)

    def adapt_one(task_inputs, task_ratings, task_mask):
        current = start
        for _ in range(steps):
            gradients = task_grad(current, task_inputs, task_ratings, task_mask)
            updated = {name: current[name] - rates[name] * gradients[name] for name in current}
            if newton:
                predictions = functions.predict(current, task_inputs)
                design = user_design(model, predictions, functions.item_factor_rows(current, task_inputs))
                updated.update(
                    user_newton_step(model, predictions, design, task_mask, current, start, gradients)
                )
            current = updated
        return current

    return vmap(adapt_one)(inputs, ratings, mask)


def user_design(
    model: PreferenceModel, predictions: torch.Tensor, factor_rows: torch.Tensor | None
) -> torch.Tensor:
    """d logit / d (user terms) per row: a column of ones for the user bias, then the item factors.

    Args:
        model: the model (which user terms it has).
        predictions: Float[..., N] the rows' predictions (gives the shape, dtype and device).
        factor_rows: Float[..., N, F] the rows' item factors, or None.

    Returns:
        Float[..., N, P] with P = (1 with a user bias) + F.
    """
    columns = [torch.ones_like(predictions).unsqueeze(-1)] if model.user_bias is not None else []
    if factor_rows is not None:
        columns.append(factor_rows)
    return torch.cat(columns, dim=-1)


def user_newton_step(
    model: PreferenceModel,
    predictions: torch.Tensor,
    design: torch.Tensor,
    mask: torch.Tensor,
    current: Params,
    initial: Params,
    gradients: Params,
) -> Params:
    """One damped Gauss-Newton (MAP) step of the user terms (bias and factors) together.

    The objective is the support MSE plus ``prior / n * |theta - theta_0|^2`` (``prior`` pseudo-ratings at
    the meta-learned starting point, as MF fold-in's ridge). The user terms enter the logit linearly
    (``design`` @ theta) and the rating is ``rating_min + span * sigmoid(logit)``, so the Jacobian row of
    item i is ``slope_i * design_i`` with ``slope = (p - rating_min) * (rating_max - p) / span`` at the
    current prediction ``p``: the curvature needs only the current predictions.

    Works on one task (inside ``vmap``) or on T tasks at once (leading dims ``...`` = mask's but the last).

    Args:
        model: the model (rating range, priors).
        predictions: Float[..., N] current predictions of the support rows.
        design: Float[..., N, P] d logit / d theta per row (:func:`user_design`).
        mask: Float[..., N] 1 for real rows.
        current: the current parameters (the step starts here), user terms shaped [..., *shape].
        initial: the meta-learned starting point (the prior's mean), broadcastable to ``current``.
        gradients: the support-MSE gradients at ``current``, shaped like ``current``.

    Returns:
        The stepped user terms by name (``user_bias`` and/or ``user_factors``).
    """
    lead = mask.shape[:-1]
    names = [name for name in USER_PARAMETERS if name in current]
    theta = _pack(current, names, lead)
    span = model.rating_max - model.rating_min
    slope = (predictions - model.rating_min) * (model.rating_max - predictions) / span
    count = mask.sum(-1).clamp(min=1.0).unsqueeze(-1)  # Float[..., 1]
    bias_prior = model.user_bias_prior
    factor_prior = bias_prior if model.user_factor_prior is None else model.user_factor_prior
    sizes = [current[name].reshape(*lead, -1).shape[-1] for name in names]
    prior = torch.cat(
        [theta.new_full((size,), bias_prior if name == "user_bias" else factor_prior)
         for name, size in zip(names, sizes, strict=True)]
    ) / count  # fmt: skip
    initial_theta = torch.cat(
        [initial[name].expand_as(current[name]).reshape(*lead, -1) for name in names], -1
    )
    gradient = _pack(gradients, names, lead) + 2.0 * prior * (theta - initial_theta)
    weighted = design * (mask * slope**2).unsqueeze(-1)
    if theta.shape[-1] == 1:
        curvature = 2.0 * weighted.sum(-2) / count + 2.0 * prior + 1e-6
        stepped = theta - gradient / curvature
    else:
        curvature = 2.0 * weighted.transpose(-1, -2) @ design / count.unsqueeze(-1)
        curvature = curvature + torch.diag_embed(2.0 * prior + 1e-6)
        stepped = theta - torch.linalg.solve(curvature, gradient.unsqueeze(-1)).squeeze(-1)
    return unpack_user_terms(stepped, current, names)


def unpack_user_terms(vector: torch.Tensor, like: Params, names: list[str]) -> Params:
    """Splits Float[..., P] packed user terms (``names`` side by side) back into tensors shaped as ``like``.

    Args:
        vector: the packed values; leading dims ``...`` as ``like``'s (none inside ``vmap``).
        like: tensors giving each name's shape (leading dims included).
        names: the packed names, in packing order.

    Returns:
        name -> tensor of ``like[name]``'s shape.
    """
    lead = vector.shape[:-1]
    out, offset = {}, 0
    for name in names:
        size = like[name].reshape(*lead, -1).shape[-1]
        out[name] = vector[..., offset : offset + size].reshape(like[name].shape)
        offset += size
    return out


def _pack(params: Params, names: list[str], lead: torch.Size) -> torch.Tensor:
    return torch.cat([params[name].reshape(*lead, -1) for name in names], dim=-1)


def adapt(
    model: PreferenceModel,
    params: Params | None,
    batch: TaskBatch,
    steps: int,
    lr: float,
    mode: str = "decision",
    first_order: bool = False,
    create_graph: bool | None = None,
) -> Params:
    """Adapts the model to every task of a batch on its support rows, in one vectorised pass.

    Each task takes ``steps`` plain SGD steps on the masked MSE of its support rows, starting from
    ``params``; padding rows change nothing.

    Args:
        model: the model (structure; the weights used are ``params``).
        params: all model parameters by name; ``None`` uses the model's own parameters.
        batch: T tasks (only the user features and support rows are used).
        steps: number of inner SGD steps (0 returns ``params``' adapted subset, expanded).
        lr: inner learning rate.
        mode: which parameters to adapt: ``"all"``, ``"decision"`` or ``"head"``.
        first_order: drop second-order terms: the adapted parameters depend on ``params`` only
            through the identity (FOMAML).
        create_graph: keep the graph from ``params`` to the result so that an outer loss can be
            differentiated; defaults to ``torch.is_grad_enabled()``. False returns detached tensors
            (evaluation, serving).

    Returns:
        The adapted parameters (names from ``adapted_parameter_names(model, mode)``), each with a
        leading task dimension T. Predict with :func:`predict`.
    """
    params = dict(model.named_parameters()) if params is None else params
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    functions = TaskFunctions(model, params, mode)
    with torch.set_grad_enabled(create_graph and not first_order):
        inputs = functions.inputs(batch.user_cat, batch.user_num, batch.user_multi, batch.support_items)
    with torch.set_grad_enabled(create_graph):
        return _adapt_inputs(functions, inputs, batch.support_ratings, batch.support_mask, steps, lr,
                             first_order, create_graph)  # fmt: skip


def _adapt_inputs(functions, inputs, ratings, mask, steps, lr, first_order, create_graph) -> Params:
    if not create_graph:
        with torch.no_grad():
            detached = tuple(tensor.detach() for tensor in inputs)
            return _inner_loop(functions, detached, ratings, mask, steps, lr)
    if first_order:
        # Run the loop without an outer graph, then attach the result to the starting point through the
        # identity: d(adapted)/d(params) = I, the first-order approximation.
        with torch.no_grad():
            detached = tuple(tensor.detach() for tensor in inputs)
            moved = _inner_loop(functions, detached, ratings, mask, steps, lr)
        start = functions.initial()
        return {name: start[name] + (moved[name] - start[name]).detach() for name in moved}
    return _inner_loop(functions, inputs, ratings, mask, steps, lr)


def predict(
    model: PreferenceModel,
    adapted: Params,
    user_cat: torch.Tensor,
    user_num: torch.Tensor,
    user_multi: torch.Tensor,
    items: torch.Tensor,
    mode: str = "decision",
    params: Params | None = None,
) -> torch.Tensor:
    """Predicts each task's ratings with its own adapted parameters (the output of :func:`adapt`).

    Args:
        model: the model.
        adapted: adapted parameters, each with leading dim T.
        user_cat: Long[T, C]; user_num: Float[T, D]; user_multi: Float[T, M] user features.
        items: Long[T, N] items to score per task.
        mode: the adapt mode ``adapted`` was produced with.
        params: the shared parameters ``adapt`` started from; ``None`` uses the model's own.

    Returns:
        Float[T, N] predicted ratings.
    """
    params = dict(model.named_parameters()) if params is None else params
    functions = TaskFunctions(model, params, mode)
    inputs = functions.inputs(user_cat, user_num, user_multi, items)
    return vmap(functions.predict)(adapted, inputs)


class MetaLearner:
    """Computes meta-gradients of a model over a batch of tasks.

    Args:
        model: the model whose parameters are meta-learned.
        method: ``"maml"`` (second order), ``"fomaml"`` (first order) or ``"reptile"``.
        inner_steps: inner SGD steps per task.
        inner_lr: inner learning rate.
        adapt_mode: which parameters the inner loop adapts (``"all"``, ``"decision"``, ``"head"``).
        first_order: overrides the method's default (True for fomaml, False for maml; ignored by
            reptile, which is first order by construction).
        outer_loss: the query loss the meta-update minimises: ``"mse"`` (default) or ``"l1"`` (aims
            at the median rating, i.e. at MAE). The inner loop always uses the masked MSE.
        id_dropout: probability that a training row's item is seen as a cold item (id embedding, bias
            and factors replaced by the cold fallback row), so that the model also learns to rank items
            from their features (as DropoutNet). 0 disables it; needs adapt mode "decision" or "head".
    """

    def __init__(
        self,
        model: PreferenceModel,
        method: str,
        inner_steps: int = 5,
        inner_lr: float = 0.01,
        adapt_mode: str = "decision",
        first_order: bool | None = None,
        outer_loss: str = "mse",
        id_dropout: float = 0.0,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown meta-learning method {method!r}; expected one of {METHODS}")
        adapted_parameter_names(model, adapt_mode)  # validates the mode
        self.model = model
        self.method = method
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.adapt_mode = adapt_mode
        self.first_order = (method == "fomaml") if first_order is None else bool(first_order)
        if outer_loss not in OUTER_LOSSES:
            raise ValueError(f"unknown outer loss {outer_loss!r}; expected one of {sorted(OUTER_LOSSES)}")
        self.outer_loss = outer_loss
        if not 0.0 <= float(id_dropout) < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {id_dropout!r}")
        if id_dropout > 0 and adapt_mode == "all":
            raise ValueError(
                'id_dropout needs adapt mode "decision" or "head": mode "all" adapts the item side'
            )
        self.id_dropout = float(id_dropout)

    def _hidden_ids(self, n_tasks: int, n_rows: int, device: torch.device) -> torch.Tensor | None:
        """Bool[T, N] rows whose item id is hidden this step (None without id dropout)."""
        if self.id_dropout == 0.0:
            return None
        return torch.rand(n_tasks, n_rows, device=device) < self.id_dropout

    def meta_gradient(self, batch: TaskBatch, total_tasks: int | None = None) -> tuple[torch.Tensor, Params]:
        """Meta-loss and meta-gradient of the model's trainable parameters over a batch of tasks.

        Args:
            batch: T training tasks (support rows adapt, query rows score the adaptation).
            total_tasks: the number of tasks the loss is averaged over; defaults to T. Data-parallel
                ranks pass the global meta-batch size, so that summing the ranks' results gives the
                mean over the global batch.

        Returns:
            ``(loss, grads)``: the detached mean post-adaptation query MSE (summed over this batch and
            divided by ``total_tasks``) and a dict name -> gradient for every trainable parameter.
        """
        total = len(batch) if total_tasks is None else int(total_tasks)
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if self.method == "reptile":
            return self._reptile(batch, params, total)
        functions = TaskFunctions(self.model, params, self.adapt_mode)
        n_rows = batch.support_items.shape[1] + batch.query_items.shape[1]
        hidden = self._hidden_ids(len(batch), n_rows, batch.support_items.device)
        support, query = functions.support_query_inputs(batch, hidden)
        adapted = _adapt_inputs(functions, support, batch.support_ratings, batch.support_mask,
                                self.inner_steps, self.inner_lr, self.first_order, True)  # fmt: skip
        task_losses = vmap(functions.outer_loss(self.outer_loss))(
            adapted, query, batch.query_ratings, batch.query_mask
        )
        loss = task_losses.sum() / total
        return loss.detach(), _gradients(loss, params)

    def _reptile(self, batch: TaskBatch, params: Params, total: int) -> tuple[torch.Tensor, Params]:
        # Reptile trains on the whole task (support and query rows). The adapted parameters move
        # towards the adapted solutions: direction (params - adapted) / (steps * lr), which equals the
        # plain gradient at one step. Parameters the inner loop does not adapt (embeddings in modes
        # "decision"/"head") get the first-order gradient of the post-adaptation loss instead.
        functions = TaskFunctions(self.model, params, self.adapt_mode)
        items = torch.cat([batch.support_items, batch.query_items], dim=1)
        ratings = torch.cat([batch.support_ratings, batch.query_ratings], dim=1)
        mask = torch.cat([batch.support_mask, batch.query_mask], dim=1)
        hidden = self._hidden_ids(*items.shape, items.device)
        inputs = functions.inputs(batch.user_cat, batch.user_num, batch.user_multi, items, hidden)
        adapted = _adapt_inputs(functions, inputs, ratings, mask, self.inner_steps, self.inner_lr, True, True)
        task_losses = vmap(functions.outer_loss(self.outer_loss))(adapted, inputs, ratings, mask)
        loss = task_losses.sum() / total
        grads = _gradients(loss, params)
        if self.inner_steps > 0:
            scale = 1.0 / (self.inner_steps * self.inner_lr * total)
            for name in functions.adapted_names:
                grads[name] = (params[name].detach() - adapted[name].detach()).sum(0) * scale
        n_support = batch.support_items.shape[1]
        query_losses = vmap(OUTER_LOSSES[self.outer_loss])(
            vmap(functions.predict)(adapted, inputs)[:, n_support:].detach(),
            batch.query_ratings,
            batch.query_mask,
        )
        return query_losses.sum().detach() / total, grads


def _gradients(loss: torch.Tensor, params: Params) -> Params:
    names = list(params)
    values = torch.autograd.grad(loss, [params[name] for name in names], allow_unused=True)
    return {
        name: torch.zeros_like(params[name]) if value is None else value
        for name, value in zip(names, values, strict=True)
    }


def make_learner(
    method: str,
    model: PreferenceModel,
    inner_steps: int = 5,
    inner_lr: float = 0.01,
    adapt_mode: str = "decision",
    first_order: bool | None = None,
    outer_loss: str = "mse",
    id_dropout: float = 0.0,
) -> MetaLearner:
    """Builds a meta-learner; see :class:`MetaLearner` for the arguments.

    Returns:
        A :class:`MetaLearner` whose ``meta_gradient(batch)`` returns ``(loss, grads)``.

    Raises:
        ValueError: unknown method or adapt mode.
    """
    return MetaLearner(model, method, inner_steps, inner_lr, adapt_mode, first_order, outer_loss, id_dropout)
