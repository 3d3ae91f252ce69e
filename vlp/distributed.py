"""World information, the process-group helpers every package shares, and the collectives the losses need (with
correct gradients).

World size and rank always come from torch.distributed when it is initialised: accelerate under DeepSpeed on
CPU reports a single process although the process group holds the full world.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

T = TypeVar("T")


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the process group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info(group: ProcessGroup | None = None) -> WorldInfo:
    """Rank and world size (within ``group``, default the whole world) from torch.distributed.

    One process when torch.distributed is not initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(rank=dist.get_rank(group), world_size=dist.get_world_size(group))
    return WorldInfo()


def is_distributed() -> bool:
    """Whether a torch.distributed process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank (identity on one process)."""
    if is_distributed():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def comm_device(device: torch.device) -> torch.device:
    """Where tensors for a collective must live: the compute device under NCCL, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, in float64 (identity on one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device(device or torch.device("cpu")))
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(x: torch.Tensor, device: torch.device | None = None) -> list[torch.Tensor]:
    """Every rank's [n_r, ...] tensor (n_r may differ between ranks), on every rank, on the CPU."""
    if not is_distributed():
        return [x]
    world = dist.get_world_size()
    cdev = comm_device(device or x.device)
    n = torch.tensor([x.shape[0]], device=cdev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes_i), *x.shape[1:]), dtype=x.dtype, device=cdev)
    padded[: x.shape[0]] = x.to(cdev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [p[:s].cpu() for p, s in zip(parts, sizes_i)]


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


# --------------------------------------------------------------------------------------------------------------
# Ring neighbour exchange
# --------------------------------------------------------------------------------------------------------------


def _global_rank(group: ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class RingExchange:
    """One asynchronous ring step: send tensors to the next rank and receive as many from the previous one.

    Posted at construction with ``batch_isend_irecv`` (point-to-point, no collective); ``wait()`` blocks until
    both the sends and the receives are complete, after which the send buffers may be reused and the receive
    buffers hold the previous rank's data. The send and receive lists pair up by position, so the previous
    rank's ``send[i]`` lands in this rank's ``recv[i]`` (shapes and dtypes must agree). ``tag`` separates
    independent exchange streams that are in flight at the same time between the same ranks.
    """

    def __init__(
        self,
        send: Sequence[torch.Tensor],
        recv: Sequence[torch.Tensor],
        group: ProcessGroup | None = None,
        tag: int = 0,
    ) -> None:
        if len(send) != len(recv):
            raise ValueError(
                f"ring exchange needs as many receive buffers as tensors sent, got {len(send)} "
                f"to send and {len(recv)} to receive"
            )
        info = world_info(group)
        self._works: list = []
        if info.world_size == 1:
            for s, r in zip(send, recv):
                if s.data_ptr() != r.data_ptr():
                    r.copy_(s)
            return
        nxt = _global_rank(group, (info.rank + 1) % info.world_size)
        prv = _global_rank(group, (info.rank - 1) % info.world_size)
        ops = []
        for i, (s, r) in enumerate(zip(send, recv)):
            if not (s.is_contiguous() and r.is_contiguous()):
                raise ValueError("ring exchange buffers must be contiguous")
            ops.append(dist.P2POp(dist.isend, s, nxt, group=group, tag=tag + i))
            ops.append(dist.P2POp(dist.irecv, r, prv, group=group, tag=tag + i))
        if ops:
            self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> None:
        """Block until this step's sends and receives have completed."""
        for w in self._works:
            w.wait()
        self._works = []


def ring_shift(tensors: Sequence[torch.Tensor], group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Synchronously pass ``tensors`` one step round the ring: return the previous rank's tensors.

    Every rank must pass tensors of the same shapes and dtypes.
    """
    send = [t.contiguous() for t in tensors]
    recv = [torch.empty_like(t) for t in send]
    RingExchange(send, recv, group).wait()
    return recv


def _add_(acc: torch.Tensor, part: torch.Tensor) -> None:
    acc.add_(part)


def ring_visit(
    payload: Sequence[torch.Tensor],
    accumulators: Sequence[torch.Tensor],
    visit: Callable[[int, list[torch.Tensor], list[torch.Tensor]], None],
    *,
    sizes: Sequence[int] | None = None,
    identities: Sequence[float] | None = None,
    combines: Sequence[Callable[[torch.Tensor, torch.Tensor], None]] | None = None,
    group: ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Show every rank's ``payload`` to every rank, in turn, and bring per-row accumulators home.

    This is the communication pattern of the chunked cross-device losses: a block (e.g. text features) visits
    all ranks round a ring with point-to-point sends, and results that other ranks compute *for* that block
    (e.g. its gradient, or its column log-sum-exp) travel with it and arrive back at its owner. No rank ever
    holds more than two blocks at a time, so memory does not grow with the world size.

    ``visit(owner, payload_q, parts_q)`` is called once per rank ``owner`` (this rank's own block first) with
    that rank's payload (read-only) and fresh accumulator parts filled with ``identities``; it must add this
    rank's contributions to ``parts_q`` in place. Parts are merged into the travelling accumulators with
    ``combines`` (default: in-place sum; e.g. log-add-exp for a log-sum-exp), while the next block is already
    being computed on, so the exchange overlaps computation. ``accumulators`` are this rank's initial
    accumulator values (their dtypes and trailing shapes define the travelling buffers); the return value is
    the fully accumulated version of them (every rank's contributions). ``payload`` and ``accumulators`` have
    dim 0 equal to this rank's block size; ``sizes`` gives every rank's block size when they differ.
    """
    info = world_info(group)
    world, rank = info.world_size, info.rank
    identities = list(identities) if identities is not None else [0.0] * len(accumulators)
    combines = list(combines) if combines is not None else [_add_] * len(accumulators)
    if not (len(identities) == len(combines) == len(accumulators)):
        raise ValueError("ring_visit needs one identity and one combine per accumulator")
    if world == 1:
        accs = list(accumulators)
        visit(0, list(payload), accs)
        return accs
    n_local = payload[0].shape[0] if payload else accumulators[0].shape[0]
    sizes = list(sizes) if sizes is not None else [n_local] * world
    if len(sizes) != world or sizes[rank] != n_local:
        raise ValueError(f"ring_visit: sizes {sizes} do not match world size {world} and local size {n_local}")
    cap = max(sizes)

    def buffers(like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.empty((cap, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in like]

    def view(bufs: list[torch.Tensor], n: int) -> list[torch.Tensor]:
        return [b[:n] for b in bufs]

    # Payload: two rotating receive buffers; the own block is sent straight from the caller's tensors.
    pay_bufs = [buffers(payload), buffers(payload)] if payload else [[], []]
    acc_bufs = [buffers(accumulators), buffers(accumulators)]
    parts_buf = buffers(accumulators)

    cur_pay = [p.contiguous() for p in payload]
    cur_acc = view(acc_bufs[0], n_local)
    for a, init in zip(cur_acc, accumulators):
        a.copy_(init)
    acc_in_flight: RingExchange | None = None
    for step in range(world):
        owner = (rank - step) % world
        n_owner = sizes[owner]
        pay_x = None
        if step < world - 1 and payload:
            n_next = sizes[(owner - 1) % world]
            nxt_pay = view(pay_bufs[step % 2], n_next)
            pay_x = RingExchange(cur_pay, nxt_pay, group, tag=0)
        if step == 0:
            visit(owner, cur_pay, cur_acc)
        else:
            parts = view(parts_buf, n_owner)
            for p, ident in zip(parts, identities):
                p.fill_(ident)
            visit(owner, cur_pay, parts)
            assert acc_in_flight is not None
            acc_in_flight.wait()
            for a, p, comb in zip(cur_acc, parts, combines):
                comb(a, p)
        # Send the accumulator on; after the last step it goes to its owner (our next rank), and ours arrives.
        n_recv = sizes[(owner - 1) % world] if step < world - 1 else n_local
        nxt_acc = view(acc_bufs[(step + 1) % 2], n_recv)
        acc_in_flight = RingExchange(cur_acc, nxt_acc, group, tag=len(payload) + 1)
        if pay_x is not None:
            pay_x.wait()
            cur_pay = nxt_pay
        cur_acc = nxt_acc
    assert acc_in_flight is not None
    acc_in_flight.wait()
    return cur_acc
