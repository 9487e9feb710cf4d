"""Data-parallel meta-training: task sharding, and 2 gloo ranks matching one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_meta_learners import random_batch
from test_model import make_model

from metarec import checkpoint
from metarec.distributed import DistributedContext, all_reduce_sum, init_from_env, shard_range


def test_shards_cover_the_batch_once_in_order():
    batch = random_batch(make_model(), n_tasks=7)
    for world_size in (1, 2, 3, 7):
        shards = [batch.select(shard_range(len(batch), rank, world_size)) for rank in range(world_size)]
        assert sorted(len(shard) for shard in shards)[-1] - sorted(len(shard) for shard in shards)[0] <= 1
        assert torch.equal(torch.cat([shard.support_items for shard in shards]), batch.support_items)
        assert torch.equal(torch.cat([shard.user_cat for shard in shards]), batch.user_cat)


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_shards_with_id_dropout_sum_to_the_whole_batch(method):
    # Each rank draws the same random numbers (same seed); its shard must get its own rows of the global
    # batch's id-dropout mask, not the first rows every time (identical masks on every shard).
    from metarec.meta.learners import MetaLearner

    model = make_model()
    batch = random_batch(model, n_tasks=6)
    learner = MetaLearner(model, method, inner_steps=2, inner_lr=0.5, id_dropout=0.5)
    torch.manual_seed(7)
    whole_loss, whole = learner.meta_gradient(batch)
    losses, summed = [], {}
    for rank in range(3):
        torch.manual_seed(7)  # what every rank's generator holds at this step
        tasks = shard_range(len(batch), rank, 3)
        loss, grads = learner.meta_gradient(
            batch.select(tasks), total_tasks=len(batch), first_task=tasks.start
        )
        losses.append(loss)
        summed = {name: summed.get(name, 0) + grad for name, grad in grads.items()}
    torch.testing.assert_close(sum(losses), whole_loss)
    for name, grad in whole.items():
        torch.testing.assert_close(summed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_meta_batch_smaller_than_the_ranks_is_refused(monkeypatch, tmp_path):
    from metarec import distributed
    from metarec.trainer import Trainer
    from metarec.training import TrainSettings

    monkeypatch.setattr(
        distributed, "init_from_env", lambda device: DistributedContext(0, 2, 0, torch.device("cpu"), False)
    )
    trainer = Trainer(
        str(tmp_path / "pre"), "maml", TrainSettings(meta_batch=1, device="cpu"), str(tmp_path / "out")
    )
    with pytest.raises(ValueError, match="meta_batch 1 is smaller than the 2 ranks"):
        trainer.run(resume=False)


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = init_from_env("cpu")
    assert not context.enabled and context.world_size == 1 and context.is_main
    grads = {"w": torch.ones(3)}
    loss, reduced = all_reduce_sum(
        DistributedContext(0, 1, 0, torch.device("cpu"), False), grads, torch.tensor(2.0)
    )
    assert reduced is grads and float(loss) == 2.0


@pytest.mark.slow
def test_two_gloo_ranks_reach_the_single_process_weights(tmp_path):
    from metarec.preprocessing import run_preprocessing

    preprocessed = tmp_path / "pre"
    run_preprocessing("synthetic:tiny", None, None, str(preprocessed))
    # id_dropout: each rank must use its own rows of the global batch's mask.
    config = {"meta_steps": 8, "meta_batch": 6, "inner_steps": 2, "val_every": 4, "checkpoint_every": 4,
              "device": "cpu", "id_dropout": 0.2}  # fmt: skip
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps(config))
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    common = ["-m", "metarec.training", "--preprocessed", str(preprocessed), "--method", "maml",
              "--config", str(config_file), "--no-resume"]  # fmt: skip
    subprocess.run([sys.executable, *common, "--output", str(tmp_path / "single")], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*launcher, *common, "--output", str(tmp_path / "ddp")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"world_size": 2' in run.stderr
    # Rank 0 alone prints the result line (both ranks used to).
    assert [line[:11] for line in run.stdout.splitlines() if line.startswith("{")] == ['{"val_mae":']

    single = checkpoint.load_latest(str(tmp_path / "single" / "checkpoints"))
    ddp = checkpoint.load_latest(str(tmp_path / "ddp" / "checkpoints"))
    assert single["step"] == ddp["step"] == 8
    for name, tensor in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    # The logged losses are the global-batch means on both sides.
    for (_, single_loss), (_, ddp_loss) in zip(single["curve"], ddp["curve"], strict=True):
        assert ddp_loss == pytest.approx(single_loss, rel=1e-4)
    # The weights moved between the checkpoints at steps 4 and 8, so agreeing is not trivial.
    earlier = checkpoint.load_checkpoint(
        checkpoint.list_checkpoints(str(tmp_path / "single" / "checkpoints"))[0][1]
    )
    assert earlier["step"] == 4
    assert (
        max(float((earlier["model"][n] - t).abs().max()) for n, t in single["model"].items() if t.numel())
        > 1e-3
    )
