"""Meta-training: MAML / FOMAML / Reptile on the train users' tasks, checkpointed and resumable.

``run_meta_training`` is the step function; ``python -m metarec.training`` is the entry point that
torchrun / a PyTorchJob launches (data-parallel when ``WORLD_SIZE > 1``, see ``metarec.distributed``).

A run killed at any point and started again with ``resume=True`` continues from its last checkpoint
and ends with the same weights as an uninterrupted run with the same seed (bitwise on the CPU): the
checkpoint holds the model, the optimizer, every RNG state (torch, numpy, python, task sampler), the
best validation weights and the training curve.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Defaults (config keys; anything else raises ValueError). They are sized for MovieLens-100K on two CPU
# cores (well under a minute per method); tests and the tiny synthetic pipeline pass smaller meta_steps.
# The model settings (head mode, 8 user factors, priors of 3 pseudo-ratings, L1 outer loss) were chosen
# by the mean validation-user metrics of three MovieLens-100K seeds.
DEFAULTS: dict[str, Any] = {
    "meta_steps": 500,  # outer (meta) optimisation steps
    "meta_batch": 32,  # tasks (users) per meta-step, global over all ranks
    "inner_steps": 5,  # inner SGD steps per task (also the adaptation used at evaluation/serving)
    "inner_lr": 0.05,  # inner SGD learning rate (the user bias takes Gauss-Newton steps, see below)
    "outer_lr": 0.002,  # Adam learning rate of the meta-update
    "outer_loss": "l1",  # query loss of the meta-update: "mse" | "l1" (targets MAE); inner loop: MSE
    "weight_decay": 0.0,  # Adam weight decay (L2) on the meta-parameters
    "ema": 0.99,  # decay of an exponential moving average of the weights, validated and saved (0 = off)
    "adapt_mode": "head",  # "all" | "decision" (MLP, MeLU) | "head" (last layer, ANIL)
    "embed_dim": 16,  # width of every feature embedding
    "hidden": [64, 32],  # decoder MLP hidden widths
    "item_bias": True,  # learned per-item offset outside the adapted layers
    # start the item bias from the train users' support rows: shrunk item means, or with
    # item_factor_init the MF fit's item biases
    "item_bias_init": True,
    "item_bias_shrink": 10.0,  # pseudo-count of ratings at the global mean in that initial item bias
    "user_bias": True,  # per-user logit offset, adapted in every mode (its meta-learned value is the prior)
    "user_bias_lr": 1.0,  # the user bias's inner lr as a multiple of inner_lr
    "user_bias_prior": 3.0,  # None: SGD on the user terms; P: Gauss-Newton MAP steps, P pseudo-ratings
    "user_factors": 8,  # width of a per-user latent vector adapted with the user bias (0 = none)
    "user_factor_prior": None,  # its Gauss-Newton prior in pseudo-ratings (None: user_bias_prior)
    # Start the item factors and item bias from a biased matrix factorisation (ALS) of the train users'
    # support rows, the rows baselines are fitted on; meta-training then refines them with the rest.
    "item_factor_init": True,
    "item_factor_init_reg": 10.0,  # that ALS fit's ridge penalty
    # probability that a training row's item is seen as a cold item, so that the features alone also
    # learn to rank (item cold-start); modes "decision" and "head" only
    "id_dropout": 0.0,
    "learn_inner_lr": False,  # meta-learn a per-layer inner learning-rate scale (MAML only: 2nd order)
    "query_size": 10,  # inner-query rows per training task (re-split of the user's support rows)
    "seed": 0,  # seeds model init, task sampling and every RNG
    "checkpoint_every": 100,  # meta-steps between checkpoints (0 = only the final one)
    "checkpoint_dir": None,  # None -> <output_dir>/checkpoints; may be gs://bucket/prefix
    "val_every": 25,  # meta-steps between validations (0 = only at the end); best val MAE is kept
    "val_kshot": None,  # None: adapt on every support row of the val users; K: only the first K
    "device": "auto",  # "auto" (CUDA when available) | "cpu" | "cuda" | "cuda:N"
    # torch CPU threads on a CPU device (0 = torch's default). One suits these small ops and avoids
    # oversubscription when several trainings share a node (two threads were up to 10x slower here).
    "cpu_threads": 1,
    "log_every": 10,  # meta-steps between JSON log lines (non-TTY)
}

MODEL_FILES = ("model.pt", "model.json", "schema.json", "metrics.json")


def resolve_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Merges a partial config into ``DEFAULTS``.

    Args:
        config: overrides (None or {} keeps the defaults).

    Returns:
        The full config.

    Raises:
        ValueError: a key ``DEFAULTS`` does not know, or an invalid value.
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(DEFAULTS)}")
    merged = {**copy.deepcopy(DEFAULTS), **config}
    from metarec.model import ADAPT_MODES

    if not 0.0 <= float(merged["ema"]) < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {merged['ema']!r}")
    if merged["outer_loss"] not in ("mse", "l1"):
        raise ValueError(f"outer_loss must be 'mse' or 'l1', got {merged['outer_loss']!r}")
    if merged["adapt_mode"] not in ADAPT_MODES:
        raise ValueError(f"adapt_mode must be one of {ADAPT_MODES}, got {merged['adapt_mode']!r}")
    for key in ("meta_steps", "meta_batch", "inner_steps", "embed_dim", "query_size"):
        if int(merged[key]) < (0 if key in ("meta_steps", "inner_steps") else 1):
            raise ValueError(f"{key} must be a positive integer, got {merged[key]!r}")
    merged["hidden"] = [int(width) for width in merged["hidden"]]
    return merged


class ProgressLog:
    """A ``\\r``-updated progress line on a TTY, structured JSON lines otherwise (both on stderr).

    Args:
        total: total meta-steps.
        enabled: False silences it (non-zero ranks).
        every: steps between JSON lines.
    """

    def __init__(self, total: int, enabled: bool = True, every: int = 10):
        self.total = total
        self.enabled = enabled
        self.every = max(1, int(every))
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()

    def event(self, event: str, **fields: Any) -> None:
        """Writes one structured event (always a JSON line; ends a TTY progress line first)."""
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stderr.flush()

    def step(self, step: int, loss: float) -> None:
        """Reports a finished meta-step."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if self.tty:
            sys.stderr.write(f"\rmeta-step {step}/{self.total}  loss {loss:.4f}  {elapsed:.0f}s   ")
            sys.stderr.flush()
        elif step % self.every == 0 or step == self.total:
            self.event("step", step=step, total=self.total, loss=round(loss, 6), elapsed_s=round(elapsed, 2))


