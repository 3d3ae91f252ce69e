"""Ring neighbour exchange (vlp.distributed) on a real 3-process gloo group, and its single-process path."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.distributed_harness import run_shared, shared_check
from vlp.distributed import RingExchange, ring_shift, ring_visit


def _logaddexp_(acc: torch.Tensor, part: torch.Tensor) -> None:
    torch.logaddexp(acc, part, out=acc)


@shared_check(3)
def _ring_worker(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=60))
    out: dict = {}
    # ring_shift: the previous rank's tensors, several dtypes at once.
    a, b = ring_shift([torch.full((2, 3), float(rank)), torch.arange(4) + 10 * rank], group=group)
    out["shift"] = (a.tolist(), b.tolist())

    # ring_visit with unequal block sizes: every block seen once, in ring order, with intact contents; summed
    # and log-sum-exp accumulators come home holding every rank's contributions.
    sizes = [2, 5, 1][:world]

    def block(owner: int) -> torch.Tensor:
        return torch.arange(sizes[owner] * 3, dtype=torch.float64).reshape(-1, 3) + 100 * owner

    seen, intact = [], True

    def visit(owner, payload, parts):
        nonlocal intact
        intact &= torch.equal(payload[0], block(owner)) and payload[1].shape == (sizes[owner],)
        seen.append(owner)
        parts[0].add_(payload[0] * (rank + 1))  # sum over ranks of (rank + 1) * block = W(W+1)/2 * block
        parts[1].copy_(torch.full_like(parts[1], float(rank)))  # lse over ranks of r = log sum_r exp(r)

    n = sizes[rank]
    acc_sum, acc_lse = ring_visit(
        [block(rank), torch.zeros(n, dtype=torch.float32)],
        [torch.zeros(n, 3, dtype=torch.float64), torch.full((n,), -math.inf)],
        visit,
        sizes=sizes,
        identities=[0.0, -math.inf],
        combines=[torch.Tensor.add_, _logaddexp_],
        group=group,
    )
    out["seen"], out["intact"] = seen, intact
    out["sum_err"] = float((acc_sum - block(rank) * world * (world + 1) / 2).abs().max())
    out["lse_err"] = float((acc_lse - math.log(sum(math.exp(r) for r in range(world)))).abs().max())
    # Two exchange streams in flight at once, told apart by their tags.
    x1 = RingExchange([torch.full((3,), float(rank))], [r1 := torch.empty(3)], group, tag=0)
    x2 = RingExchange([torch.full((3,), -float(rank))], [r2 := torch.empty(3)], group, tag=5)
    x2.wait()
    x1.wait()
    out["streams"] = (r1.tolist(), r2.tolist())
    return out


def test_ring_exchange_on_three_processes():
    world = 3
    results = run_shared(_ring_worker, world)
    for rank, res in enumerate(results):
        prev = (rank - 1) % world
        assert res["shift"] == ([[float(prev)] * 3] * 2, [10 * prev + i for i in range(4)])
        assert res["seen"] == [(rank - k) % world for k in range(world)]
        assert res["intact"] is True
        assert res["sum_err"] == 0.0
        assert res["lse_err"] <= 1e-6
        assert res["streams"] == ([float(prev)] * 3, [-float(prev)] * 3)


def test_ring_visit_single_process_visits_own_block_once():
    calls = []

    def visit(owner, payload, parts):
        calls.append((owner, payload[0].sum().item()))
        parts[0].add_(2.0)

    (acc,) = ring_visit([torch.ones(4, 2)], [torch.zeros(4)], visit)
    assert calls == [(0, 8.0)]
    assert acc.tolist() == [2.0] * 4
    assert [t.tolist() for t in ring_shift([torch.arange(3)])] == [[0, 1, 2]]


def test_ring_exchange_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="receive buffers"):
        RingExchange([torch.ones(2)], [])
    with pytest.raises(ValueError, match="identity"):
        ring_visit([torch.ones(2)], [torch.zeros(2)], lambda *a: None, identities=[0.0, 1.0])
