"""Peer references: established library recommenders scored under the project's cold-start protocol.

They answer "would a well-known library do as well?", so they are labelled as references in the
evaluation, never candidates for serving. Each one is *retrained* with every observed support rating
of the users it is asked about (train users' support rows, plus the evaluated users' support rows as
extra users): a full retrain per batch of new users, which is what these models cost to serve a new
user, and which the report states.

- ``surprise_svdpp``: scikit-surprise SVD++ (implicit feedback of the rated items).
- ``surprise_knn``: scikit-surprise KNNBaseline, item-based, ``pearson_baseline`` similarity.
- ``lightfm``: LightFM hybrid: users and items are the sums of their feature embeddings (one-hot of
  the encoded categorical / hashed features, quantile bins of numeric ones, multi-hot labels) plus an
  identity embedding for users with ratings and warm items, so cold items are scored from features.
  It learns liked (rating >= training mean) vs not (logistic loss); a least-squares line fitted on the
  training rows maps its score to the rating scale.

Their packages (``scikit-surprise``, ``lightfm-next``) are the ``bench`` extra: imported only here.
Hyper-parameters come from small grids, chosen by the MAE on the *validation* users' query rows.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)

PEER_NAMES = ("surprise_svdpp", "surprise_knn", "lightfm")
# Grids searched on validation users (first value = the untuned default). Small on purpose: every point
# is a full retrain on the training rows plus the validation users' support rows.
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "surprise_svdpp": {"n_factors": [20, 50], "n_epochs": [20], "lr_all": [0.007], "reg_all": [0.02, 0.05]},
    "surprise_knn": {"k": [40, 20], "shrinkage": [100], "min_k": [1]},
    "lightfm": {"no_components": [32, 16], "epochs": [30, 15], "alpha": [1e-5], "learning_rate": [0.05]},
}
PACKAGES = {"surprise_svdpp": "surprise", "surprise_knn": "surprise", "lightfm": "lightfm"}
# Module -> the distribution of the ``bench`` extra that provides it (what an error message names).
DISTRIBUTIONS = {"surprise": "scikit-surprise", "lightfm": "lightfm-next"}
_NUMERIC_BINS = 8


def resolve_peers(value) -> dict[str, dict[str, list]]:
    """Reads the evaluation's ``peers`` setting.

    Args:
        value: A list of peer names (default grids), or a mapping name -> grid overrides
            (``{"surprise_svdpp": {"n_factors": [10]}}``); empty or None: no peers.

    Returns:
        Peer name -> full grid (every value a list).

    Raises:
        ValueError: An unknown peer name or grid key.
    """
    if not value:
        return {}
    entries = value if isinstance(value, dict) else dict.fromkeys(value, None)
    grids = {}
    for name, overrides in entries.items():
        if name not in DEFAULT_GRIDS:
            raise ValueError(
                f"unknown peer {name!r} in evaluation setting 'peers'; known: {list(PEER_NAMES)}"
            )
        grid = copy.deepcopy(DEFAULT_GRIDS[name])
        unknown = set(overrides or {}) - set(grid)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} for peer {name!r}; known: {sorted(grid)}")
        grid.update({key: v if isinstance(v, list | tuple) else [v] for key, v in (overrides or {}).items()})
        grids[name] = grid
    return grids


def missing_packages(names) -> list[str]:
    """The Python packages the given peers need that are not importable (``pip install .[bench]``)."""
    import importlib.util

    return sorted({PACKAGES[n] for n in names if importlib.util.find_spec(PACKAGES[n]) is None})


def require_packages(names) -> None:
    """Refuses peers whose packages are not installed, before any data is read or model fitted.

    The ``bench`` extra is in no image (images/*.extras): the evaluate component in the components image
    can never score peers, so it must say so at once rather than after fitting every baseline.

    Args:
        names: Peer names (e.g. the keys of :func:`resolve_peers`).

    Raises:
        ValueError: Naming the missing distributions, the extra that has them and the images that lack it.
    """
    missing = missing_packages(names)
    if missing:
        dists = sorted(DISTRIBUTIONS[m] for m in missing)
        raise ValueError(
            f"evaluate setting 'peers' {sorted(names)} needs {dists}, from the 'bench' extra "
            "(pip install 'metarec[bench]'), which the components and serving images do not install: "
            "peers are quality-bench references (bench/coldstart_quality.py); drop 'peers' from the "
            "evaluate config to run in the image"
        )


def _grid_points(grid: dict[str, list]) -> list[dict]:
    points = [{}]
    for key, values in grid.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


class _SurprisePeer:
    """A scikit-surprise algorithm trained on (user, item, rating) rows."""

    def __init__(self, name: str, settings: dict, rating_min: float, rating_max: float, seed: int):
        self.name, self.settings, self.seed = name, dict(settings), int(seed)
        self.rating_min, self.rating_max = rating_min, rating_max

    def _algorithm(self):
        import surprise

        s = self.settings
        if self.name == "surprise_svdpp":
            return surprise.SVDpp(n_factors=int(s["n_factors"]), n_epochs=int(s["n_epochs"]),
                                  lr_all=float(s["lr_all"]), reg_all=float(s["reg_all"]),
                                  random_state=self.seed, cache_ratings=True)  # fmt: skip
        sim = {"name": "pearson_baseline", "user_based": False, "shrinkage": int(s["shrinkage"])}
        return surprise.KNNBaseline(k=int(s["k"]), min_k=int(s["min_k"]), sim_options=sim, verbose=False)

    def train(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, features) -> object:
        """Fits a fresh algorithm on the rows; ``features`` (user features of every row) is unused."""
        import pandas as pd
        import surprise

        frame = pd.DataFrame({"user": users, "item": items, "rating": ratings})
        reader = surprise.Reader(rating_scale=(self.rating_min, self.rating_max))
        trainset = surprise.Dataset.load_from_df(frame, reader).build_full_trainset()
        return self._algorithm().fit(trainset)

    def predict(self, fitted, users: np.ndarray, items: np.ndarray, features) -> np.ndarray:
        """Predicted ratings of (user, item) pairs; unknown items get surprise's baseline estimate."""
        return np.array([fitted.predict(int(u), int(i)).est for u, i in zip(users, items, strict=True)])


class _LightFMPeer:
    """LightFM with user and item features (see the module docstring)."""

    name = "lightfm"

    def __init__(self, settings: dict, pre, seed: int):
        self.settings, self.seed = dict(settings), int(seed)
        self.rating_min, self.rating_max = pre.rating_min, pre.rating_max
        self.user_dims, self.item_dims = pre.encoder.user_dims, pre.encoder.item_dims
        warm = pre.item_warm_idx.numpy() > 0
        # Bin edges are fitted like every other statistic: on the train users and the warm items only,
        # so validation and test users (and cold items) never shape the features the peer learns from.
        train_users = torch.from_numpy(np.asarray(pre.user_split) == 0)
        self.user_edges = _bin_edges(pre.user_features.num[train_users])
        item_edges = _bin_edges(pre.item_features.num[torch.from_numpy(warm)])
        self.item_matrix = _feature_matrix(pre.item_features, self.item_dims, item_edges, identity=warm)

    def train(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, user_features) -> object:
        """Fits on the rows; ``user_features`` holds the encoded features of every user index."""
        from lightfm import LightFM
        from scipy import sparse

        n_users = int(user_features.cat.shape[0])
        user_matrix = _feature_matrix(user_features, self.user_dims, self.user_edges,
                                      identity=np.ones(n_users, dtype=bool))  # fmt: skip
        threshold = float(ratings.mean())
        labels = np.where(ratings >= threshold, 1.0, -1.0).astype(np.float32)
        interactions = sparse.coo_matrix((labels, (users, items)), shape=(n_users, self.item_matrix.shape[0]))
        s = self.settings
        model = LightFM(no_components=int(s["no_components"]), loss="logistic",
                        learning_rate=float(s["learning_rate"]), item_alpha=float(s["alpha"]),
                        user_alpha=float(s["alpha"]), random_state=self.seed)  # fmt: skip
        model.fit(interactions, user_features=user_matrix, item_features=self.item_matrix,
                  epochs=int(s["epochs"]), num_threads=1)  # fmt: skip
        scores = self._scores(model, user_matrix, users, items)
        # Least-squares line from score to rating: LightFM ranks, MAE needs the rating scale.
        slope, intercept = np.polyfit(scores, ratings, 1)
        return model, user_matrix, float(slope), float(intercept)

    def _scores(self, model, user_matrix, users, items) -> np.ndarray:
        return model.predict(users.astype(np.int32), items.astype(np.int32), user_features=user_matrix,
                             item_features=self.item_matrix, num_threads=1)  # fmt: skip

    def predict(self, fitted, users: np.ndarray, items: np.ndarray, user_features) -> np.ndarray:
        """Predicted ratings of (user, item) pairs (users must be rows of the fitted user matrix)."""
        model, user_matrix, slope, intercept = fitted
        return intercept + slope * self._scores(model, user_matrix, users, items)


def _bin_edges(numeric: torch.Tensor) -> list[np.ndarray]:
    """Quantile bin edges of each numeric feature column of the given (training) rows."""
    values = numeric.numpy()
    quantiles = np.linspace(0, 1, _NUMERIC_BINS + 1)[1:-1]
    return [np.unique(np.quantile(values[:, j], quantiles)) for j in range(values.shape[1])]


def _feature_matrix(features, dims, edges: list[np.ndarray], identity: np.ndarray):
    """Sparse LightFM feature rows: [identity | one-hot categorical | numeric bins | multi-hot], rows sum to 1.

    Args:
        features: EncodedFeatures (cat Long[N, C], num Float[N, D], multi Float[N, M]).
        dims: Their FeatureDims (vocabulary sizes of the categorical columns).
        edges: Bin edges per numeric column.
        identity: Bool[N]; rows that get their own identity column.
    """
    from scipy import sparse

    n = features.cat.shape[0]
    rows, cols, vals = [], [], []
    with_id = np.flatnonzero(identity[:n])
    rows.append(with_id), cols.append(with_id), vals.append(np.ones(len(with_id)))
    offset = n
    cat = features.cat.numpy()
    for j, size in enumerate(dims.cat_sizes):
        present = np.flatnonzero(cat[:, j] > 0)  # index 0 = missing / out of vocabulary
        rows.append(present), cols.append(offset + cat[present, j]), vals.append(np.ones(len(present)))
        offset += int(size)
    num = features.num.numpy()
    for j, column_edges in enumerate(edges):
        bins = np.searchsorted(column_edges, num[:, j])
        rows.append(np.arange(n)), cols.append(offset + bins), vals.append(np.ones(n))
        offset += len(column_edges) + 1
    multi = features.multi.numpy()
    r, c = np.nonzero(multi)
    rows.append(r), cols.append(offset + c), vals.append(multi[r, c])
    offset += multi.shape[1]
    matrix = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, offset),
        dtype=np.float32,
    )
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    sums[sums == 0] = 1.0
    return sparse.diags(1.0 / sums).dot(matrix).tocsr().astype(np.float32)


def _signature(items: np.ndarray, ratings: np.ndarray, features) -> str:
    """Order-free fingerprint of a user's features and support set, to recognise a train user's own rows.

    The features are part of it: a new user whose few support ratings happen to equal a train user's
    whole support set (one or three rows at small K) is another user, to be learned from its own rows
    and features, not scored as that train user.

    Args:
        items: Int[S] support items.
        ratings: Float[S] their ratings.
        features: The user's ``(cat, num, multi)`` feature rows (tensors).
    """
    order = np.lexsort((ratings, items))
    pairs = np.stack([items[order].astype(np.float64), ratings[order].astype(np.float64)])
    digest = hashlib.sha1(pairs.tobytes())
    for part in features:
        digest.update(np.ascontiguousarray(part.detach().cpu().numpy(), dtype=np.float64).tobytes())
    return digest.hexdigest()


class RetrainedPeer:
    """Evaluation predictor of one peer: retrained with the support rows of the users it scores.

    ``predict(batch)`` trains the peer on the train users' support rows plus the support rows of every
    task whose support set is not already a train user's rows (those tasks become extra users), then
    scores the query rows. The base model (no extra users: warm and item-cold scenarios) and the last
    retrain are cached, so user_cold and user_item_cold (same users, same support rows) share one
    retrain. ``predict.whole_batch`` asks the evaluator for the scenario's tasks in one call, so that
    there is one retrain per scenario / K-shot.

    Args:
        name: Peer name (one of :data:`PEER_NAMES`).
        settings: One point of its grid.
        pre: A loaded :class:`metarec.tasks.Preprocessed`.
        seed: Seed of the algorithm's initialisation.
    """

    def __init__(self, name: str, settings: dict, pre, seed: int):
        self.name, self.settings = name, dict(settings)
        if name == "lightfm":
            self.peer = _LightFMPeer(settings, pre, seed)
        else:
            self.peer = _SurprisePeer(name, settings, pre.rating_min, pre.rating_max, seed)
        self.rating_min, self.rating_max = pre.rating_min, pre.rating_max
        users, items, ratings = pre.training_rows()
        self.users, self.items, self.ratings = (
            users.numpy(),
            items.numpy(),
            ratings.numpy().astype(np.float64),
        )
        self.n_users = pre.n_users
        self.user_features = pre.user_features
        self.known = self._train_user_signatures()
        self._cache: dict[str, object] = {}
        self.retrains = 0  # full retrains run so far (the report states their cost)
        self.retrain_seconds = 0.0
        self.grid_val_mae: list[dict] = []  # filled by fit_peers: every grid point tried
        self.tuning_seconds = 0.0  # filled by fit_peers: the retrains of that grid search

    def _train_user_signatures(self) -> dict[str, int]:
        order = np.argsort(self.users, kind="stable")
        users, items, ratings = self.users[order], self.items[order], self.ratings[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        ends = np.r_[starts[1:], len(users)]
        features = self.user_features
        return {
            _signature(items[a:b], ratings[a:b], (features.cat[u], features.num[u], features.multi[u])): u
            for a, b in zip(starts, ends, strict=True)
            for u in (int(users[a]),)
        }

    def predict(self, batch) -> torch.Tensor:
        """Retrains (or reuses a cached fit) and predicts every query row.

        Args:
            batch: Few-shot tasks (a whole scenario).

        Returns:
            Float[T, Q] predicted ratings clipped to the rating scale.
        """
        import time

        from metarec.features import EncodedFeatures

        support_items, support_ratings = batch.support_items.numpy(), batch.support_ratings.numpy()
        support_mask = batch.support_mask.numpy() > 0
        task_user = np.empty(len(batch), dtype=np.int64)
        new_rows, new_tasks = [], []
        for t in range(len(batch)):
            items, ratings = (
                support_items[t][support_mask[t]],
                support_ratings[t][support_mask[t]].astype(np.float64),
            )
            known = self.known.get(
                _signature(items, ratings, (batch.user_cat[t], batch.user_num[t], batch.user_multi[t]))
            )
            if known is not None:
                task_user[t] = known
                continue
            task_user[t] = self.n_users + len(new_tasks)
            new_tasks.append(t)
            new_rows.append((np.full(len(items), task_user[t]), items, ratings))
        key = "base"
        if new_rows:
            stacked = [np.concatenate(part) for part in zip(*new_rows, strict=True)]
            key = hashlib.sha1(
                b"".join(np.ascontiguousarray(a, dtype=np.float64).tobytes() for a in stacked)
            ).hexdigest()
        new_index = torch.as_tensor(new_tasks, dtype=torch.long)
        features = EncodedFeatures(
            torch.cat([self.user_features.cat, batch.user_cat[new_index]]),
            torch.cat([self.user_features.num, batch.user_num[new_index]]),
            torch.cat([self.user_features.multi, batch.user_multi[new_index]]),
        )
        if key not in self._cache:
            users, items, ratings = self.users, self.items, self.ratings
            if new_rows:
                users, items, ratings = (np.concatenate([base, extra]) for base, extra in
                                         zip((users, items, ratings), stacked, strict=True))  # fmt: skip
            started = time.monotonic()
            fitted = self.peer.train(users, items, ratings, features)
            self.retrains += 1
            self.retrain_seconds += time.monotonic() - started
            # Keep the base fit and the latest retrain only (bounded memory).
            self._cache = {k: v for k, v in self._cache.items() if k == "base"}
            self._cache[key] = fitted
        query_items = batch.query_items.numpy()
        pair_users = np.repeat(task_user, query_items.shape[1])
        scores = self.peer.predict(self._cache[key], pair_users, query_items.reshape(-1), features)
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(query_items.shape)
        return scores.clamp(self.rating_min, self.rating_max).to(torch.float32)

    predict.whole_batch = True  # read through the bound method by the evaluator's chunking

    def describe(self) -> dict:
        """The evaluation document's ``methods`` entry: a labelled reference, its settings and cost."""
        return {
            "kind": "reference",
            "reference": True,
            "settings": self.settings,
            "grid_val_mae": self.grid_val_mae,
            "retrains": self.retrains,
            "retrain_s": round(self.retrain_seconds, 1),
            "tuning_retrains": len(self.grid_val_mae),
            "tuning_s": round(self.tuning_seconds, 1),
            "cost": "full retrain on the train rows + every evaluated user's support rows, per scenario / K",
        }


def fit_peers(pre, peers, val_batch, seed: int) -> dict[str, RetrainedPeer]:
    """Builds each requested peer, its grid point chosen by MAE on the validation users.

    Args:
        pre: A loaded :class:`metarec.tasks.Preprocessed`.
        peers: The evaluation's ``peers`` setting (see :func:`resolve_peers`).
        val_batch: Validation-user user_cold tasks, or None to take the first grid point.
        seed: Algorithm seed.

    Returns:
        Peer name -> predictor (``predict(batch)``, ``describe()``) with the chosen settings.

    Raises:
        ValueError: Unknown peers, or their packages are not installed.
    """
    from metarec.metrics import mae

    grids = resolve_peers(peers)
    require_packages(grids)
    fitted = {}
    for name, grid in grids.items():
        points, tried, seconds = _grid_points(grid), [], 0.0
        best = points[0]
        if val_batch is not None and len(points) > 1:
            for point in points:
                candidate = RetrainedPeer(name, point, pre, seed)
                predictions = candidate.predict(val_batch)
                seconds += candidate.retrain_seconds
                value = mae(predictions, val_batch.query_ratings, val_batch.query_mask)
                tried.append({**point, "val_mae": round(value, 6) if math.isfinite(value) else None})
                logger.info("tuning peer %s %s: val MAE %.4f", name, point, value)
            best = points[min(range(len(points)), key=lambda i: tried[i]["val_mae"] or math.inf)]
        fitted[name] = RetrainedPeer(name, best, pre, seed)
        fitted[name].grid_val_mae, fitted[name].tuning_seconds = tried, seconds
    return fitted