def _sampler_state(sampler: Any) -> Any:
    """The task sampler's RNG state (its own ``state_dict`` when it has one)."""
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    # Fall back to every random generator the sampler holds as an attribute.
    state = {}
    for name, value in vars(sampler).items():
        if isinstance(value, np.random.Generator):
            state[name] = ("generator", copy.deepcopy(value.bit_generator.state))
        elif isinstance(value, np.random.RandomState):
            state[name] = ("randomstate", value.get_state())
        elif isinstance(value, random.Random):
            state[name] = ("random", value.getstate())
        elif isinstance(value, torch.Generator):
            state[name] = ("torch", value.get_state())
    return state


def _load_sampler_state(sampler: Any, state: Any) -> None:
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
        return
    for name, (kind, value) in state.items():
        target = getattr(sampler, name)
        if kind == "generator":
            target.bit_generator.state = value
        elif kind == "randomstate":
            target.set_state(value)
        elif kind == "random":
            target.setstate(value)
        else:
            target.set_state(value)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(pre: Any, config: dict[str, Any]) -> Any:
    """Builds a fresh PreferenceModel for a preprocessed data set.

    Args:
        pre: a loaded ``metarec.tasks.Preprocessed``.
        config: the resolved training config (embed_dim, hidden).

    Returns:
        The model, its output starting at the training mean rating.
    """
    from metarec.model import PreferenceModel

    schema = pre.schema
    model = PreferenceModel(
        pre.encoder.user_dims,
        pre.encoder.item_dims,
        int(schema["n_warm_items"]),
        pre.item_features,
        pre.item_warm_idx,
        embed_dim=int(config["embed_dim"]),
        hidden=tuple(config["hidden"]),
        rating_min=float(schema["rating_min"]),
        rating_max=float(schema["rating_max"]),
        item_bias=bool(config["item_bias"]),
        learn_inner_lr=bool(config["learn_inner_lr"]),
        user_bias=bool(config["user_bias"]),
        user_bias_lr=float(config["user_bias_lr"]),
        user_bias_prior=None if config["user_bias_prior"] is None else float(config["user_bias_prior"]),
        user_factors=int(config["user_factors"]),
        user_factor_prior=None if config["user_factor_prior"] is None else float(config["user_factor_prior"]),
    )
    model.init_output(float(schema.get("global_mean", (model.rating_min + model.rating_max) / 2)))
    if model.item_bias is not None and bool(config.get("item_bias_init", False)):
        init_item_bias(model, pre, float(config.get("item_bias_shrink", 10.0)))
    if model.item_factors is not None and bool(config.get("item_factor_init", False)):
        init_item_factors(model, pre, float(config.get("item_factor_init_reg", 10.0)), int(config["seed"]),
                          with_item_bias=bool(config.get("item_bias_init", False)))  # fmt: skip
    return model


