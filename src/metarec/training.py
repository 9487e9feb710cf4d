"""Meta-training settings and entry points: MAML / FOMAML / Reptile on the train users' tasks.

``run_meta_training`` is the step function (KFP component, CLI, benchmarks); ``python -m
metarec.training`` is the entry point that torchrun / a PyTorchJob launches (data-parallel when
``WORLD_SIZE > 1``, see ``metarec.distributed``). The loop itself is :class:`metarec.trainer.Trainer`.

A run killed at any point and started again with ``resume=True`` continues from its last checkpoint
and ends with the same weights as an uninterrupted run with the same seed (bitwise on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from metarec.meta.adapter import AdaptSettings
from metarec.model import PARAMETER_GROUPS, ModelConfig, model_config
from metarec.settings import Settings


@dataclasses.dataclass(frozen=True)
class TrainSettings(Settings):
    """The ``train`` section of a run config (keys of :data:`DEFAULTS`; anything else raises ValueError).

    The defaults are sized for MovieLens-100K on two CPU cores (well under a minute per method); tests
    and the tiny synthetic pipeline pass smaller ``meta_steps``. The model settings (head mode, 8 user
    factors, priors of 3 pseudo-ratings, L1 outer loss) were chosen by the mean validation-user metrics
    of three MovieLens-100K seeds.
    """

    section = "train"
    meta_steps: int = 500  # outer (meta) optimisation steps
    meta_batch: int = 32  # tasks (users) per meta-step, global over all ranks
    inner_steps: int = 5  # inner SGD steps per task (also the adaptation used at evaluation/serving)
    inner_lr: float = 0.01  # inner SGD rate of the adapted layers (user terms: Gauss-Newton steps)
    outer_lr: float = 0.002  # Adam learning rate of the meta-update
    outer_loss: Literal["mse", "l1"] = "l1"  # query loss of the meta-update ("l1" targets MAE); inner: MSE
    weight_decay: float = 0.0  # Adam weight decay (L2) on the meta-parameters
    ema: float = 0.99  # decay of an exponential moving average of the weights, validated and saved (0 = off)
    adapt_mode: Literal["all", "decision", "head"] = (
        "head"  # "decision": MLP (MeLU), "head": last layer (ANIL)
    )
    embed_dim: int = 16  # width of every feature embedding
    hidden: tuple[int, ...] = (64, 32)  # decoder MLP hidden widths
    item_bias: bool = True  # learned per-item offset outside the adapted layers
    # start the item bias from the train users' support rows: shrunk item means, or with
    # item_factor_init the MF fit's item biases
    item_bias_init: bool = True
    item_bias_shrink: float = 10.0  # pseudo-count of ratings at the global mean in that initial item bias
    user_bias: bool = (
        True  # per-user logit offset, adapted in every mode (its meta-learned value is the prior)
    )
    user_bias_lr: float = 1.0  # the user bias's inner lr as a multiple of inner_lr
    user_bias_prior: float | None = (
        3.0  # None: SGD on the user terms; P: Gauss-Newton MAP steps, P pseudo-ratings
    )
    user_factors: int = 8  # width of a per-user latent vector adapted with the user bias (0 = none)
    user_factor_prior: float | None = None  # its Gauss-Newton prior in pseudo-ratings (None: user_bias_prior)
    # Start the item factors and item bias from a biased matrix factorisation (ALS) of the train users'
    # support rows, the rows baselines are fitted on; meta-training then refines them with the rest.
    item_factor_init: bool = True
    item_factor_init_reg: float = 10.0  # that ALS fit's ridge penalty
    # probability that a training row's item is seen as a cold item, so that the features alone also
    # learn to rank (item cold-start); modes "decision" and "head" only
    id_dropout: float = 0.0
    # derive the item bias and item factors from item features too, so a cold item gets its own (chosen
    # on validation users' user+item-cold rows: nDCG@3 +0.019, user-cold unchanged; docs/tuning.md)
    item_content: bool = True
    item_content_reg: float = 10.0  # ridge penalty of that map's starting fit on the warm items' id rows
    # parameter groups meta-training keeps at their starting weights (metarec.model.PARAMETER_GROUPS)
    freeze: tuple[str, ...] = ()
    learn_inner_lr: bool = False  # meta-learn a per-layer inner learning-rate scale (MAML only: 2nd order)
    query_size: int = 10  # inner-query rows per training task (re-split of the user's support rows)
    seed: int = 0  # seeds model init, task sampling and every RNG
    checkpoint_every: int = 100  # meta-steps between checkpoints (0 = only the final one)
    checkpoint_dir: str | None = None  # None -> <output_dir>/checkpoints; may be gs://bucket/prefix
    # meta-steps between validations, the start (step 0) included; the best val MAE is kept. 0: no
    # choice, the final weights are kept.
    val_every: int = 25
    val_kshot: int | None = None  # None: adapt on every support row of the val users; K: only the first K
    device: str = "auto"  # "auto" (CUDA when available) | "cpu" | "cuda" | "cuda:N"
    # torch CPU threads on a CPU device (0 = torch's default). One suits these small ops and avoids
    # oversubscription when several trainings share a node (two threads were up to 10x slower here).
    cpu_threads: int = 1
    log_every: int = 10  # meta-steps between JSON log lines (non-TTY)

    def validate(self) -> None:
        """Refuses out-of-range values that the field types cannot express."""
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout!r}")
        unknown = sorted(set(self.freeze) - set(PARAMETER_GROUPS))
        if unknown:
            raise ValueError(
                f"freeze: unknown parameter groups {unknown}; expected some of {PARAMETER_GROUPS}"
            )
        for key in ("meta_steps", "inner_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {getattr(self, key)!r}")
        for key in ("meta_batch", "embed_dim", "query_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")

    def model_config(self, rating_min: float, rating_max: float) -> ModelConfig:
        """The architecture these settings build, on the data's rating range."""
        return model_config({**self.to_dict(), "rating_min": rating_min, "rating_max": rating_max})

    def adapt(self) -> AdaptSettings:
        """How the trained model adapts (validation, evaluation, serving): the model.json ``adapt``."""
        return AdaptSettings(mode=self.adapt_mode, inner_steps=self.inner_steps, inner_lr=self.inner_lr)


