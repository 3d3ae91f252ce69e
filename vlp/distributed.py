"""World information and the collective operations the losses need, with correct gradients.

World size and rank always come from torch.distributed when it is initialised: accelerate under DeepSpeed on
CPU reports a single process although the process group holds the full world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the process group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info() -> WorldInfo:
    """Rank and world size from torch.distributed (1 process when it is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return WorldInfo()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized tensors from all ranks along dim 0.

    Backward sums, over ranks, the gradients every rank computed for this rank's slice. When every rank computes
    the same global loss L, the local gradient is therefore W * dL/dx_local, which data-parallel gradient
    averaging (DDP, DeepSpeed) turns back into the exact single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph (identity on a single process)."""
    if world_info().world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (identity on a single process)."""
    if world_info().world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
