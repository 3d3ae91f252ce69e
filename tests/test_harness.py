"""The multi-process harness itself gathers real values across a gloo group."""

import torch
import torch.distributed as dist

from tests.distributed_harness import run_distributed


def _sum_ranks(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_all_reduce_over_three_processes():
    assert run_distributed(_sum_ranks, 3) == [6.0, 6.0, 6.0]
