"""A pre-imported Python process that forks one fresh worker per request (used by tests/distributed_harness.py).

Starting a Python process that imports torch, DeepSpeed, transformers and vlp costs seconds on 2 cores, and the
multi-process tests start two or more such processes per group. ``python -m tests.zygote MODULE...`` imports the
named modules once and then serves requests on stdin: each request (an 8-byte little-endian length, then a pickled
dict) is run in a child forked from this clean, already-imported state, so every group still gets new processes
that share nothing with earlier groups but the imports. The child's environment, working directory and
``sys.path`` are the requester's at the time of the request. The zygote reports ``pid N`` when the child starts and
``exit CODE`` when it ends, one line each on stdout; anything printed, by the zygote or a child, goes to stderr.

The request's ``target`` names a module-level function ``f(**kwargs)`` (module, name) that the child calls.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import sys
import traceback


def _child(payload: bytes, report_fd: int) -> None:
    req = pickle.loads(payload)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the request channel is the zygote's
    os.close(report_fd)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    sys.path[:] = req["sys_path"]
    module, name = req["target"]
    getattr(importlib.import_module(module), name)(**req["kwargs"])


def main() -> None:
    # reports go to a copy of the original stdout; fd 1 (anything printed, here or in a child) goes to stderr
    report_fd = os.dup(1)
    os.dup2(2, 1)
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a preload is only a speed-up; the child imports what it needs
            pass
    stdin = sys.stdin.buffer
    stdout = os.fdopen(report_fd, "wb", buffering=0)
    stdout.write(b"ready\n")
    while True:
        head = stdin.read(8)
        if len(head) < 8:
            return  # the requester closed the channel
        (size,) = struct.unpack("<Q", head)
        payload = stdin.read(size)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _child(payload, report_fd)
                code = 0
            except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        stdout.write(f"pid {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        stdout.write(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    main()
