"""Times the vectorised second-order MAML meta-gradient against a per-task reference loop.

Data: the embedded synthetic data set (``run_preprocessing("synthetic", ...)`` into a temporary
directory; MovieLens-100K layout and sizes per user), tasks drawn by ``TrainTaskSampler`` exactly as in
meta-training, the model built with ``metarec.training.TrainSettings``. Both implementations compute the
meta-gradient of the same model on the same tasks with the same inner steps; the script checks they
agree (exit status 1 when they do not) and prints one JSON line last::

    {"device": .., "steps": .., "meta_batch": .., "tasks_per_s": .., "reference_tasks_per_s": .., "speedup": ..}

Usage: ``python bench/meta_train_speed.py [--meta-batch 32] [--inner-steps 5] [--steps 10] [--device auto]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_per_batch(compute, batches, device) -> float:
    """Seconds per meta-gradient, after one untimed warm-up call."""
    compute(batches[0])
    _synchronise(device)
    start = time.perf_counter()
    for batch in batches:
        compute(batch)
    _synchronise(device)
    return (time.perf_counter() - start) / len(batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-gradient")
    parser.add_argument("--inner-steps", type=int, default=5, help="inner SGD steps per task")
    parser.add_argument("--steps", type=int, default=10, help="timed meta-gradients per implementation")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch default; 1 suits these small ops)",
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed")
    args = parser.parse_args(argv)

    from metarec.distributed import pick_device
    from metarec.meta import MetaLearner
    from metarec.meta.reference import reference_meta_gradient
    from metarec.model_init import build_model
    from metarec.preprocessing import run_preprocessing
    from metarec.tasks import Preprocessed, TrainTaskSampler
    from metarec.training import TrainSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    settings = TrainSettings()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="metarec-bench-") as tmp:
        run_preprocessing("synthetic", None, None, tmp)
        pre = Preprocessed.load(tmp)
        model = build_model(pre, settings).to(device)
        sampler = TrainTaskSampler(pre, query_size=settings.query_size, seed=0)
        batches = [sampler.sample(args.meta_batch).to(device) for _ in range(args.steps)]
    lr, mode = settings.inner_lr, settings.adapt_mode
    learner = MetaLearner(model, "maml", args.inner_steps, lr, mode)

    # Same meta-gradient from both implementations on every batch.
    max_diff = 0.0
    for batch in batches[:2]:
        loss, grads = learner.meta_gradient(batch)
        ref_loss, ref_grads = reference_meta_gradient(model, batch, args.inner_steps, lr, mode)
        max_diff = max([max_diff, abs(float(loss - ref_loss))] +
                       [float((grads[name] - ref_grads[name]).abs().max()) for name in ref_grads])  # fmt: skip
    vectorised = _time_per_batch(learner.meta_gradient, batches, device)
    reference = _time_per_batch(
        lambda b: reference_meta_gradient(model, b, args.inner_steps, lr, mode), batches, device
    )
    agree = max_diff <= args.tolerance
    print(
        f"max abs difference of the meta-gradients: {max_diff:.3e} ({'ok' if agree else 'MISMATCH'})",
        file=sys.stderr,
    )
    print(f"vectorised: {vectorised * 1e3:.1f} ms/meta-batch, reference: {reference * 1e3:.1f} ms/meta-batch, "
          f"threads={torch.get_num_threads()}", file=sys.stderr)  # fmt: skip
    result = {
        "device": str(device),
        "steps": args.steps,
        "meta_batch": args.meta_batch,
        "inner_steps": args.inner_steps,
        "tasks_per_s": round(args.meta_batch / vectorised, 1),
        "reference_tasks_per_s": round(args.meta_batch / reference, 1),
        "speedup": round(reference / vectorised, 2),
        "max_abs_diff": max_diff,
        "data": "synthetic (run_preprocessing) via TrainTaskSampler",
    }
    print(json.dumps(result))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
