"""The per-user terms of the model: how they enter the logit, and their inner-loop step.

The user terms (``user_bias``, a scalar, and ``user_factors``, a vector of width F) enter the logit
linearly: ``logit_i = rest_i + design_i . theta`` with ``theta = [user_bias, user_factors]`` and the
*design row* ``design_i = [1, item_factors[item_i]]`` (``d logit_i / d theta``, :func:`user_design`).
So the user-term update decomposes over the support rows: with ``r_i`` the residual of row i and
``s_i`` the slope of the scaled sigmoid at its prediction,

* the gradient of the support MSE is ``sum_i (2 / n) r_i s_i design_i`` (one term per row), and
* the Gauss-Newton curvature is ``sum_i (2 / n) s_i^2 design_i design_i^T`` (one rank-one term per row)
  plus the prior's ridge ``2 prior / n``,

and :func:`user_newton_step` solves ``curvature @ step = gradient``. An explanation of a user's
adapted terms can therefore attribute the step to support rows by their gradient terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from metarec.model import USER_PARAMETERS, PreferenceModel

Params = dict[str, torch.Tensor]


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
    constants = _newton_constants(model, mask, initial, current, names)
    numbers = _NewtonNumbers(
        model.rating_min, model.rating_max, model.rating_max - model.rating_min, 2.0, 1e-6
    )
    theta = _pack(current, names, lead)
    stepped = _newton_update(
        theta, _pack(gradients, names, lead), predictions, design, mask, constants, numbers
    )
    return unpack_user_terms(stepped, current, names)


class _NewtonConstants(NamedTuple):
    """What a Gauss-Newton step of the user terms needs that does not change between inner steps."""

    count: torch.Tensor  # Float[..., 1] support rows per task (at least 1)
    two_prior: torch.Tensor  # Float[..., P] 2 * prior pseudo-ratings / count
    initial_theta: torch.Tensor  # Float[..., P] the prior's mean, packed
    ridge: torch.Tensor | None  # Float[..., P, P] diag(2 * prior / count + damping); None when P = 1
    sizes: list[int]  # each packed name's length, in packing order


class _NewtonNumbers(NamedTuple):
    """The step's scalars: Python floats, or 0-dim tensors (cheaper per operation on tiny tensors)."""

    rating_min: float | torch.Tensor
    rating_max: float | torch.Tensor
    span: float | torch.Tensor
    two: float | torch.Tensor
    damping: float | torch.Tensor


def _newton_constants(
    model: PreferenceModel, mask: torch.Tensor, initial: Params, current: Params, names: list[str]
) -> _NewtonConstants:
    lead = mask.shape[:-1]
    count = mask.sum(-1).clamp(min=1.0).unsqueeze(-1)
    bias_prior = model.user_bias_prior
    factor_prior = bias_prior if model.user_factor_prior is None else model.user_factor_prior
    sizes = [current[name].reshape(*lead, -1).shape[-1] for name in names]
    prior = torch.cat(
        [mask.new_full((size,), bias_prior if name == "user_bias" else factor_prior)
         for name, size in zip(names, sizes, strict=True)]
    ) / count  # fmt: skip
    initial_theta = torch.cat(
        [initial[name].expand_as(current[name]).reshape(*lead, -1) for name in names], -1
    )
    ridge = torch.diag_embed(2.0 * prior + 1e-6) if sum(sizes) > 1 else None
    return _NewtonConstants(count, 2.0 * prior, initial_theta, ridge, sizes)


def _newton_update(
    theta: torch.Tensor,
    gradient: torch.Tensor,
    predictions: torch.Tensor,
    design: torch.Tensor,
    mask: torch.Tensor,
    constants: _NewtonConstants,
    numbers: _NewtonNumbers,
) -> torch.Tensor:
    """The damped Gauss-Newton step from packed ``theta`` given the packed support-MSE ``gradient``."""
    slope = (predictions - numbers.rating_min) * (numbers.rating_max - predictions) / numbers.span
    gradient = gradient + constants.two_prior * (theta - constants.initial_theta)
    weighted = design * (mask * slope**2).unsqueeze(-1)
    if constants.ridge is None:
        curvature = numbers.two * weighted.sum(-2) / constants.count + constants.two_prior + numbers.damping
        return theta - gradient / curvature
    curvature = numbers.two * weighted.transpose(-1, -2) @ design / constants.count.unsqueeze(-1)
    curvature = curvature + constants.ridge
    return theta - torch.linalg.solve(curvature, gradient.unsqueeze(-1)).squeeze(-1)


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