def init_item_factors(model: Any, pre: Any, reg: float, seed: int, with_item_bias: bool = True) -> None:
    """Starts the item factors (and the item bias) from a biased MF of the train users' support rows.

    The ALS fit is the MF fold-in baseline's (``metarec.baselines.MFFoldIn``) with the model's factor
    width. Its rating-space terms are divided by the slope of the model's scaled sigmoid at the global
    mean, so that, before any meta-step, the model's logit terms move a prediction near the mean as
    much as the MF terms do.

    Args:
        model: the model (its item factors, and item bias when present, are overwritten).
        pre: the loaded ``Preprocessed``.
        reg: the ALS ridge penalty.
        seed: the ALS initialisation seed.
        with_item_bias: also start the item bias from the fit's item biases (fitted jointly with the
            factors, so they replace the shrunk means of :func:`init_item_bias`).
    """
    from metarec.baselines import MFFoldIn

    users, items, ratings = pre.training_rows()
    mf = MFFoldIn(factors=model.n_user_factors, reg=reg, seed=seed).fit(users, items, ratings, model.n_items)
    span = model.rating_max - model.rating_min
    fraction = min(max((mf.global_mean - model.rating_min) / span, 0.05), 0.95)
    slope = span * fraction * (1.0 - fraction)
    warm = pre.item_warm_idx.long()
    is_warm = warm > 0
    with torch.no_grad():
        table = torch.zeros_like(model.item_factors.weight)
        table[warm[is_warm]] = (mf.item_factors[is_warm] / slope).to(table.dtype)
        model.item_factors.weight.copy_(table)
        if model.item_bias is not None and with_item_bias:
            bias = torch.zeros_like(model.item_bias.weight)
            bias[warm[is_warm], 0] = (mf.item_bias[is_warm] / slope).to(bias.dtype)
            model.item_bias.weight.copy_(bias)


