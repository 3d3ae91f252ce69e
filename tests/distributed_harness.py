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

The processes are forked from one pre-imported interpreter per rank (tests/zygote.py), started with that rank's
``PYTHONHASHSEED`` the first time the rank is needed: each group gets new processes, without paying seconds of
imports for every one. ``VLP_TEST_SPAWN=1`` starts every process with multiprocessing's spawn instead.

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

import atexit
import contextlib
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, world_size: int, port: int, store: str, fn: Callable, args: tuple, report: Callable) -> None:
    """Join the gloo group as ``rank``, run ``fn`` and hand ``(True, pickled result)`` or ``(False, traceback)`` to
    ``report`` before leaving the group.

    The ranks meet through a file store at ``store``, a path of this call's own: a TCP store on a port found free
    beforehand can be taken by another test's group in between (pytest-xdist runs several at once), and two groups on
    one store exchange each other's addresses. ``MASTER_ADDR``/``MASTER_PORT`` are still set for code that reads
    them."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        # Plain pickle copies tensor data; a queue's own pickler would share storage through file descriptors
        # that die with this process, racing the parent's unpickling.
        outcome = (True, pickle.dumps(fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        outcome = (False, traceback.format_exc())
    try:
        report(outcome)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker(rank: int, world_size: int, port: int, store: str, fn: Callable, args: tuple, queue) -> None:
    """A spawned rank (``VLP_TEST_SPAWN=1``): reports through ``queue``."""
    _run_rank(rank, world_size, port, store, fn, args, lambda outcome: queue.put((rank, *outcome)))


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


ROOT = Path(__file__).resolve().parents[1]
# what the first two ranks' interpreters import once (every multi-process test needs the first two); further ranks
# serve only the 3- and 4-process checks of the losses and the harness
_PRELOAD_FIRST = ("torch", "torch.distributed", "numpy", "deepspeed", "vlp.train.trainer", "tests.distributed_harness")
_PRELOAD_OTHER = ("torch", "torch.distributed", "tests.distributed_harness")


class _Zygote:
    """One ``python -m tests.zygote`` process (see its docstring) and its line-based report channel."""

    def __init__(self, rank: int) -> None:
        modules = _PRELOAD_FIRST if rank < 2 else _PRELOAD_OTHER
        env = {**os.environ, "PYTHONHASHSEED": str(rank)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", *modules],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            bufsize=0,
        )
        self.buffer = b""
        self.started = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def line(self, deadline: float) -> str | None:
        """The next report line, or None at the deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the forking interpreter exited (code {self.proc.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def expect(self, word: str, deadline: float) -> int | None:
        line = self.line(deadline)
        if line is None:
            return None
        got, _, value = line.partition(" ")
        if got != word:
            raise RuntimeError(f"forking interpreter said {line!r}, expected {word!r}")
        return int(value) if value else 0

    def request(self, payload: dict, deadline: float) -> None:
        if not self.started:
            if self.expect("ready", deadline) is None:
                raise RuntimeError("the forking interpreter did not start in time")
            self.started = True
        data = pickle.dumps(payload)
        self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except Exception:  # noqa: BLE001 - at exit, make sure it is gone
            self.proc.kill()


_ZYGOTES: dict[int, _Zygote] = {}


@atexit.register
def _close_zygotes() -> None:
    for z in _ZYGOTES.values():
        z.close()
    _ZYGOTES.clear()


def _zygote(rank: int) -> _Zygote:
    z = _ZYGOTES.get(rank)
    if z is None or not z.alive():
        z = _ZYGOTES[rank] = _Zygote(rank)
    return z


def _write_atomically(path: str, outcome: tuple) -> None:
    with open(f"{path}.tmp", "wb") as f:
        pickle.dump(outcome, f)
    os.replace(f"{path}.tmp", path)


def _forked_worker(rank: int, world_size: int, port: int, store: str, call: bytes, result: str) -> None:
    """A rank forked by tests/zygote.py: reports to the file ``result``."""
    fn, args = pickle.loads(call)
    _run_rank(rank, world_size, port, store, fn, args, lambda outcome: _write_atomically(result, outcome))


def _run_forked(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float) -> list[Any]:
    zygotes = [_zygote(r) for r in range(world_size)]
    starting = not all(z.started for z in zygotes)
    deadline = time.monotonic() + timeout + (120 if starting else 0)  # + the interpreters' first start
    port = free_port()
    call = pickle.dumps((fn, args))
    pids: list[int | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"rank{r}.pkl" for r in range(world_size)]
        finished = False
        try:
            for rank, z in enumerate(zygotes):
                kwargs = dict(rank=rank, world_size=world_size, port=port, store=str(Path(tmp) / "store"))
                kwargs.update(call=call, result=str(paths[rank]))
                payload = dict(
                    env=dict(os.environ),
                    cwd=os.getcwd(),
                    sys_path=list(sys.path),
                    target=("tests.distributed_harness", "_forked_worker"),
                    kwargs=kwargs,
                )
                z.request(payload, deadline)
                pids.append(z.expect("pid", deadline))
            codes = [z.expect("exit", deadline) for z in zygotes]
            finished = None not in codes
        finally:
            if not finished:  # timed out or interrupted: kill the group and its servers
                for pid in pids:
                    if pid:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                for rank in range(world_size):
                    z = _ZYGOTES.pop(rank, None)
                    if z is not None:
                        z.proc.kill()
        if not finished:
            raise RuntimeError(f"distributed workers did not finish within {timeout:.0f} s (killed)")
        results: dict[int, Any] = {}
        errors = []
        for rank, (path, code) in enumerate(zip(paths, codes)):
            if not path.exists():
                errors.append(f"rank {rank}: exited with code {code} before reporting (its output is above)")
                continue
            ok, out = pickle.loads(path.read_bytes())
            if ok:
                results[rank] = pickle.loads(out)
            else:
                errors.append(f"rank {rank}:\n{out}")
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 300) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own gloo process."""
    if hasattr(os, "fork") and os.environ.get("VLP_TEST_SPAWN") != "1":
        return _run_forked(fn, world_size, args, timeout)
    with tempfile.TemporaryDirectory() as tmp:
        return _run_spawned(fn, world_size, args, timeout, str(Path(tmp) / "store"))


def _run_spawned(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float, store: str) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, store, fn, args, queue)) for r in range(world_size)]
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
