"""The multi-process harness itself gathers real values across a gloo group."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed_harness import run_shared, shared_check


@shared_check(3)
def _sum_ranks(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_all_reduce_over_three_processes():
    assert run_shared(_sum_ranks, 3) == [6.0, 6.0, 6.0]


def _unregistered(rank: int, world_size: int) -> None:
    return None


def test_shared_group_refuses_a_check_that_was_not_registered():
    with pytest.raises(ValueError, match="not registered with @shared_check"):
        run_shared(_unregistered, 3)
