"""Process launching fixes: make `accelerate launch --num_processes N` start N processes on a CPU-only machine.

Without a GPU (and without DeepSpeed or an MPI hostfile), accelerate's "simple launcher" starts a single
process even when ``--num_processes 2`` is given. We detect that case (the simple launcher sets MASTER_PORT but
no WORLD_SIZE) and re-execute the script under torch.distributed.run with N gloo processes.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def _flag_value(cmdline: list[str], names: tuple[str, ...]) -> str | None:
    for i, tok in enumerate(cmdline):
        for name in names:
            if tok == name and i + 1 < len(cmdline):
                return cmdline[i + 1]
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
    return None


def requested_cpu_processes() -> int | None:
    """N when this process was started by accelerate's simple launcher with ``--num_processes N > 1`` on CPU."""
    if "WORLD_SIZE" in os.environ or "MASTER_PORT" not in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None
    try:
        import psutil

        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:  # noqa: BLE001 - no parent information: nothing to fix
        return None
    if not any(os.path.basename(t) == "accelerate" or t.endswith("accelerate_cli.py") for t in parent[:3]):
        return None
    value = _flag_value(parent, ("--num_processes", "--num-processes"))
    try:
        n = int(value) if value is not None else 1
    except ValueError:
        return None
    import torch

    return n if n > 1 and not torch.cuda.is_available() else None


def relaunch_on_cpu_if_requested(script: str, argv: list[str]) -> None:
    """Replace this process with ``torch.distributed.run --nproc_per_node N script argv`` when needed."""
    n = requested_cpu_processes()
    if n is None:
        return
    print(
        f"accelerate started 1 process on this CPU-only machine; starting {n} gloo processes with "
        "torch.distributed.run",
        file=sys.stderr,
    )
    os.environ.pop("MASTER_PORT", None)
    os.environ.pop("MASTER_ADDR", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
