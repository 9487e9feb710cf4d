"""A straightforward per-task MAML loop: the yardstick the vectorised learner is checked and timed against.

For each task: ``functional_call`` on the whole model, ``torch.autograd.grad(create_graph=True)`` inner
steps on the support rows, then the query loss; the losses are averaged and differentiated once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from metarec.meta.losses import masked_mse
from metarec.meta.user_terms import user_design, user_newton_step
from metarec.model import USER_PARAMETERS, PreferenceModel, adapted_parameter_names, inner_learning_rates

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
            if model.user_bias_prior is not None and any(name in updated for name in USER_PARAMETERS):
                # Damped Gauss-Newton (MAP) step of the user terms, from the current predictions.
                factor_rows = model.item_factor_rows(
                    batch.support_items[task], current.get("item_factors.weight")
                )
                design = user_design(model, predictions, factor_rows)
                named_gradients = dict(zip(adapted_names, gradients, strict=True))
                updated.update(user_newton_step(model, predictions, design, batch.support_mask[task],
                                                current, params, named_gradients))  # fmt: skip
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