class UserTermsStepper:
    """The inner steps of the user terms in one batched adaptation (T tasks, no ``vmap``; the fast path).

    Each step is SGD with each term's rate, or (``newton``) the damped Gauss-Newton step of
    :func:`user_newton_step` (the one the autograd loop takes: both call ``_newton_update``). The
    gradient is assembled per support row from ``logit_grad`` and the design rows, so no autograd is
    needed. What does not change between inner steps is computed once here instead of once per step:
    the design rows (the item factors of the support rows), and for the Gauss-Newton step the support
    counts, the prior's ridge and its mean packed as one vector. Serving adapts a few users on tiny
    tensors, where each tensor operation's dispatch costs more than its arithmetic, so this is most
    of a feedback batch's adaptation time. The Gauss-Newton steps also
    keep the user terms packed between steps (the packed vector of a step's result is the next step's
    start), so call :meth:`step` once per inner step, each from the previous call's result.

    Args:
        model: the model (rating range, priors).
        initial: the starting (meta-learned) parameters, expanded to T (the prior's mean).
        factor_rows: Float[T, S, F] the support rows' item factors, or None.
        mask: Float[T, S] 1 for real support rows.
        rates: inner learning rates by name.
        newton: take the Gauss-Newton step instead of SGD.
        const: turns the Python numbers of the step into tensors (the fast path's cached 0-dim
            tensors, which cost less per operation); None keeps them Python numbers.
    """

    def __init__(
        self,
        model: PreferenceModel,
        initial: Params,
        factor_rows: torch.Tensor | None,
        mask: torch.Tensor,
        rates: dict[str, torch.Tensor | float],
        newton: bool,
        const: Callable[[float], torch.Tensor | float] | None = None,
    ):
        self.model, self.mask, self.rates, self.newton = model, mask, rates, newton
        self.names = [name for name in USER_PARAMETERS if name in initial]
        if not self.names:
            return
        const = const or (lambda value: value)
        # user_design only takes the shape, dtype and device of the predictions: the mask's.
        self.design = user_design(model, mask, factor_rows)  # Float[T, S, P]
        if not newton:
            return
        self.numbers = _NewtonNumbers(
            const(model.rating_min), const(model.rating_max), const(model.rating_max - model.rating_min),
            const(2.0), const(1e-6),
        )  # fmt: skip
        self.shapes = [initial[name].shape for name in self.names]
        self.constants = _newton_constants(model, mask, initial, initial, self.names)
        self.theta = self.constants.initial_theta  # the packed user terms the next step starts from

    def step(self, current: Params, logit_grad: torch.Tensor, predictions: torch.Tensor) -> Params:
        """One inner step of the user terms from ``current``.

        Args:
            current: the pre-step parameters (leading dim T): the initial ones, then the previous
                call's result.
            logit_grad: Float[T, S] d support loss / d logit per row.
            predictions: Float[T, S] support predictions at ``current``.

        Returns:
            The updated user terms by name (empty when the model has none).
        """
        if not self.names:
            return {}
        design, mask = self.design, self.mask
        gradient = (logit_grad.unsqueeze(-1) * design).sum(1)  # Float[T, P]
        if not self.newton:
            gradients = unpack_user_terms(gradient, current, self.names)
            return {name: current[name] - self.rates[name] * gradients[name] for name in self.names}
        # user_newton_step, its per-task constants taken from __init__; theta is _pack(current).
        stepped = _newton_update(
            self.theta, gradient, predictions, design, mask, self.constants, self.numbers
        )
        self.theta = stepped
        # unpack_user_terms with the sizes known: views of the packed vector.
        parts = torch.split(stepped, self.constants.sizes, dim=-1)
        return {
            name: part.reshape(shape)
            for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
        }
