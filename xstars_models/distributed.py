"""Process-group helpers. Everything here is the identity in a single process, so the training
code runs unchanged with or without ``torchrun``."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "init_distributed", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 in a single process."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes, 1 in a single process."""
    return dist.get_world_size() if is_distributed() else 1


def init_distributed() -> bool:
    """Join the process group ``torchrun`` describes in the environment (NCCL with CUDA, gloo on
    CPU). Returns whether this is a multi-process run; a no-op without ``WORLD_SIZE`` > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on this rank's rows: sum the ranks' gradients w.r.t. the
        # gathered tensor, keep our slice. Cloned because the incoming gradient may be shared
        # with other nodes of the graph and all_reduce works in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping the gradient path back to each
    rank's own rows. Identity in a single process.

    ``tensor``: b x ... with the same shape on every rank -> (world_size * b) x ..., rank r's rows
    at ``[r * b, (r + 1) * b)``. Every rank must run the backward pass (it all-reduces). The
    gradient a rank receives is the sum over ranks of d(loss_r)/d(its rows), so averaging
    parameter gradients over ranks (as DDP does) gives the gradient of the mean of the ranks'
    losses.
    """
    return _GatherWithGrad.apply(tensor) if is_distributed() else tensor