def init_item_bias(model: Any, pre: Any, shrink: float) -> None:
    """Starts the item-bias table at each warm item's shrunk mean offset, in logit space.

    Uses only what meta-training sees: the train users' support rows. An item's offset is
    ``sum(rating - mean) / (count + shrink)`` (the item-bias baseline's estimate), mapped through the
    model's scaled sigmoid around the global mean so that, before any meta-step, the model predicts
    about ``mean + offset`` for the item.

    Args:
        model: the model (its item bias is overwritten).
        pre: the loaded ``Preprocessed``.
        shrink: pseudo-count of ratings at the global mean.
    """
    from metarec.model import logit

    _, items, ratings = pre.training_rows()
    ratings = ratings.double()  # sums in float64 below
    warm = pre.item_warm_idx[items]
    mean = float(pre.schema.get("global_mean", ratings.mean().item() if len(ratings) else 3.0))
    size = model.item_bias.weight.shape[0]
    sums = torch.zeros(size, dtype=torch.float64).index_add_(0, warm, ratings - mean)
    counts = torch.zeros(size, dtype=torch.float64).index_add_(0, warm, torch.ones_like(ratings))
    offsets = sums / (counts + shrink)
    span = model.rating_max - model.rating_min
    base = logit((mean - model.rating_min) / span)
    table = torch.tensor([logit((mean + float(o) - model.rating_min) / span) - base for o in offsets])
    table[0] = 0.0  # the cold-item row
    with torch.no_grad():
        model.item_bias.weight.copy_(table.to(model.item_bias.weight.dtype).unsqueeze(-1))


def evaluate_adapted(
    model: Any, batch: Any, inner_steps: int, inner_lr: float, adapt_mode: str, chunk: int = 256
) -> dict[str, float]:
    """Adapts to every task on its support rows and scores its query rows.

    Args:
        model: the model.
        batch: a TaskBatch (e.g. ``scenario_tasks(pre, "user_cold", users_split="val")``).
        inner_steps: inner SGD steps.
        inner_lr: inner learning rate.
        adapt_mode: adapt mode.
        chunk: tasks adapted per vectorised pass (bounds memory).

    Returns:
        ``{"mae", "rmse", "ndcg@3", "n_users"}`` pooled over every real query row (nDCG averaged
        over users).
    """
    from metarec.meta import adapt, predict
    from metarec.metrics import mae, ndcg_at_k, rmse

    predictions = []
    with torch.no_grad():
        for start in range(0, len(batch), chunk):
            part = batch.select(slice(start, start + chunk))
            adapted = adapt(model, None, part, inner_steps, inner_lr, adapt_mode, create_graph=False)
            predictions.append(
                predict(
                    model,
                    adapted,
                    part.user_cat,
                    part.user_num,
                    part.user_multi,
                    part.query_items,
                    adapt_mode,
                )  # fmt: skip
            )
    scores = torch.cat(predictions).cpu()
    targets, mask = batch.query_ratings.cpu(), batch.query_mask.cpu()
    return {
        "mae": mae(scores, targets, mask),
        "rmse": rmse(scores, targets, mask),
        "ndcg@3": ndcg_at_k(scores, targets, 3, mask),
        "n_users": len(batch),
    }


def _kshot(batch: Any, k: int | None) -> Any:
    """Keeps the first k support rows (the scenario's K-shot order) of every task."""
    if k is None:
        return batch
    from dataclasses import replace

    k = int(k)
    return replace(
        batch,
        support_items=batch.support_items[:, :k],
        support_ratings=batch.support_ratings[:, :k],
        support_mask=batch.support_mask[:, :k],
    )


