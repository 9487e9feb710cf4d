"""The meta-training loop: one :class:`Trainer` per run, each job in one small method.

The checkpoint holds the model, the EMA copy, the optimizer, every RNG state (torch, numpy, python,
the task sampler's own ``state_dict``), the best validation weights and the training curve, so a
resumed run ends bitwise where an uninterrupted one does (CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metarec import checkpoint, distributed, storage
from metarec.meta import Adapter, AdaptSettings, MetaLearner
from metarec.metrics import mae, ndcg_at_k, rmse
from metarec.model import PreferenceModel, parameter_group
from metarec.model_init import build_model
from metarec.tasks import Preprocessed, TaskBatch, TrainTaskSampler, scenario_tasks
from metarec.training import TrainSettings

# Settings of this machine's run, not of the model: left out of model.json's "training".
_RUN_ONLY_KEYS = ("checkpoint_dir", "device", "cpu_threads")
# Keys a retry may change and still resume: where and how often it checkpoints and logs, and where it
# runs (a checkpoint's tensors are loaded onto the CPU first). Every other key changes the training, so
# a checkpoint saved under another value of one of them belongs to another run.
RESUMABLE_DIFFERENCES = (*_RUN_ONLY_KEYS, "checkpoint_every", "log_every")
VALIDATION_CHUNK = 256  # validation tasks adapted per vectorised pass (bounds memory)


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

    def event(self, event: str, **fields: object) -> None:
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


def validate(
    model: PreferenceModel, batch: TaskBatch, settings: AdaptSettings, chunk: int = VALIDATION_CHUNK
) -> dict[str, float]:
    """Adapts to every validation task on its support rows and scores its query rows.

    Args:
        model: the model.
        batch: tasks (e.g. ``scenario_tasks(pre, "user_cold", users_split="val")``).
        settings: how the model adapts.
        chunk: tasks adapted per vectorised pass (bounds memory).

    Returns:
        ``{"mae", "rmse", "ndcg@3", "n_users"}`` pooled over every real query row (nDCG averaged
        over users).
    """
    scores = Adapter(model, settings).score_tasks(batch, chunk).cpu()
    targets, mask = batch.query_ratings.cpu(), batch.query_mask.cpu()
    return {
        "mae": mae(scores, targets, mask),
        "rmse": rmse(scores, targets, mask),
        "ndcg@3": ndcg_at_k(scores, targets, 3, mask),
        "n_users": len(batch),
    }


@dataclasses.dataclass
class Best:
    """The best validation so far: its MAE, step, weights (CPU copies) and metrics."""

    mae: float = math.inf
    step: int = 0
    state: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float] | None = None


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


def _kshot(batch: TaskBatch, k: int | None) -> TaskBatch:
    """Keeps the first k support rows (the scenario's K-shot order) of every task."""
    if k is None:
        return batch
    return dataclasses.replace(
        batch,
        support_items=batch.support_items[:, :k],
        support_ratings=batch.support_ratings[:, :k],
        support_mask=batch.support_mask[:, :k],
    )


class Trainer:
    """Meta-trains one model: build, (resume,) loop with EMA, validation and checkpoints, write.

    Args:
        preprocessed_dir: preprocessing output directory (local path).
        method: ``"maml"``, ``"fomaml"`` or ``"reptile"``.
        settings: the training settings.
        output_dir: model directory to write (local path or ``gs://`` prefix).
    """

    def __init__(self, preprocessed_dir: str, method: str, settings: TrainSettings, output_dir: str):
        self.preprocessed_dir = preprocessed_dir
        self.method = method
        self.settings = settings
        self.output_dir = output_dir
        self.checkpoint_dir = settings.checkpoint_dir or storage.join(output_dir, "checkpoints")
        self.step = 0
        self.curve: list[list[float]] = []
        self.val_history: list[dict[str, float]] = []
        self.best = Best()

    def run(self, resume: bool) -> dict[str, float]:
        """Trains (from the last checkpoint when ``resume``), writes the model directory, returns metrics."""
        settings = self.settings
        self.context = distributed.init_from_env(settings.device)
        if settings.meta_batch < self.context.world_size:
            distributed.shutdown(self.context)
            raise ValueError(
                f"meta_batch {settings.meta_batch} is smaller than the {self.context.world_size} ranks: each "
                f"rank computes a share of the meta-batch, so some would get no task; raise meta_batch to "
                f"at least {self.context.world_size} or run fewer processes"
            )
        previous_threads = torch.get_num_threads()
        if self.context.device.type == "cpu" and settings.cpu_threads > 0:
            torch.set_num_threads(settings.cpu_threads)
        self.log = ProgressLog(settings.meta_steps, enabled=self.context.is_main, every=settings.log_every)
        started = time.monotonic()
        try:
            self._build()
            if resume:
                self._resume()
            self.log.event("start", method=self.method, world_size=self.context.world_size,
                           device=str(self.context.device), meta_steps=settings.meta_steps,
                           start_step=self.step)  # fmt: skip
            if settings.val_every and self.step == 0:
                # The start (model_init's fitted tables) is a candidate like every validated checkpoint:
                # when meta-training does not beat it on the validation users, the start ships.
                self._validate()
            while self.step < settings.meta_steps:
                self._train_step()
            result = self._result(time.monotonic() - started)
            if self.context.is_main:
                self._write_model_dir(result)
                self.log.event("done", **result)
            distributed.barrier(self.context)
            return result
        finally:
            torch.set_num_threads(previous_threads)  # the caller's process keeps its own setting
            distributed.shutdown(self.context)

    # ----------------------------------------------------------------------------------- build

    def _build(self) -> None:
        """Seeds every RNG, then builds the model, EMA copy, optimizer, learner, sampler and val tasks."""
        settings, device = self.settings, self.context.device
        random.seed(settings.seed)
        np.random.seed(settings.seed)
        torch.manual_seed(settings.seed)
        self.pre = Preprocessed.load(self.preprocessed_dir)
        self.model = build_model(self.pre, settings).to(device)
        distributed.broadcast_parameters(self.context, self.model)
        for name, parameter in self.model.named_parameters():
            if parameter_group(self.model, name) in settings.freeze:
                parameter.requires_grad_(False)
        self.optimizer = torch.optim.Adam(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=settings.outer_lr, weight_decay=settings.weight_decay,
        )  # fmt: skip
        self.learner = MetaLearner(
            self.model, self.method, settings.inner_steps, settings.inner_lr, settings.adapt_mode,
            outer_loss=settings.outer_loss, id_dropout=settings.id_dropout,
        )  # fmt: skip
        # Tasks of heavy training users (preprocessing's users_over_max) are capped to the size of an
        # evaluated user's support set, so they look like the tasks the model will meet.
        max_ratings = self.pre.schema.get("tasks", {}).get("max_ratings")
        max_support = None if max_ratings is None else max(1, int(max_ratings) - settings.query_size)
        self.sampler = TrainTaskSampler(
            self.pre, query_size=settings.query_size, seed=settings.seed, max_support=max_support
        )
        _, val_batch = scenario_tasks(self.pre, "user_cold", users_split="val")
        self.val_batch = _kshot(val_batch, settings.val_kshot).to(device)
        # Polyak averaging: a smoothed copy of the weights is what gets validated and saved.
        self.averaged = copy.deepcopy(self.model).requires_grad_(False) if settings.ema > 0 else None

    # --------------------------------------------------------------------------------- resume

    def _checkpoint_state(self) -> dict[str, object]:
        return {
            "method": self.method, "step": self.step, "config": self.settings.to_dict(),
            "model": _cpu_state(self.model),
            "ema": None if self.averaged is None else _cpu_state(self.averaged),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(), "sampler": self.sampler.state_dict()},
            "curve": self.curve, "val_history": self.val_history, "best": dataclasses.asdict(self.best),
        }  # fmt: skip

    def _resume(self) -> None:
        """Restores the last checkpoint in the checkpoint directory, when there is one.

        Raises:
            ValueError: The checkpoint was saved by another method or another training config (a key
                outside :data:`RESUMABLE_DIFFERENCES` differs): it belongs to another run, and
                resuming it would return that run's model under this run's config. A retry has the
                same config, so this is a misconfiguration (a checkpoint folder shared by runs) and
                fails rather than silently training from scratch beside the foreign checkpoints.
        """
        state = checkpoint.load_latest(self.checkpoint_dir)
        if state is None:
            return
        if state["method"] != self.method:
            raise ValueError(
                f"checkpoint in {self.checkpoint_dir} is for {state['method']!r}, not {self.method!r}"
            )
        differences = self._config_differences(state.get("config"))
        if differences:
            raise ValueError(
                f"checkpoint at step {state['step']} in {self.checkpoint_dir} was saved with another "
                f"training config ({'; '.join(differences)}): it belongs to another run, not to a retry "
                f"of this one. Give each run its own checkpoint folder (the pipeline's components do: "
                f"<root>/checkpoints/<run id>/<task id>/<method>) or train without resuming (--no-resume)"
            )
        self.model.load_state_dict(state["model"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.sampler.load_state_dict(state["rng"]["sampler"])
        self.step, self.curve, self.val_history = state["step"], state["curve"], state["val_history"]
        self.best = Best(**state["best"])
        self.log.event("resumed", step=self.step, checkpoint_dir=self.checkpoint_dir)

    def _config_differences(self, saved: dict | None) -> list[str]:
        """``key: checkpoint value != this run's`` for each training key that differs from a checkpoint's
        config, leaving out :data:`RESUMABLE_DIFFERENCES`. A key the checkpoint lacks (saved before the
        key existed) counts as its default."""
        if saved is None:
            return ["the checkpoint records no training config"]
        current = self.settings.to_dict()
        defaults = type(self.settings)().to_dict()
        return [
            f"{key}: {saved.get(key, defaults.get(key))!r} != {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if key not in RESUMABLE_DIFFERENCES and saved.get(key, defaults.get(key)) != current.get(key)
        ]

    # ----------------------------------------------------------------------------------- loop

    def _train_step(self) -> None:
        """One meta-step (sample, meta-gradient, all-reduce, Adam, EMA), then validation and checkpoint."""
        settings, context = self.settings, self.context
        global_batch = self.sampler.sample(settings.meta_batch)
        tasks = distributed.shard_range(len(global_batch), context.rank, context.world_size)
        shard = global_batch.select(tasks).to(context.device)
        self.model.train()
        loss, grads = self.learner.meta_gradient(shard, total_tasks=len(global_batch), first_task=tasks.start)
        loss, grads = distributed.all_reduce_sum(context, grads, loss)
        # Every rank holds the same reduced values, so every rank stops here together (no rank waits
        # in a collective for one that left).
        self._check_finite("meta-loss or meta-gradient", [loss, *grads.values()])
        self.optimizer.zero_grad(set_to_none=False)
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                parameter.grad = grads[name].detach()
        self.optimizer.step()
        self._check_finite("weights after the update", list(self.model.parameters()), float(loss))
        self._update_ema()
        self.step += 1
        self.curve.append([self.step, float(loss)])
        self.log.step(self.step, float(loss))
        last = self.step == settings.meta_steps
        if (settings.val_every and self.step % settings.val_every == 0) or last:
            self._validate()
        if context.is_main and (
            (settings.checkpoint_every and self.step % settings.checkpoint_every == 0) or last
        ):
            checkpoint.save_checkpoint(self.checkpoint_dir, self.step, self._checkpoint_state())

    def _check_finite(self, what: str, tensors: list[torch.Tensor], loss: float | None = None) -> None:
        """Stops a diverged run before a non-finite value reaches the weights, EMA, checkpoints or outputs.

        Training on would only spread NaN through every weight (and, with ``val_every: 0``, ship them);
        the checkpoints keep the last finite state, so the error names the remedy instead.

        Raises:
            FloatingPointError: A tensor holds NaN or inf.
        """
        with torch.no_grad():
            finite = bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())  # one sync
        if finite:
            return
        step = self.step + 1
        shown = float(tensors[0]) if loss is None else loss
        raise FloatingPointError(
            f"meta-training diverged at meta-step {step}/{self.settings.meta_steps}: the {what} is not "
            f"finite (meta-loss {shown}); no model was written. Lower outer_lr ({self.settings.outer_lr}) "
            f"or inner_lr ({self.settings.inner_lr})"
        )

    def _update_ema(self) -> None:
        if self.averaged is None:
            return
        with torch.no_grad():
            for smooth, current in zip(self.averaged.parameters(), self.model.parameters(), strict=True):
                smooth.lerp_(current, 1.0 - self.settings.ema)

    def _validate(self) -> None:
        """Validates the EMA weights (or the model's) and keeps the best by validation MAE."""
        validated = self.model if self.averaged is None else self.averaged
        validated.eval()
        metrics = validate(validated, self.val_batch, self.settings.adapt())
        self.val_history.append({"step": self.step, **metrics})
        if metrics["mae"] < self.best.mae:
            best_state = {name: tensor.clone() for name, tensor in _cpu_state(validated).items()}
            self.best = Best(metrics["mae"], self.step, best_state, metrics)
        self.log.event("validation", step=self.step, **metrics)

    # ---------------------------------------------------------------------------------- write

    def _result(self, train_seconds: float) -> dict[str, float]:
        """Loads the best validated weights into the model and returns the final metrics."""
        if self.best.state is not None:
            self.model.load_state_dict(self.best.state)
        best_metrics = self.best.metrics or {"mae": math.nan, "rmse": math.nan, "ndcg@3": math.nan}
        return {
            "val_mae": best_metrics["mae"],
            "val_rmse": best_metrics["rmse"],
            "val_ndcg@3": best_metrics["ndcg@3"],
            "best_step": self.best.step,
            "final_loss": self.curve[-1][1] if self.curve else math.nan,
            "meta_steps": self.settings.meta_steps,
            "train_seconds": round(train_seconds, 2),
        }

    def _write_model_dir(self, result: dict[str, float]) -> None:
        """Writes model.pt, model.json, schema.json and metrics.json locally or to a ``gs://`` prefix."""
        training = {key: value for key, value in self.settings.to_dict().items() if key not in _RUN_ONLY_KEYS}
        extra = {"method": self.method, "adapt": self.settings.adapt().to_dict(), "training": training}
        metrics = {"method": self.method, **result, "curve": self.curve, "val_history": self.val_history}
        model = copy.deepcopy(self.model).cpu()
        with storage.local_output(self.output_dir) as directory:
            self._write_local(model, extra, metrics, directory)

    def _write_local(self, model: PreferenceModel, extra: dict, metrics: dict, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        model.save(directory, extra)
        shutil.copyfile(Path(self.preprocessed_dir) / "schema.json", directory / "schema.json")
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
