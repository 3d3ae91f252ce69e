"""The multi-process harness itself gathers real values across a gloo group."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed_harness import run_distributed, run_shared, shared_check


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


def _fail_on_rank_1(rank: int, world_size: int) -> str:
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    return "ok"


def test_a_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1:(.|\n)*ValueError: planted failure on rank 1"):
        run_distributed(_fail_on_rank_1, 2)


def _hash_and_pid(rank: int, world_size: int) -> tuple[int, int]:
    import os

    return hash("vlp"), os.getpid()


def test_each_rank_has_its_own_hash_seed_and_every_call_new_processes():
    """Ranks iterate string sets in different orders (module docstring); no process serves two calls."""
    first = run_distributed(_hash_and_pid, 2)
    second = run_distributed(_hash_and_pid, 2)
    assert first[0][0] != first[1][0]
    assert [h for h, _ in first] == [h for h, _ in second]  # the seed is the rank's, on every call
    assert len({pid for _, pid in first + second}) == 4