def run_meta_training(
    preprocessed_dir: str,
    method: str,
    config: dict[str, Any] | None,
    output_dir: str,
    resume: bool = True,
) -> dict[str, Any]:
    """Meta-trains a preference model and writes a model directory.

    Args:
        preprocessed_dir: preprocessing output directory (local path).
        method: ``"maml"``, ``"fomaml"`` or ``"reptile"``.
        config: overrides of ``DEFAULTS`` (unknown keys raise ValueError).
        output_dir: model directory to write (local path or ``gs://`` prefix): model.pt, model.json
            (model config, method, adapt settings, training config), schema.json (copied from
            preprocessing), metrics.json (training curve, validation history, best step).
        resume: continue from the last checkpoint in the checkpoint directory when there is one.

    Returns:
        Final metrics: ``val_mae``, ``val_rmse``, ``val_ndcg@3`` (best validation weights, which are
        the ones saved), ``best_step``, ``final_loss``, ``meta_steps``, ``train_seconds``.

    Raises:
        ValueError: unknown method or config key.
    """
    from metarec import checkpoint, distributed, storage
    from metarec.meta import METHODS, make_learner
    from metarec.tasks import Preprocessed, TrainTaskSampler, scenario_tasks

    if method not in METHODS:
        raise ValueError(f"unknown meta-learning method {method!r}; expected one of {METHODS}")
    cfg = resolve_config(config)
    context = distributed.init_from_env(cfg["device"])
    device = context.device
    previous_threads = torch.get_num_threads()
    if device.type == "cpu" and int(cfg["cpu_threads"]) > 0:
        torch.set_num_threads(int(cfg["cpu_threads"]))
    log = ProgressLog(int(cfg["meta_steps"]), enabled=context.is_main, every=int(cfg["log_every"]))
    started = time.monotonic()
    try:
        _seed_everything(int(cfg["seed"]))
        pre = Preprocessed.load(preprocessed_dir)
        model = build_model(pre, cfg).to(device)
        distributed.broadcast_parameters(context, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg["outer_lr"]),
                                     weight_decay=float(cfg["weight_decay"]))  # fmt: skip
        learner = make_learner(
            method, model, int(cfg["inner_steps"]), float(cfg["inner_lr"]), cfg["adapt_mode"],
            outer_loss=cfg["outer_loss"], id_dropout=float(cfg["id_dropout"]),
        )  # fmt: skip
        # Tasks of heavy training users (preprocessing's users_over_max) are capped to the size of an
        # evaluated user's support set, so they look like the tasks the model will meet.
        max_ratings = pre.schema.get("tasks", {}).get("max_ratings")
        max_support = None if max_ratings is None else max(1, int(max_ratings) - int(cfg["query_size"]))
        sampler = TrainTaskSampler(
            pre, query_size=int(cfg["query_size"]), seed=int(cfg["seed"]), max_support=max_support
        )
        _, val_batch = scenario_tasks(pre, "user_cold", users_split="val")
        val_batch = _kshot(val_batch, cfg["val_kshot"]).to(device)

        checkpoint_dir = cfg["checkpoint_dir"] or storage.join(output_dir, "checkpoints")
        # Polyak averaging: a smoothed copy of the weights is what gets validated and saved.
        ema_decay = float(cfg["ema"])
        averaged = copy.deepcopy(model).requires_grad_(False) if ema_decay > 0 else None
        step, curve, val_history = 0, [], []
        best = {"mae": math.inf, "step": 0, "state": None, "metrics": None}
        state = checkpoint.load_latest(checkpoint_dir) if resume else None
        if state is not None:
            if state["method"] != method:
                raise ValueError(f"checkpoint in {checkpoint_dir} is for {state['method']!r}, not {method!r}")
            model.load_state_dict(state["model"])
            if averaged is not None:
                averaged.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
            random.setstate(state["rng"]["python"])
            _load_sampler_state(sampler, state["rng"]["sampler"])
            step, curve, val_history, best = (
                state["step"],
                state["curve"],
                state["val_history"],
                state["best"],
            )
            log.event("resumed", step=step, checkpoint_dir=checkpoint_dir)

        total_steps = int(cfg["meta_steps"])
        val_every, ckpt_every = int(cfg["val_every"]), int(cfg["checkpoint_every"])
        log.event("start", method=method, world_size=context.world_size, device=str(device),
                  meta_steps=total_steps, start_step=step)  # fmt: skip
        while step < total_steps:
            global_batch = sampler.sample(int(cfg["meta_batch"]))
            shard = distributed.shard_tasks(global_batch, context.rank, context.world_size).to(device)
            model.train()
            loss, grads = learner.meta_gradient(shard, total_tasks=len(global_batch))
            loss, grads = distributed.all_reduce_sum(context, grads, loss)
            optimizer.zero_grad(set_to_none=False)
            for name, parameter in model.named_parameters():
                parameter.grad = grads[name].detach()
            optimizer.step()
            if averaged is not None:
                with torch.no_grad():
                    for smooth, current in zip(averaged.parameters(), model.parameters(), strict=True):
                        smooth.lerp_(current, 1.0 - ema_decay)
            step += 1
            curve.append([step, float(loss)])
            log.step(step, float(loss))
            if (val_every and step % val_every == 0) or step == total_steps:
                validated = model if averaged is None else averaged
                validated.eval()
                metrics = evaluate_adapted(validated, val_batch, int(cfg["inner_steps"]), float(cfg["inner_lr"]),
                                           cfg["adapt_mode"])  # fmt: skip
                val_history.append({"step": step, **metrics})
                if metrics["mae"] < best["mae"]:
                    best_state = {
                        name: tensor.detach().cpu().clone() for name, tensor in validated.state_dict().items()
                    }
                    best = {"mae": metrics["mae"], "step": step, "state": best_state, "metrics": metrics}
                log.event("validation", step=step, **metrics)
            if context.is_main and ((ckpt_every and step % ckpt_every == 0) or step == total_steps):
                checkpoint.save_checkpoint(checkpoint_dir, step, {
                    "method": method, "step": step, "config": cfg,
                    "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
                    "ema": None if averaged is None else {n: t.detach().cpu() for n, t in averaged.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                            "python": random.getstate(), "sampler": _sampler_state(sampler)},
                    "curve": curve, "val_history": val_history, "best": best,
                })  # fmt: skip
        train_seconds = time.monotonic() - started
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        best_metrics = best["metrics"] or {"mae": math.nan, "rmse": math.nan, "ndcg@3": math.nan}
        result = {
            "val_mae": best_metrics["mae"],
            "val_rmse": best_metrics["rmse"],
            "val_ndcg@3": best_metrics["ndcg@3"],
            "best_step": best["step"],
            "final_loss": curve[-1][1] if curve else math.nan,
            "meta_steps": total_steps,
            "train_seconds": round(train_seconds, 2),
        }
        if context.is_main:
            _write_model_dir(
                model, method, cfg, preprocessed_dir, str(output_dir), result, curve, val_history
            )
            log.event("done", **result)
        distributed.barrier(context)
        return result
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process keeps its own setting
        distributed.shutdown(context)


