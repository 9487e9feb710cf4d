"""MAML-family meta-learners: meta-gradients through the one adapt/score engine, :class:`Adapter`.

The inner loop is :class:`~metarec.meta.adapter.Adapter`'s: a pure function of (adapted parameters,
one task) that ``torch.func.grad`` differentiates and ``torch.func.vmap`` maps over the tasks of a
:class:`~metarec.tasks.TaskBatch`, so no model is copied per task and evaluation and serving adapt
with exactly the code that was meta-trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import vmap

from metarec.features import EncodedFeatures
from metarec.meta.adapter import Adapter, AdaptSettings
from metarec.meta.losses import OUTER_LOSSES
from metarec.model import PreferenceModel, adapted_parameter_names

if TYPE_CHECKING:
    from metarec.tasks import TaskBatch

METHODS = ("maml", "fomaml", "reptile")
Params = dict[str, torch.Tensor]


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
        outer_loss: the query loss the meta-update minimises: ``"mse"`` (this class's default, as the
            reference loop) or ``"l1"`` (meta-training's default, ``TrainSettings.outer_loss``; aims
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

    def _adapter(self, params: Params) -> Adapter:
        """The adapt engine over ``params`` (the meta-gradient flows through them)."""
        settings = AdaptSettings(self.adapt_mode, self.inner_steps, self.inner_lr)
        return Adapter(self.model, settings, params=params)

    def _hidden_ids(self, tasks: slice, total: int, n_rows: int, device: torch.device) -> torch.Tensor | None:
        """Bool[T, N] rows whose item id is hidden this step (None without id dropout).

        The mask is drawn for the whole global meta-batch (``total`` tasks) and this batch's ``tasks``
        are sliced out: every data-parallel rank draws the same numbers, so each shard gets its own
        rows of one mask, as a single process would, instead of all shards sharing one.
        """
        if self.id_dropout == 0.0:
            return None
        # Drawn from the CPU generator, which checkpoints save and restore (a CUDA draw would restart
        # from the seed after a resume), and the same on CPU and GPU runs.
        return (torch.rand(total, n_rows) < self.id_dropout)[tasks].to(device)

    def meta_gradient(
        self, batch: TaskBatch, total_tasks: int | None = None, first_task: int = 0
    ) -> tuple[torch.Tensor, Params]:
        """Meta-loss and meta-gradient of the model's trainable parameters over a batch of tasks.

        Args:
            batch: T training tasks (support rows adapt, query rows score the adaptation).
            total_tasks: the number of tasks the loss is averaged over; defaults to T. Data-parallel
                ranks pass the global meta-batch size, so that summing the ranks' results gives the
                mean over the global batch.
            first_task: position of ``batch``'s first task in the global meta-batch (data-parallel
                ranks), so that the id-dropout mask is the global batch's.

        Returns:
            ``(loss, grads)``: the detached mean post-adaptation query loss (``outer_loss``) (summed over this batch and
            divided by ``total_tasks``) and a dict name -> gradient for every trainable parameter.
        """
        total = len(batch) if total_tasks is None else int(total_tasks)
        tasks = slice(first_task, first_task + len(batch))
        # Frozen parameters (requires_grad False) still take part in the inner loop; only the trainable
        # ones get gradients.
        params = dict(self.model.named_parameters())
        if self.method == "reptile":
            return self._reptile(batch, params, total, tasks)
        adapter = self._adapter(params)
        n_rows = batch.support_items.shape[1] + batch.query_items.shape[1]
        hidden = self._hidden_ids(tasks, total, n_rows, batch.support_items.device)
        support, query = adapter.support_query_inputs(batch, hidden)
        adapted = adapter.adapt_inputs(support, batch.support_ratings, batch.support_mask, self.first_order)
        task_losses = vmap(adapter.outer_loss(self.outer_loss))(
            adapted, query, batch.query_ratings, batch.query_mask
        )
        loss = task_losses.sum() / total
        return loss.detach(), _gradients(loss, params)

    def _reptile(
        self, batch: TaskBatch, params: Params, total: int, tasks: slice
    ) -> tuple[torch.Tensor, Params]:
        # Reptile trains on the whole task (support and query rows). The adapted parameters move
        # towards the adapted solutions: direction (params - adapted) / (steps * lr), which equals the
        # plain gradient at one step. Parameters the inner loop does not adapt (embeddings in modes
        # "decision"/"head") get the first-order gradient of the post-adaptation loss instead.
        adapter = self._adapter(params)
        items = torch.cat([batch.support_items, batch.query_items], dim=1)
        ratings = torch.cat([batch.support_ratings, batch.query_ratings], dim=1)
        mask = torch.cat([batch.support_mask, batch.query_mask], dim=1)
        hidden = self._hidden_ids(tasks, total, items.shape[1], items.device)
        users = EncodedFeatures(batch.user_cat, batch.user_num, batch.user_multi)
        inputs = adapter.inputs(users, items, hidden)
        adapted = adapter.adapt_inputs(inputs, ratings, mask, first_order=True)
        task_losses = vmap(adapter.outer_loss(self.outer_loss))(adapted, inputs, ratings, mask)
        loss = task_losses.sum() / total
        grads = _gradients(loss, params)
        if self.inner_steps > 0:
            scale = 1.0 / (self.inner_steps * self.inner_lr * total)
            for name in (name for name in adapter.adapted_names if name in grads):
                grads[name] = (params[name].detach() - adapted[name].detach()).sum(0) * scale
        n_support = batch.support_items.shape[1]
        query_losses = vmap(OUTER_LOSSES[self.outer_loss])(
            vmap(adapter.predict)(adapted, inputs)[:, n_support:].detach(),
            batch.query_ratings,
            batch.query_mask,
        )
        return query_losses.sum().detach() / total, grads


def _gradients(loss: torch.Tensor, params: Params) -> Params:
    """Gradients of the trainable parameters (zeros where the loss does not depend on one)."""
    names = [name for name, parameter in params.items() if parameter.requires_grad]
    values = torch.autograd.grad(loss, [params[name] for name in names], allow_unused=True)
    return {
        name: torch.zeros_like(params[name]) if value is None else value
        for name, value in zip(names, values, strict=True)
    }
