"""Honest non-meta-learned baselines for few-shot rating prediction.

Every baseline is fitted on the same data as meta-training: the *train users' support rows* (given as
flat ``users, items, ratings`` arrays). A new user is then described only by a support set, and each
baseline predicts that user's query rows from it:

- ``global_mean``: the training mean for every row.
- ``item_user_bias``: mean + item bias (from training) + a regularised user bias from the support set.
- ``mf_foldin``: biased matrix factorisation (ALS, seeded); a new user's vector and bias are fitted by
  ridge regression on the support set ("fold-in"). Items without factors (cold items) fall back to
  mean + user bias.
- ``global_model``: a :class:`metarec.model.PreferenceModel` trained by plain minibatch Adam on all
  training rows; no meta-learning and no adaptation.
- ``finetune``: that global model fine-tuned per user on the support set with the shared
  :class:`metarec.meta.Adapter` inner loop (plain transfer learning).

Item indices are ``item_idx`` (0..n_items-1, warm and cold alike).
"""

from __future__ import annotations

import copy
import logging
import math

import torch

from metarec.tasks import TaskBatch

logger = logging.getLogger(__name__)

_RIDGE_CHUNK_ROWS = 8192

# fitted_start is built by metarec.evaluation (the meta-learners' own start, no meta-training).
BASELINE_NAMES = ("global_mean", "item_user_bias", "mf_foldin", "global_model", "finetune", "fitted_start")


def _as_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(values).to(dtype)


