"""Multi-process data parallel helpers (torchrun): process group setup and gathers for negatives.

``torchrun --nproc-per-node N -m videolm.cli pretrain ...`` sets RANK, WORLD_SIZE
and LOCAL_RANK; ``init_distributed`` then joins the group with gloo on CPU and
NCCL on CUDA. A plain ``videolm pretrain`` runs as a world of one and none of
this code talks to another process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, dist.get_world_size(), device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own slice, summed over ranks.

    Every rank's loss uses every rank's vectors, so the gradient of the summed
    loss with respect to this rank's input is the sum of all ranks' gradients
    for that slice (DDP later divides parameter gradients by the world size).
    """

    @staticmethod
    def forward(ctx, x):
        rank, world = rank_and_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over ranks along dim 0, keeping gradients flowing to the local part.

    Every rank must pass tensors of the same shape (the trainer drops the last
    incomplete batch, so they do). In a world of one this returns the inputs.
    """
    _, world = rank_and_world()
    if world == 1:
        return tensors
    return tuple(_GatherWithGrad.apply(t) for t in tensors)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    _, world = rank_and_world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def gather_keys(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``keys`` concatenated, and where this rank's rows start in the result."""
    rank, world = rank_and_world()
    if world == 1:
        return keys, 0
    return gather_no_grad(keys), rank * len(keys)


def all_reduce_mean(values: dict, device) -> dict:
    """Average logged values (0-dim tensors or numbers) over ranks so rank 0's log describes the whole step.

    The result stays on the device: reading it is left to the logger, once per window.
    """
    _, world = rank_and_world()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    dist.all_reduce(t)
    return dict(zip(keys, t / world))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
