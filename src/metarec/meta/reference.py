"""A straightforward per-task MAML loop: the yardstick the vectorised learner is checked and timed against.

For each task: ``functional_call`` on the whole model, ``torch.autograd.grad(create_graph=True)`` inner
steps on the support rows, then the query loss; the losses are averaged and differentiated once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from metarec.meta.learners import masked_mse
from metarec.model import PreferenceModel, adapted_parameter_names, inner_learning_rates

if TYPE_CHECKING:
    from metarec.tasks import TaskBatch


def reference_meta_gradient(
    model: PreferenceModel,
    batch: TaskBatch,
    inner_steps: int,
    inner_lr: float,
    adapt_mode: str = "decision",
    first_order: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MAML (or FOMAML) meta-gradient computed one task at a time.

    Args:
        model: the model.
        batch: T tasks.
        inner_steps: inner SGD steps per task.
        inner_lr: inner learning rate.
        adapt_mode: which parameters the inner loop adapts.
        first_order: drop the second-order terms (inner gradients are not differentiated).

    Returns:
        ``(loss, grads)``: mean post-adaptation query MSE over the tasks (detached) and a dict
        name -> gradient for every trainable parameter.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    adapted_names = adapted_parameter_names(model, adapt_mode)
    rates = inner_learning_rates(model, adapted_names, inner_lr, params)
    total = torch.zeros(())
    for task in range(len(batch)):
        user = (batch.user_cat[task], batch.user_num[task], batch.user_multi[task])
        current = dict(params)
        for _ in range(inner_steps):
            predictions = functional_call(model, current, (*user, batch.support_items[task]))
            support_loss = masked_mse(predictions, batch.support_ratings[task], batch.support_mask[task])
            gradients = torch.autograd.grad(
                support_loss, [current[name] for name in adapted_names], create_graph=not first_order
            )
            updated = {name: current[name] - rates[name] * gradient
                       for name, gradient in zip(adapted_names, gradients, strict=True)}  # fmt: skip
            if model.user_bias_prior is not None and "user_bias" in updated:
                # Damped Gauss-Newton (MAP) step of the user bias, written out from the predictions.
                span = model.rating_max - model.rating_min
                slope = (predictions - model.rating_min) * (model.rating_max - predictions) / span
                mask = batch.support_mask[task]
                count = mask.sum().clamp(min=1.0)
                prior = model.user_bias_prior / count
                curvature = 2.0 * (mask * slope**2).sum() / count + 2.0 * prior + 1e-6
                step = gradients[adapted_names.index("user_bias")] + 2.0 * prior * (
                    current["user_bias"] - params["user_bias"]
                )
                updated["user_bias"] = current["user_bias"] - step / curvature
            current.update(updated)
        predictions = functional_call(model, current, (*user, batch.query_items[task]))
        total = total + masked_mse(predictions, batch.query_ratings[task], batch.query_mask[task])
    loss = total / len(batch)
    names = list(params)
    values = torch.autograd.grad(loss, [params[name] for name in names], allow_unused=True)
    grads = {
        name: torch.zeros_like(params[name]) if value is None else value
        for name, value in zip(names, values, strict=True)
    }
    return loss.detach(), grads