class RatingBaseline:
    """Common interface: ``fit`` on training rows, ``predict`` the query rows of few-shot tasks.

    Args:
        rating_min: Lowest allowed rating; predictions are clipped to the rating scale.
        rating_max: Highest allowed rating.
    """

    name = "baseline"

    def __init__(self, rating_min: float = 1.0, rating_max: float = 5.0):
        self.rating_min = float(rating_min)
        self.rating_max = float(rating_max)
        self.global_mean = math.nan

    def fit(self, users, items, ratings, n_items: int) -> RatingBaseline:
        """Fits the baseline on training rows.

        Args:
            users: Int[N] user index of each training row.
            items: Int[N] item index of each training row.
            ratings: Float[N] rating of each training row.
            n_items: Size of the item catalogue (item indices are < n_items).

        Returns:
            self, fitted.
        """
        raise NotImplementedError

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """Predicts every query row of every task from that task's support set.

        Args:
            batch: Few-shot tasks (support rows to learn the user from, query rows to score).

        Returns:
            Float[T, Q] predicted ratings clipped to the rating scale (padding rows hold arbitrary values).
        """
        raise NotImplementedError

    def _clip(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions.clamp(self.rating_min, self.rating_max).to(torch.float32)


class GlobalMean(RatingBaseline):
    """Predicts the mean training rating for every row."""

    name = "global_mean"

    def fit(self, users, items, ratings, n_items: int) -> GlobalMean:
        """See :meth:`RatingBaseline.fit`."""
        self.global_mean = float(_as_tensor(ratings, torch.float64).mean())
        return self

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """See :meth:`RatingBaseline.predict`."""
        return self._clip(torch.full(batch.query_items.shape, self.global_mean, dtype=torch.float64))


def _fit_biases(
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
    n_users: int,
    n_items: int,
    item_reg: float,
    user_reg: float,
    iterations: int = 10,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Regularised user and item biases by alternating shrunk means (float64).

    Returns:
        (global mean, user biases Float[n_users], item biases Float[n_items]).
    """
    mean = float(ratings.mean())
    user_bias = torch.zeros(n_users, dtype=torch.float64)
    item_bias = torch.zeros(n_items, dtype=torch.float64)
    user_counts = torch.zeros(n_users, dtype=torch.float64).index_add_(0, users, torch.ones_like(ratings))
    item_counts = torch.zeros(n_items, dtype=torch.float64).index_add_(0, items, torch.ones_like(ratings))
    for _ in range(iterations):
        residual = ratings - mean - user_bias[users]
        item_bias = torch.zeros(n_items, dtype=torch.float64).index_add_(0, items, residual) / (
            item_counts + item_reg
        )
        residual = ratings - mean - item_bias[items]
        user_bias = torch.zeros(n_users, dtype=torch.float64).index_add_(0, users, residual) / (
            user_counts + user_reg
        )
    return mean, user_bias, item_bias


class ItemUserBias(RatingBaseline):
    """Mean + item bias (from training) + user bias shrunk towards 0 (from the support set).

    Args:
        item_reg: Shrinkage of item biases (pseudo-count of ratings at the mean).
        user_reg: Shrinkage of user biases, in training and when estimating a new user's bias.
        rating_min: Lowest allowed rating.
        rating_max: Highest allowed rating.
    """

    name = "item_user_bias"

    def __init__(
        self, item_reg: float = 10.0, user_reg: float = 5.0, rating_min: float = 1.0, rating_max: float = 5.0
    ):
        super().__init__(rating_min, rating_max)
        self.item_reg = float(item_reg)
        self.user_reg = float(user_reg)
        self.item_bias = torch.zeros(0, dtype=torch.float64)

    def fit(self, users, items, ratings, n_items: int) -> ItemUserBias:
        """See :meth:`RatingBaseline.fit`."""
        users = _as_tensor(users, torch.long)
        items = _as_tensor(items, torch.long)
        ratings = _as_tensor(ratings, torch.float64)
        n_users = int(users.max()) + 1 if users.numel() else 0
        self.global_mean, _, self.item_bias = _fit_biases(
            users, items, ratings, n_users, n_items, self.item_reg, self.user_reg
        )
        return self

    def user_biases(self, batch: TaskBatch) -> torch.Tensor:
        """Shrunk mean residual of each task's support set.

        Args:
            batch: Few-shot tasks.

        Returns:
            Float64[T] user bias per task (0 for an empty support set).
        """
        mask = batch.support_mask.to(torch.float64)
        residual = (
            batch.support_ratings.to(torch.float64) - self.global_mean - self.item_bias[batch.support_items]
        ) * mask
        return residual.sum(dim=1) / (mask.sum(dim=1) + self.user_reg)

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """See :meth:`RatingBaseline.predict`."""
        predictions = self.global_mean + self.user_biases(batch)[:, None] + self.item_bias[batch.query_items]
        return self._clip(predictions)


def _ridge_rows(
    features: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    group: torch.Tensor,
    n_groups: int,
    reg: torch.Tensor,
) -> torch.Tensor:
    """Per-group ridge regression solved in one batched call.

    Args:
        features: Float64[N, F] design rows.
        targets: Float64[N] targets.
        weights: Float64[N] row weights (0 drops a row).
        group: Long[N] group of each row.
        n_groups: Number of groups.
        reg: Float64[F] ridge penalty per coefficient.

    Returns:
        Float64[n_groups, F] coefficients (0 for a group without rows).
    """
    weighted = features * weights[:, None]
    gram = torch.zeros(n_groups, features.shape[1], features.shape[1], dtype=torch.float64)
    # Chunked so the [rows, F, F] outer products stay small (F=21 on 100k rows would be ~350 MB).
    for start in range(0, features.shape[0], _RIDGE_CHUNK_ROWS):
        chunk = slice(start, start + _RIDGE_CHUNK_ROWS)
        gram.index_add_(0, group[chunk], weighted[chunk, :, None] * features[chunk, None, :])
    gram += torch.diag(reg)
    rhs = torch.zeros(n_groups, features.shape[1], dtype=torch.float64).index_add_(
        0, group, weighted * targets[:, None]
    )
    return torch.linalg.solve(gram, rhs)


class MFFoldIn(RatingBaseline):
    """Biased matrix factorisation by ALS, with a ridge fold-in of each new user.

    Model: ``r = mean + b_u + b_i + p_u . q_i``. Training alternates ridge solves for all users
    ``(p_u, b_u)`` and all items ``(q_i, b_i)``; a new user's ``(p_u, b_u)`` is the same ridge solve
    against the fixed item factors using only their support rows. Items never rated in training (cold
    items) keep ``q_i = 0, b_i = 0`` and so fall back to ``mean + b_u``.

    Args:
        factors: Latent dimension.
        reg: Ridge penalty on the factors (training and fold-in).
        bias_reg: Ridge penalty on the biases (training and fold-in).
        foldin_reg: Ridge penalty on a new user's factors (None = ``reg``); with one to five support
            ratings a stronger penalty keeps the fold-in near the biases-only prediction.
        foldin_bias_reg: Ridge penalty on a new user's bias (None = ``bias_reg``).
        iterations: ALS sweeps.
        seed: Seed of the item-factor initialisation.
        rating_min: Lowest allowed rating.
        rating_max: Highest allowed rating.
    """

    name = "mf_foldin"

    def __init__(
        self,
        factors: int = 10,
        reg: float = 10.0,
        bias_reg: float = 5.0,
        foldin_reg: float | None = None,
        foldin_bias_reg: float | None = None,
        iterations: int = 15,
        seed: int = 0,
        rating_min: float = 1.0,
        rating_max: float = 5.0,
    ):
        super().__init__(rating_min, rating_max)
        self.factors = int(factors)
        self.reg = float(reg)
        self.bias_reg = float(bias_reg)
        self.foldin_reg = self.reg if foldin_reg is None else float(foldin_reg)
        self.foldin_bias_reg = self.bias_reg if foldin_bias_reg is None else float(foldin_bias_reg)
        self.iterations = int(iterations)
        self.seed = int(seed)
        self.item_factors = torch.zeros(0, self.factors, dtype=torch.float64)
        self.item_bias = torch.zeros(0, dtype=torch.float64)

    def _penalty(self, factor_reg: float, bias_reg: float) -> torch.Tensor:
        return torch.tensor([factor_reg] * self.factors + [bias_reg], dtype=torch.float64)

    def fit(self, users, items, ratings, n_items: int) -> MFFoldIn:
        """See :meth:`RatingBaseline.fit`."""
        users = _as_tensor(users, torch.long)
        items = _as_tensor(items, torch.long)
        ratings = _as_tensor(ratings, torch.float64)
        n_users = int(users.max()) + 1 if users.numel() else 0
        self.global_mean, user_bias, item_bias = _fit_biases(
            users, items, ratings, n_users, n_items, 10.0, 5.0
        )
        generator = torch.Generator().manual_seed(self.seed)
        item_factors = 0.1 * torch.randn(n_items, self.factors, generator=generator, dtype=torch.float64)
        item_factors[torch.bincount(items, minlength=n_items) == 0] = 0.0
        weights = torch.ones_like(ratings)
        penalty = self._penalty(self.reg, self.bias_reg)
        for _ in range(self.iterations):
            # User step: targets net of the item bias; the trailing 1 column learns the user bias.
            design = torch.cat([item_factors[items], torch.ones_like(ratings)[:, None]], dim=1)
            solution = _ridge_rows(
                design, ratings - self.global_mean - item_bias[items], weights, users, n_users, penalty
            )
            user_factors, user_bias = solution[:, :-1], solution[:, -1]
            design = torch.cat([user_factors[users], torch.ones_like(ratings)[:, None]], dim=1)
            solution = _ridge_rows(
                design, ratings - self.global_mean - user_bias[users], weights, items, n_items, penalty
            )
            item_factors, item_bias = solution[:, :-1], solution[:, -1]
        self.item_factors, self.item_bias = item_factors, item_bias
        return self

    def fold_in(self, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge-fits each task's user vector and bias on its support set.

        Args:
            batch: Few-shot tasks.

        Returns:
            (user factors Float64[T, factors], user biases Float64[T]); zeros for an empty support set.
        """
        n_tasks, n_support = batch.support_items.shape
        items = batch.support_items.reshape(-1)
        ratings = batch.support_ratings.reshape(-1).to(torch.float64)
        design = torch.cat(
            [self.item_factors[items], torch.ones(items.shape[0], 1, dtype=torch.float64)], dim=1
        )
        targets = ratings - self.global_mean - self.item_bias[items]
        group = torch.arange(n_tasks).repeat_interleave(n_support)
        weights = batch.support_mask.reshape(-1).to(torch.float64)
        solution = _ridge_rows(
            design, targets, weights, group, n_tasks, self._penalty(self.foldin_reg, self.foldin_bias_reg)
        )
        return solution[:, :-1], solution[:, -1]

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """See :meth:`RatingBaseline.predict`."""
        user_factors, user_bias = self.fold_in(batch)
        interaction = torch.einsum("tf,tqf->tq", user_factors, self.item_factors[batch.query_items])
        predictions = self.global_mean + user_bias[:, None] + self.item_bias[batch.query_items] + interaction
        return self._clip(predictions)


class GlobalModel(RatingBaseline):
    """A PreferenceModel trained by minibatch Adam on every training row; never adapted.

    Args:
        model: An untrained (or pre-trained) PreferenceModel; it is trained in place.
        user_features: Encoded features of all users (row = user_idx), to look up each training row's user.
        epochs: Maximum training epochs.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        batch_size: Rows per minibatch.
        patience: Stop after this many epochs without a better validation MAE (when validating).
        seed: Seed of the minibatch order.
        rating_min: Lowest allowed rating.
        rating_max: Highest allowed rating.
    """

    name = "global_model"

    def __init__(
        self,
        model: torch.nn.Module,
        user_features,
        epochs: int = 20,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        patience: int = 3,
        seed: int = 0,
        rating_min: float = 1.0,
        rating_max: float = 5.0,
    ):
        super().__init__(rating_min, rating_max)
        self.model = model
        self.user_features = user_features
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.patience = int(patience)
        self.seed = int(seed)
        self.history: list[dict] = []

    def fit(self, users, items, ratings, n_items: int, validation: TaskBatch | None = None) -> GlobalModel:
        """Trains the model on the training rows (see :meth:`RatingBaseline.fit`).

        Args:
            users: Int[N] user index of each training row.
            items: Int[N] item index of each training row.
            ratings: Float[N] ratings.
            n_items: Size of the item catalogue (unused: the model carries its catalogue).
            validation: Validation-user tasks; when given, the epoch with the lowest query MAE (no
                adaptation) is kept and training stops early after ``patience`` worse epochs.

        Returns:
            self, fitted.
        """
        users = _as_tensor(users, torch.long)
        items = _as_tensor(items, torch.long)
        ratings = _as_tensor(ratings, torch.float32)
        self.global_mean = float(ratings.double().mean())
        generator = torch.Generator().manual_seed(self.seed)
        if hasattr(self.model, "init_output"):
            # Start at the training mean so early epochs are not spent learning the rating offset.
            self.model.init_output(self.global_mean)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        cat, num, multi = self.user_features
        best_mae, best_state, stale_epochs = math.inf, None, 0
        for epoch in range(self.epochs):
            self.model.train()
            order = torch.randperm(users.shape[0], generator=generator)
            total = 0.0
            for start in range(0, order.shape[0], self.batch_size):
                rows = order[start : start + self.batch_size]
                row_users = users[rows]
                predictions = self.model(cat[row_users], num[row_users], multi[row_users], items[rows, None])
                loss = torch.nn.functional.mse_loss(predictions[:, 0], ratings[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * rows.shape[0]
            record = {"epoch": epoch, "train_mse": total / max(order.shape[0], 1)}
            if validation is not None:
                from metarec.metrics import mae

                record["val_mae"] = mae(
                    self.predict(validation), validation.query_ratings, validation.query_mask
                )
                if record["val_mae"] < best_mae - 1e-5:
                    best_mae, best_state, stale_epochs = (
                        record["val_mae"],
                        copy.deepcopy(self.model.state_dict()),
                        0,
                    )
                else:
                    stale_epochs += 1
            self.history.append(record)
            logger.info("global_model %s", record)
            if validation is not None and stale_epochs >= self.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """See :meth:`RatingBaseline.predict` (the support set is ignored)."""
        self.model.eval()
        predictions = self.model(batch.user_cat, batch.user_num, batch.user_multi, batch.query_items)
        return self._clip(predictions)


class Finetune(RatingBaseline):
    """The global model fine-tuned on each user's support set with the shared :class:`metarec.meta.Adapter` loop.

    Args:
        model: A trained global PreferenceModel (not modified).
        steps: Inner gradient steps per user.
        lr: Inner learning rate.
        mode: Which parameters adapt: "all" | "decision" | "head" (see ``adapted_parameter_names``).
        rating_min: Lowest allowed rating.
        rating_max: Highest allowed rating.
    """

    name = "finetune"

    def __init__(
        self,
        model: torch.nn.Module,
        steps: int = 5,
        lr: float = 0.01,
        mode: str = "all",
        rating_min: float = 1.0,
        rating_max: float = 5.0,
    ):
        super().__init__(rating_min, rating_max)
        self.model = model
        self.steps = int(steps)
        self.lr = float(lr)
        self.mode = mode

    def fit(self, users, items, ratings, n_items: int) -> Finetune:
        """Nothing to fit: the global model is trained by :class:`GlobalModel` (kept for the interface)."""
        self.global_mean = float(_as_tensor(ratings, torch.float64).mean())
        return self

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """See :meth:`RatingBaseline.predict`: adapts per user on the support rows, then scores."""
        from metarec.meta import Adapter, AdaptSettings

        self.model.eval()
        settings = AdaptSettings.from_dict(mode=self.mode, inner_steps=self.steps, inner_lr=self.lr)
        return self._clip(Adapter(self.model, settings).score_tasks(batch))
