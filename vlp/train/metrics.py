"""Metrics to tensorboard and to a JSONL file (one JSON object per line), main process only."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch


class MetricsWriter:
    """Writes scalars to ``metrics.jsonl`` and a tensorboard event file in the run directory."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One record: a step's metrics or an evaluation's (nothing is written for no values)."""
        if not self.enabled or not values:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory: on GPU, tensor memory allocated since the previous call (then reset) and the allocator's
    reservation; on CPU, the process's peak resident set so far (GiB)."""
    if device.type == "cuda":
        out = {"mem/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
               "mem/reserved_gb": torch.cuda.memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    return {"mem/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def proc_status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` in bytes (``VmRSS``: resident now, ``VmHWM``: its peak), or None where
    the file is not there (not Linux) or lacks the field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``) to its current size; False where the kernel does not allow
    it (then only ``ru_maxrss``, which never decreases, is left)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
