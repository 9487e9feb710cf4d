"""Meta-learners (MAML, FOMAML, Reptile) and the vectorised inner loop shared with evaluation and serving.

``adapt`` adapts a model to every task of a :class:`~metarec.tasks.TaskBatch` in one ``torch.func.vmap``
pass; ``predict`` scores items with the adapted parameters; ``make_learner`` builds a meta-learner whose
``meta_gradient(batch)`` returns ``(loss, grads)``.
"""

from metarec.meta.learners import METHODS, MetaLearner, adapt, make_learner, masked_mae, masked_mse, predict

__all__ = ["METHODS", "MetaLearner", "adapt", "make_learner", "masked_mae", "masked_mse", "predict"]
