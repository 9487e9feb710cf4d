"""Data-parallel meta-training under torchrun: shard the global meta-batch, all-reduce meta-gradients.

Every rank samples the same global meta-batch (same seed, same sampler state), takes its contiguous
share of the tasks and computes its meta-gradient divided by the *global* batch size, so the summed
all-reduce equals the single-process mean over the global batch. Rank 0 alone writes outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this node (selects the GPU).
        device: device this rank computes on.
        enabled: True when a process group was initialised.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        """True on the rank that writes checkpoints, logs and outputs."""
        return self.rank == 0


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """Resolves a device setting.

    Args:
        requested: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local_rank: GPU index used for ``"auto"``/``"cuda"`` under torchrun.

    Returns:
        The device.

    Raises:
        RuntimeError: A CUDA device was asked for and none is visible (a GPU task must not train on
            the CPU while it holds the GPU).
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if str(requested).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {requested!r} was asked for but CUDA is not available (torch {torch.__version__}, "
            "built without CUDA or no GPU visible): use the -cuda image on a GPU node, or device 'cpu'"
        )
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_from_env(device: str = "auto") -> DistributedContext:
    """Initialises the process group when launched by torchrun with WORLD_SIZE > 1.

    Args:
        device: device setting (see :func:`pick_device`).

    Returns:
        The context; ``enabled`` is False (and nothing is initialised) for a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = pick_device(device, local_rank)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, resolved, False)
    import torch.distributed as dist

    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, True)


def shard_range(total: int, rank: int, world_size: int) -> slice:
    """The tasks ``[start, stop)`` of a ``total``-task global meta-batch that ``rank`` computes: a
    contiguous share, sizes differing by at most one task (``batch.select`` of it is the rank's shard)."""
    return slice(rank * total // world_size, (rank + 1) * total // world_size)


def all_reduce_sum(
    context: DistributedContext, grads: dict[str, torch.Tensor], loss: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sums per-rank meta-gradients and losses over ranks (in one flat buffer: one collective).

    Args:
        context: the distributed context (a no-op when not enabled).
        grads: name -> gradient already divided by the global batch size.
        loss: this rank's loss share (scalar).

    Returns:
        ``(loss, grads)`` summed over ranks, i.e. the global-batch mean.
    """
    if not context.enabled:
        return loss, grads
    import torch.distributed as dist

    names = list(grads)
    flat = torch.cat([grads[name].reshape(-1) for name in names] + [loss.reshape(1).to(grads[names[0]])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    reduced, offset = {}, 0
    for name in names:
        size = grads[name].numel()
        reduced[name] = flat[offset : offset + size].view_as(grads[name])
        offset += size
    return flat[-1], reduced


def broadcast_parameters(context: DistributedContext, module: torch.nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every rank (a guard against divergent starts).

    Args:
        context: the distributed context (a no-op when not enabled).
        module: the model.
    """
    if not context.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def barrier(context: DistributedContext) -> None:
    """Waits for every rank (no-op when not distributed)."""
    if context.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(context: DistributedContext) -> None:
    """Destroys the process group if this module created one."""
    if context.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
