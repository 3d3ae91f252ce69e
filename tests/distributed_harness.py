"""Run a function on a real multi-process torch.distributed group (gloo, CPU) and collect its results.

Usage in a test::

    results = run_distributed(my_fn, world_size=2, args=(x,))   # my_fn(rank, world_size, *args) -> picklable

``my_fn`` must be a module-level function (it is pickled into spawned processes). Each process uses one
thread, and each rank its own ``PYTHONHASHSEED`` (the rank), so that a set of strings whose iteration order
depends on the hash seed (as {"logit_scale", "logit_bias"} does between seeds 0 and 1; not every set does) is
iterated differently on different ranks on every run, not on a random half of the runs: code that lets such an
order decide collectives or the backward order (ZeRO-2 reduces gradients in the order their hooks fire) fails
here deterministically. Results come back in rank order; an exception in any rank fails the call with
that rank's traceback.

Small checks that need a process group of the same size but nothing else can share one spawn (starting processes
costs seconds each on 2 cores)::

    @shared_check(3)
    def _my_check(rank, world_size): ...            # module level, no further arguments

    results = run_shared(_my_check, 3)              # in the test

The first ``run_shared`` for a world size runs every check registered for it (the test modules collected so far)
in one group, one after the other, and keeps their results; an exception stops the group there (the other ranks
could otherwise wait in a collective forever), and the checks that did not finish fail with its traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle copies tensor data; the queue's own pickler would share storage through file descriptors
        # that die with this process, racing the parent's unpickling.
        queue.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_SHARED_CHECKS: dict[int, list[Callable]] = {}
_SHARED_RESULTS: dict[int, dict[str, list[Any]] | str] = {}


def _key(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def shared_check(world_size: int) -> Callable[[Callable], Callable]:
    """Register ``fn(rank, world_size)`` to run in the one shared group of ``world_size`` processes."""

    def register(fn: Callable) -> Callable:
        checks = _SHARED_CHECKS.setdefault(world_size, [])
        if _key(fn) not in map(_key, checks):
            checks.append(fn)
        return fn

    return register


def _run_checks(rank: int, world_size: int, checks: list[Callable]) -> dict[str, Any]:
    return {_key(fn): fn(rank, world_size) for fn in checks}


def run_shared(fn: Callable, world_size: int, timeout: float = 300) -> list[Any]:
    """``[fn(rank, world_size) for rank in range(world_size)]`` from the shared group (see the module docstring)."""
    key = _key(fn)
    checks = _SHARED_CHECKS.get(world_size, [])
    if key not in map(_key, checks):
        raise ValueError(f"{key} is not registered with @shared_check({world_size})")
    done = _SHARED_RESULTS.get(world_size)
    if done is None or (isinstance(done, dict) and key not in done):
        try:
            per_rank = run_distributed(_run_checks, world_size, (checks,), timeout)
            done = {k: [r[k] for r in per_rank] for k in per_rank[0]}
        except RuntimeError as e:
            done = str(e)
        _SHARED_RESULTS[world_size] = done
    if isinstance(done, str):
        raise RuntimeError(f"the shared {world_size}-process group failed before {key} finished:\n{done}")
    return done[key]


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 300) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own gloo process."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    saved = os.environ.get("PYTHONHASHSEED")
    try:
        for rank, p in enumerate(procs):
            os.environ["PYTHONHASHSEED"] = str(rank)  # read by the spawned interpreter at start-up
            p.start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = saved
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world_size):
        rank, ok, out = queue.get()
        if ok:
            results[rank] = pickle.loads(out)
        else:
            errors.append(f"rank {rank}:\n{out}")
    for p in procs:
        p.join(timeout)
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