# The train section's keys and defaults as a dict (run-config validation, docs/pipeline.md's table).
DEFAULTS: dict[str, Any] = TrainSettings().to_dict()


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
        config: the ``train`` section (keys of :data:`DEFAULTS`; unknown keys raise ValueError).
        output_dir: model directory to write (local path or ``gs://`` prefix): model.pt, model.json
            (model config, method, adapt settings, training config), schema.json (copied from
            preprocessing), metrics.json (training curve, validation history, best step).
        resume: continue from the last checkpoint in the checkpoint directory when there is one.

    Returns:
        Final metrics: ``val_mae``, ``val_rmse``, ``val_ndcg@3`` (best validation weights, which are
        the ones saved), ``best_step`` (0: meta-training never beat its start on the validation users, so the start ships), ``final_loss``, ``meta_steps``, ``train_seconds``.

    Raises:
        ValueError: unknown method or config key.
    """
    from metarec.meta import METHODS
    from metarec.trainer import Trainer

    if method not in METHODS:
        raise ValueError(f"unknown meta-learning method {method!r}; expected one of {METHODS}")
    settings = TrainSettings.from_dict(config)
    return Trainer(preprocessed_dir, method, settings, str(output_dir)).run(resume)


def parse_override(value: str) -> object:
    """The value of one ``--set KEY=VALUE``: JSON first, else YAML.

    JSON first because that is what the PyTorchJob component writes (``json.dumps``), and YAML 1.1 reads
    JSON's ``1e-05`` as a string (its floats need a dot), which the settings would then refuse.
    """
    import yaml

    try:
        return json.loads(value)
    except ValueError:
        return yaml.safe_load(value)


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
                        help="override one config key (value parsed as JSON, else YAML), repeatable")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    args = parser.parse_args(argv)
    import yaml

    config: dict[str, object] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        config = dict(loaded.get("train", loaded) if isinstance(loaded, dict) else {})
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = parse_override(value)
    from metarec import storage

    # A PyTorchJob pod gets the data set as a gs:// prefix: train on a local copy of it.
    with storage.local_copy(args.preprocessed) as preprocessed:
        result = run_meta_training(
            str(preprocessed), args.method, config, args.output, resume=not args.no_resume
        )
    # The result line is an output like the model directory: rank 0's alone (torchrun sets RANK), so a
    # log or metrics collector reading every rank's stdout sees it once.
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
