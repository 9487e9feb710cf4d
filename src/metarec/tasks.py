"""Few-shot tasks: one per user, a support set to adapt on and a query set to score.

``Preprocessed.load`` reads a preprocessing output directory; ``scenario_tasks`` builds the evaluation
tasks of a scenario (warm / user_cold / item_cold / user_item_cold); ``TrainTaskSampler`` samples
meta-training tasks from train users' support rows only; ``build_task_batch`` pads arbitrary
per-user (items, ratings) lists into a TaskBatch (serving, baselines, tests).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metarec.features import EncodedFeatures, FeatureEncoder

ROLES = ("support", "query", "cold_query", "unused")
SPLITS = ("train", "val", "test")
# scenario -> (default user split, query role)
SCENARIOS: dict[str, tuple[str, str]] = {
    "warm": ("train", "query"),
    "user_cold": ("test", "query"),
    "item_cold": ("train", "cold_query"),
    "user_item_cold": ("test", "cold_query"),
}


@dataclass
class TaskBatch:
    """T tasks padded to S support and Q query rows; a mask of 1 marks a real row.

    Attributes:
        user_cat: Long[T, C] encoded categorical user features.
        user_num: Float[T, D] encoded numeric user features.
        user_multi: Float[T, M] encoded multi-hot user features.
        support_items: Long[T, S] item indices (padding rows hold 0).
        support_ratings: Float[T, S] ratings (padding rows hold 0).
        support_mask: Float[T, S] 1 for a real row, 0 for padding.
        query_items: Long[T, Q] item indices.
        query_ratings: Float[T, Q] ratings.
        query_mask: Float[T, Q] 1 for a real row, 0 for padding.
    """

    user_cat: torch.Tensor
    user_num: torch.Tensor
    user_multi: torch.Tensor
    support_items: torch.Tensor
    support_ratings: torch.Tensor
    support_mask: torch.Tensor
    query_items: torch.Tensor
    query_ratings: torch.Tensor
    query_mask: torch.Tensor

    def __len__(self) -> int:
        return self.support_items.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor | slice) -> TaskBatch:
        """Returns the tasks at ``index`` (used to shard a meta-batch across ranks)."""
        return TaskBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _as_array(values: Any, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def _padded(
    lengths: np.ndarray, items: np.ndarray, ratings: np.ndarray, starts: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pads T variable-length rows of flat arrays: row t is items[starts[t] : starts[t] + lengths[t]]."""
    n_tasks = len(lengths)
    width = max(int(lengths.max()) if n_tasks else 0, 1)  # at least one (masked) column
    out_items = np.zeros((n_tasks, width), dtype=np.int64)
    out_ratings = np.zeros((n_tasks, width), dtype=np.float32)
    mask = np.arange(width)[None, :] < lengths[:, None]
    task_of, column_of = np.nonzero(mask)
    source = starts[task_of] + column_of
    out_items[task_of, column_of] = items[source]
    out_ratings[task_of, column_of] = ratings[source]
    return (
        torch.from_numpy(out_items),
        torch.from_numpy(out_ratings),
        torch.from_numpy(mask.astype(np.float32)),
    )


def _concat_lists(
    pairs: Sequence[tuple[Any, Any]], what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    items, ratings, lengths = [], [], []
    for t, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"{what}[{t}] must be an (items, ratings) pair")
        task_items, task_ratings = _as_array(pair[0], np.int64), _as_array(pair[1], np.float32)
        if len(task_items) != len(task_ratings):
            raise ValueError(f"{what}[{t}]: {len(task_items)} items but {len(task_ratings)} ratings")
        items.append(task_items)
        ratings.append(task_ratings)
        lengths.append(len(task_items))
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    starts = (
        np.concatenate([[0], np.cumsum(lengths_arr)[:-1]]).astype(np.int64) if len(pairs) else lengths_arr
    )
    flat_items = np.concatenate(items) if items else np.zeros(0, np.int64)
    flat_ratings = np.concatenate(ratings) if ratings else np.zeros(0, np.float32)
    return lengths_arr, flat_items, flat_ratings, starts


def build_task_batch(
    user_features: EncodedFeatures,
    supports: Sequence[tuple[Any, Any]],
    queries: Sequence[tuple[Any, Any]],
) -> TaskBatch:
    """Pads per-user (items, ratings) lists into a TaskBatch.

    Args:
        user_features: encoded features of the T users (leading dimension T).
        supports: T pairs (item indices, ratings) to adapt on; lists, numpy arrays or tensors; may be
            empty for a user (then only masked padding).
        queries: T pairs (item indices, ratings) to score; ratings may be zeros when unknown (serving).

    Returns:
        The TaskBatch, padded to the longest support / query list (at least one column each).

    Raises:
        ValueError: mismatched lengths.
    """
    n_tasks = user_features.cat.shape[0]
    if len(supports) != n_tasks or len(queries) != n_tasks:
        raise ValueError(f"{n_tasks} users but {len(supports)} supports and {len(queries)} queries")
    support = _padded(*(_concat_lists(supports, "supports")))
    query = _padded(*(_concat_lists(queries, "queries")))
    return _assemble(user_features, support, query)


