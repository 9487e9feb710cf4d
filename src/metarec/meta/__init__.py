"""Adapting the model to users: the one adapt/score API and the meta-learners built on it.

:class:`Adapter` adapts a model to T users on their support rows (:meth:`Adapter.adapt` returns a
:data:`UserState`, the adapted parameters by name) and scores items with each user's state
(:meth:`Adapter.score`). :class:`MetaLearner` (MAML, FOMAML, Reptile) computes meta-gradients through
the same engine.
"""

from metarec.meta.adapter import Adapter, AdaptSettings, UserState, select_users
from metarec.meta.learners import METHODS, MetaLearner
from metarec.meta.losses import OUTER_LOSSES, masked_mae, masked_mse

__all__ = [
    "METHODS",
    "OUTER_LOSSES",
    "AdaptSettings",
    "Adapter",
    "MetaLearner",
    "UserState",
    "masked_mae",
    "masked_mse",
    "select_users",
]
