"""Tasks: Preprocessed.load, scenario tasks, the training sampler and padded TaskBatches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metarec.features import EncodedFeatures
from metarec.preprocessing import run_preprocessing
from metarec.tasks import Preprocessed, TaskBatch, TrainTaskSampler, build_task_batch, scenario_tasks


@pytest.fixture(scope="module")
def pre(tmp_path_factory) -> Preprocessed:
    out: Path = tmp_path_factory.mktemp("tasks") / "pre"
    run_preprocessing("synthetic:tiny", None, None, str(out))
    return Preprocessed.load(out)


def task_rows(batch: TaskBatch, t: int, part: str) -> list[tuple[int, float]]:
    mask = getattr(batch, f"{part}_mask")[t].bool()
    items = getattr(batch, f"{part}_items")[t][mask].tolist()
    ratings = getattr(batch, f"{part}_ratings")[t][mask].tolist()
    return list(zip(items, ratings, strict=True))


def table_rows(pre: Preprocessed, user: int, role: str, kshot: int | None = None) -> list[tuple[int, float]]:
    rows = pre.interactions[(pre.interactions["user_idx"] == user) & (pre.interactions["role"] == role)]
    if kshot is not None:
        rows = rows[rows["kshot_rank"] < kshot]
    return list(zip(rows["item_idx"].tolist(), rows["rating"].tolist(), strict=True))


def assert_padding_consistent(batch: TaskBatch) -> None:
    for part in ("support", "query"):
        mask = getattr(batch, f"{part}_mask")
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (getattr(batch, f"{part}_items")[mask == 0] == 0).all()
        assert (getattr(batch, f"{part}_ratings")[mask == 0] == 0).all()
        # Real rows first, then padding.
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
    assert batch.support_items.dtype == torch.long and batch.support_ratings.dtype == torch.float32


def test_load_exposes_tables_and_encoded_features(pre):
    assert pre.user_features.cat.shape == (pre.n_users, 3)
    assert pre.item_features.multi.shape == (pre.n_items, 19)
    assert pre.item_warm_idx.tolist() == pre.items["warm_idx"].tolist()
    assert (pre.item_warm_idx[torch.as_tensor(np.array(pre.items["is_cold"]))] == 0).all()
    train_occupations = pre.users.loc[pre.users["user_split"] == "train", "occupation"].nunique()
    assert pre.encoder.user_dims.cat_sizes == [3, train_occupations + 1, 65]
    assert set(pre.interactions["role"]) == {"support", "query", "cold_query", "unused"}
    assert 1 <= pre.rating_min < pre.global_mean < pre.rating_max


@pytest.mark.parametrize(
    ("scenario", "split", "query_role"),
    [("warm", "train", "query"), ("user_cold", "test", "query"), ("item_cold", "train", "cold_query"),
     ("user_item_cold", "test", "cold_query")],
)  # fmt: skip
def test_scenario_tasks_match_the_table(pre, scenario, split, query_role):
    users, batch = scenario_tasks(pre, scenario)
    assert len(users) == len(batch) > 0
    assert set(pre.users.set_index("user_idx").loc[users, "user_split"]) == {split}
    assert_padding_consistent(batch)
    for t, user in enumerate(users):
        assert sorted(task_rows(batch, t, "support")) == sorted(table_rows(pre, user, "support"))
        assert sorted(task_rows(batch, t, "query")) == sorted(table_rows(pre, user, query_role))
    assert torch.equal(batch.user_cat, pre.user_features.cat[users])


def test_val_users_and_kshot(pre):
    users, batch = scenario_tasks(pre, "user_cold", users_split="val", kshot=3)
    assert set(pre.users.set_index("user_idx").loc[users, "user_split"]) == {"val"}
    assert batch.support_items.shape[1] == 3
    for t, user in enumerate(users):
        assert sorted(task_rows(batch, t, "support")) == sorted(table_rows(pre, user, "support", kshot=3))
    with pytest.raises(ValueError, match="unknown scenario"):
        scenario_tasks(pre, "lukewarm")
    with pytest.raises(ValueError, match="kshot"):
        scenario_tasks(pre, "warm", kshot=0)


def test_train_sampler_resplits_train_support_rows_only(pre):
    sampler = TrainTaskSampler(pre, query_size=10, seed=1)
    train = set(pre.split_users("train").tolist())
    users = sampler.rng.choice(sampler.users, size=8, replace=False)
    first = sampler.sample_users(users)
    second = sampler.sample_users(users)
    assert_padding_consistent(first)
    changed = 0
    for t, user in enumerate(users.tolist()):
        assert user in train
        support_rows = table_rows(pre, user, "support")
        inner_support, inner_query = task_rows(first, t, "support"), task_rows(first, t, "query")
        assert sorted(inner_support + inner_query) == sorted(support_rows)  # a partition of the support rows
        assert len(inner_query) == min(10, len(support_rows) - 1) and len(inner_support) >= 1
        changed += sorted(task_rows(second, t, "query")) != sorted(inner_query)
    assert changed > 0  # re-split on every sample


def test_train_sampler_is_seeded_and_sizes_vary(pre):
    a, b = TrainTaskSampler(pre, seed=3).sample(16), TrainTaskSampler(pre, seed=3).sample(16)
    assert torch.equal(a.support_items, b.support_items) and torch.equal(a.query_ratings, b.query_ratings)
    assert len(a) == 16 and a.support_mask.sum(1).unique().numel() > 1
    capped = TrainTaskSampler(pre, seed=3, max_support=5).sample(
        200
    )  # more tasks than users: with replacement
    assert len(capped) == 200 and capped.support_mask.sum(1).max() <= 5


def test_build_task_batch_pads_and_masks():
    features = EncodedFeatures(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1), torch.zeros(3, 0))
    batch = build_task_batch(
        features,
        supports=[([1, 2, 3], [5.0, 4.0, 3.0]), ([], []), (np.array([7]), torch.tensor([2.0]))],
        queries=[([4], [0.0]), ([5, 6], [1.0, 2.0]), ([8, 9, 10, 11], [1, 2, 3, 4])],
    )
    assert batch.support_items.tolist() == [[1, 2, 3], [0, 0, 0], [7, 0, 0]]
    assert batch.support_mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert batch.query_ratings.tolist() == [[0, 0, 0, 0], [1, 2, 0, 0], [1, 2, 3, 4]]
    assert batch.query_mask.sum(1).tolist() == [1, 2, 4]
    assert_padding_consistent(batch)
    empty = build_task_batch(EncodedFeatures(*(f[:1] for f in features)),
                             [([], [])], [([], [])])  # fmt: skip
    assert empty.support_items.shape == (1, 1) and empty.support_mask.sum() == 0
    with pytest.raises(ValueError, match="2 items but 1 ratings"):
        build_task_batch(EncodedFeatures(*(f[:1] for f in features)), [([1, 2], [3.0])], [([], [])])
    with pytest.raises(ValueError, match="3 users but 1 supports"):
        build_task_batch(features, [([], [])], [([], [])])


def test_load_rejects_a_non_preprocessed_directory(tmp_path):
    with pytest.raises(ValueError, match="schema.json not found"):
        Preprocessed.load(tmp_path)


def test_rows_filters_role_and_split(pre):
    rows = pre.rows(role="support", users_split="train")
    assert len(rows) > 0 and set(rows["role"]) == {"support"} and set(rows["user_split"]) == {"train"}
    assert len(pre.rows()) == len(pre.interactions)
    with pytest.raises(ValueError, match="users_split"):
        pre.split_users("holdout")