def _write_model_dir(model, method, cfg, preprocessed_dir, output_dir, result, curve, val_history) -> None:
    from metarec import storage

    extra = {
        "method": method,
        "adapt": {"mode": cfg["adapt_mode"], "inner_steps": int(cfg["inner_steps"]),
                  "inner_lr": float(cfg["inner_lr"])},
        "training": {
            key: value for key, value in cfg.items() if key not in ("checkpoint_dir", "device", "cpu_threads")
        },
    }  # fmt: skip
    metrics = {"method": method, **result, "curve": curve, "val_history": val_history}
    model = copy.deepcopy(model).cpu()
    with storage.local_output(output_dir) as directory:
        _write_local(model, extra, metrics, preprocessed_dir, directory)


def _write_local(model, extra, metrics, preprocessed_dir, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory, extra)
    shutil.copyfile(Path(preprocessed_dir) / "schema.json", directory / "schema.json")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (also what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="python -m metarec.training", description=__doc__.splitlines()[0])
    parser.add_argument("--preprocessed", required=True, help="preprocessing output directory")
    parser.add_argument("--method", default="maml", help="maml | fomaml | reptile")
    parser.add_argument("--output", required=True, help="model directory to write (local or gs://)")
    parser.add_argument(
        "--config", help="YAML/JSON file: training config, or a run config with a train: section"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (value parsed as YAML), repeatable")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    args = parser.parse_args(argv)
    import yaml

    config: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        config = dict(loaded.get("train", loaded) if isinstance(loaded, dict) else {})
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = yaml.safe_load(value)
    from metarec import storage

    # A PyTorchJob pod gets the data set as a gs:// prefix: train on a local copy of it.
    with storage.local_copy(args.preprocessed) as preprocessed:
        result = run_meta_training(
            str(preprocessed), args.method, config, args.output, resume=not args.no_resume
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