make_task_batch = build_task_batch


@dataclass
class _RoleIndex:
    """Rows of one role grouped by user: user u owns rows offsets[u] : offsets[u + 1]."""

    offsets: np.ndarray
    items: np.ndarray
    ratings: np.ndarray

    def lengths(self, users: np.ndarray) -> np.ndarray:
        return self.offsets[users + 1] - self.offsets[users]


def _assemble(
    features: EncodedFeatures,
    support: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> TaskBatch:
    """Puts users' features and padded (items, ratings, mask) support and query rows into a TaskBatch."""
    return TaskBatch(
        user_cat=features.cat.long(),
        user_num=features.num.float(),
        user_multi=features.multi.float(),
        support_items=support[0],
        support_ratings=support[1],
        support_mask=support[2],
        query_items=query[0],
        query_ratings=query[1],
        query_mask=query[2],
    )


def _features_subset(features: EncodedFeatures, index: torch.Tensor) -> EncodedFeatures:
    return EncodedFeatures(features.cat[index], features.num[index], features.multi[index])


class Preprocessed:
    """A loaded preprocessing output directory.

    Attributes:
        path: the local directory read.
        schema: schema.json as a dict.
        users: users.parquet (user_idx, user_id, raw user features, user_split).
        items: items.parquet (item_idx, item_id, warm_idx, is_cold, raw item features).
        interactions: interactions.parquet (role and user_split as plain strings).
        encoder: FeatureEncoder built from the schema.
        user_features: EncodedFeatures of all users, row = user_idx.
        item_features: EncodedFeatures of all items, row = item_idx.
        item_warm_idx: Long[n_items], 1..n_warm_items for warm items, 0 for cold ones.
        n_users, n_items, n_warm_items, global_mean, rating_min, rating_max: from the schema.
    """

    def __init__(
        self,
        path: Path,
        schema: dict[str, Any],
        users: pd.DataFrame,
        items: pd.DataFrame,
        interactions: pd.DataFrame,
    ):
        self.path = path
        self.schema = schema
        self.users = users
        self.items = items
        self.interactions = interactions
        self.encoder = FeatureEncoder(schema)
        self.user_features = self.encoder.encode_users(users)
        self.item_features = self.encoder.encode_items(items)
        self.item_warm_idx = torch.as_tensor(np.array(items["warm_idx"], dtype=np.int64))
        self.n_users = int(schema["n_users"])
        self.n_items = int(schema["n_items"])
        self.n_warm_items = int(schema["n_warm_items"])
        self.global_mean = float(schema["global_mean"])
        self.rating_min = float(schema["rating_min"])
        self.rating_max = float(schema["rating_max"])
        if len(users) != self.n_users or len(items) != self.n_items:
            raise ValueError(
                f"{path}: users.parquet/items.parquet have {len(users)}/{len(items)} rows but schema.json "
                f"says n_users={self.n_users}, n_items={self.n_items}"
            )
        self.user_split = self._user_split_codes()
        self._roles = self._index_roles()

    def training_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The train users' support rows: the only ratings baselines and meta-training learn from.

        Returns:
            ``(user_idx Long[R], item_idx Long[R], rating Float[R])``.
        """
        frame = self.interactions
        rows = frame[(frame["user_split"] == "train") & (frame["role"] == "support")]
        return (
            torch.tensor(rows["user_idx"].to_numpy(), dtype=torch.long),
            torch.tensor(rows["item_idx"].to_numpy(), dtype=torch.long),
            torch.tensor(rows["rating"].to_numpy(), dtype=torch.float32),
        )

    @classmethod
    def load(cls, directory: str | Path) -> Preprocessed:
        """Reads a preprocessing output directory.

        Args:
            directory: local directory or ``gs://`` prefix written by ``run_preprocessing``.

        Returns:
            The Preprocessed data.

        Raises:
            ValueError: a missing file or an inconsistent directory.
        """
        uri = str(directory)
        if uri.startswith("gs://"):
            from metarec import storage  # lazy: only gs:// use needs the storage client

            with storage.local_copy(uri) as local:
                return cls._load_local(Path(local))
        return cls._load_local(Path(uri))

    @classmethod
    def _load_local(cls, path: Path) -> Preprocessed:
        for name in ("schema.json", "users.parquet", "items.parquet", "interactions.parquet"):
            if not (path / name).is_file():
                raise ValueError(f"{path}: {name} not found (not a preprocessing output directory)")
        schema = json.loads((path / "schema.json").read_text(encoding="utf-8"))
        users = pd.read_parquet(path / "users.parquet")
        items = pd.read_parquet(path / "items.parquet")
        interactions = pd.read_parquet(path / "interactions.parquet")
        for frame, columns in ((users, ("user_split",)), (interactions, ("user_split", "role"))):
            for column in columns:
                if column in frame.columns:
                    frame[column] = frame[column].astype(str)
        return cls(path, schema, users, items, interactions)

    def _user_split_codes(self) -> np.ndarray:
        codes = np.full(self.n_users, -1, dtype=np.int8)
        frame = self.interactions[["user_idx", "user_split"]].drop_duplicates("user_idx")
        codes[frame["user_idx"].to_numpy()] = (
            frame["user_split"].map({s: i for i, s in enumerate(SPLITS)}).to_numpy(dtype=np.int8)
        )
        return codes

    def _index_roles(self) -> dict[str, _RoleIndex]:
        frame = self.interactions
        user = frame["user_idx"].to_numpy(dtype=np.int64)
        role = frame["role"].map({r: i for i, r in enumerate(ROLES)}).to_numpy(dtype=np.int64)
        kshot = frame["kshot_rank"].to_numpy(dtype=np.int64)
        order = np.lexsort((kshot, role, user))
        user, role = user[order], role[order]
        items = frame["item_idx"].to_numpy(dtype=np.int64)[order]
        ratings = frame["rating"].to_numpy(dtype=np.float32)[order]
        index = {}
        for code, name in enumerate(ROLES):
            rows = role == code
            per_user = np.bincount(user[rows], minlength=self.n_users)
            offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
            index[name] = _RoleIndex(offsets, items[rows], ratings[rows])
        return index

    def split_users(self, users_split: str) -> np.ndarray:
        """Returns the user_idx of one split (``train`` | ``val`` | ``test``), ascending."""
        if users_split not in SPLITS:
            raise ValueError(f"users_split must be one of {SPLITS}, got {users_split!r}")
        return np.flatnonzero(self.user_split == SPLITS.index(users_split))

    def rows(self, role: str | None = None, users_split: str | None = None) -> pd.DataFrame:
        """Interaction rows filtered by role and user split (e.g. train support rows for baselines).

        Args:
            role: ``support`` | ``query`` | ``cold_query`` | ``unused`` or None for all.
            users_split: ``train`` | ``val`` | ``test`` or None for all.

        Returns:
            The matching rows of ``interactions``.
        """
        mask = np.ones(len(self.interactions), dtype=bool)
        if role is not None:
            mask &= (self.interactions["role"] == role).to_numpy()
        if users_split is not None:
            mask &= (self.interactions["user_split"] == users_split).to_numpy()
        return self.interactions[mask]

    def tasks_for_users(
        self, users: np.ndarray, query_role: str = "query", kshot: int | None = None
    ) -> TaskBatch:
        """Builds one task per given user from its stored support rows and ``query_role`` rows.

        Args:
            users: user_idx values.
            query_role: ``query`` or ``cold_query``.
            kshot: keep support rows with kshot_rank < kshot (None = all support rows).

        Returns:
            The TaskBatch (row t = users[t]).
        """
        users = np.asarray(users, dtype=np.int64)
        support, query = self._roles["support"], self._roles[query_role]
        s_len = support.lengths(users)
        if kshot is not None:
            s_len = np.minimum(s_len, int(kshot))  # support rows are stored in kshot_rank order
        s_items, s_ratings, s_mask = _padded(s_len, support.items, support.ratings, support.offsets[users])
        q_items, q_ratings, q_mask = _padded(
            query.lengths(users), query.items, query.ratings, query.offsets[users]
        )
        features = _features_subset(self.user_features, torch.from_numpy(users))
        return _assemble(features, (s_items, s_ratings, s_mask), (q_items, q_ratings, q_mask))


def scenario_tasks(
    pre: Preprocessed, scenario: str, users_split: str | None = None, kshot: int | None = None
) -> tuple[list[int], TaskBatch]:
    """Evaluation tasks of a scenario, read from the preprocessed table.

    | scenario | users | support | query |
    |---|---|---|---|
    | warm | train | support rows | query rows |
    | user_cold | test (val for model selection) | support rows | query rows |
    | item_cold | train | support rows | cold_query rows |
    | user_item_cold | test | support rows | cold_query rows |

    Args:
        pre: the loaded preprocessing output.
        scenario: ``warm`` | ``user_cold`` | ``item_cold`` | ``user_item_cold``.
        users_split: override the scenario's user split (e.g. ``val`` for model selection).
        kshot: support rows with kshot_rank < kshot (None = all support rows).

    Returns:
        (user_idx list, TaskBatch with one task per listed user). Users without any query row of the
        scenario (e.g. no cold-item ratings) are left out.

    Raises:
        ValueError: unknown scenario or split, or kshot < 1.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {sorted(SCENARIOS)}")
    if kshot is not None and (not isinstance(kshot, int | np.integer) or kshot < 1):
        raise ValueError(f"kshot must be a positive integer or None, got {kshot!r}")
    default_split, query_role = SCENARIOS[scenario]
    users = pre.split_users(users_split or default_split)
    users = users[pre._roles[query_role].lengths(users) > 0]
    return users.tolist(), pre.tasks_for_users(users, query_role, kshot)


class TrainTaskSampler:
    """Samples meta-training tasks from train users' support rows only.

    Each time a user is sampled, its support rows are shuffled and re-split into an inner query of
    ``min(query_size, n - 1)`` rows and an inner support of the rest (so support sizes vary), padded
    with masks. Per-user row arrays are built once, so sampling is a few vectorised numpy operations.

    Args:
        pre: the loaded preprocessing output.
        query_size: inner query rows per task.
        seed: random seed (the same seed gives the same sequence of batches).
        users_split: whose support rows to use (``train``; never the evaluation splits in training).
        max_support: cap on inner support rows per task (None = no cap).
    """

    def __init__(
        self,
        pre: Preprocessed,
        query_size: int = 10,
        seed: int = 0,
        users_split: str = "train",
        max_support: int | None = None,
    ):
        if query_size < 1:
            raise ValueError(f"query_size must be >= 1, got {query_size}")
        if max_support is not None and max_support < 1:
            raise ValueError(f"max_support must be >= 1 or None, got {max_support}")
        self.pre = pre
        self.query_size = int(query_size)
        self.max_support = max_support
        self.rng = np.random.default_rng(seed)
        support = pre._roles["support"]
        users = pre.split_users(users_split)
        self.users = users[support.lengths(users) >= 2]  # need at least one inner support and query row
        if self.users.size == 0:
            raise ValueError(f"no {users_split} user has 2 or more support rows to sample tasks from")
        self._support = support

    def state_dict(self) -> dict[str, Any]:
        """The sampler's random state (what a checkpoint needs to resume the same batch sequence)."""
        return {"rng": ("generator", copy.deepcopy(self.rng.bit_generator.state))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output."""
        _, bit_state = state["rng"]
        self.rng.bit_generator.state = bit_state

    def sample(self, meta_batch: int) -> TaskBatch:
        """Samples a meta-batch of tasks.

        Args:
            meta_batch: number of tasks (users drawn without replacement when there are enough).

        Returns:
            The TaskBatch.
        """
        users = self.rng.choice(self.users, size=meta_batch, replace=meta_batch > self.users.size)
        return self.sample_users(users)

    def sample_users(self, users: np.ndarray) -> TaskBatch:
        """Re-splits the support rows of the given users into fresh inner support / query sets.

        Args:
            users: user_idx values (each must have >= 2 support rows).

        Returns:
            The TaskBatch (row t = users[t]).
        """
        users = np.asarray(users, dtype=np.int64)
        support = self._support
        lengths = support.lengths(users)
        starts = support.offsets[users]
        total = int(lengths.sum())
        task_of_row = np.repeat(np.arange(len(users)), lengths)
        row_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        source = np.arange(total) - row_starts[task_of_row] + starts[task_of_row]
        # Shuffle within each task: sort by (task, random key).
        order = np.lexsort((self.rng.random(total), task_of_row))
        source = source[order]  # task_of_row is unchanged by a within-task sort
        n_query = np.minimum(self.query_size, lengths - 1)
        n_support = lengths - n_query
        if self.max_support is not None:
            n_support = np.minimum(n_support, self.max_support)
        items, ratings = support.items[source], support.ratings[source]
        # Rows of task t are laid out as [query rows..., support rows...] after the shuffle.
        q_items, q_ratings, q_mask = _padded(n_query, items, ratings, row_starts)
        s_items, s_ratings, s_mask = _padded(n_support, items, ratings, row_starts + n_query)
        features = _features_subset(self.pre.user_features, torch.from_numpy(users))
        return _assemble(features, (s_items, s_ratings, s_mask), (q_items, q_ratings, q_mask))
