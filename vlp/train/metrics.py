"""Metrics to a JSONL file (one JSON object per line) and accelerate's trackers (tensorboard, ...), main process."""

from __future__ import annotations

import json
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlp.config import ConfigError


class MetricsWriter:
    """Writes each record to ``metrics.jsonl`` in the run directory and its numbers to accelerate's trackers.

    ``report_to`` names the trackers (accelerate.tracking: tensorboard, wandb, mlflow, comet_ml, aim, clearml,
    dvclive, ...; comma-separated for several, "none" for only the JSONL file). tensorboard, the default, is offline
    and writes ``<out_dir>/tensorboard/``. Used on the main process only (``enabled=False`` elsewhere).
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        report_to: str | Sequence[str] = "tensorboard",
        project: str = "vlp",
    ) -> None:
        self.enabled = enabled
        self._jsonl = None
        self.trackers: list[Any] = []
        names = tracker_names(report_to) if tensorboard else [n for n in tracker_names(report_to) if n != "tensorboard"]
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.trackers = [start_tracker(name, out, project) for name in names]

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One record: a step's metrics or an evaluation's (nothing is written for no values)."""
        if not self.enabled or not values:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            for tracker in self.trackers:
                tracker.log(scalars, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def tracker_names(report_to: str | Sequence[str]) -> list[str]:
    """The tracker names in ``report_to`` ("tensorboard", "wandb,mlflow", "none"); an unknown one is a ConfigError
    listing accelerate's trackers."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    items = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [n.strip() for n in items if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"unknown tracker {name!r} in --report-to; valid: none, "
                f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (comma-separated for several)"
            )
    return list(dict.fromkeys(names))


def start_tracker(name: str, out_dir: Path, project: str) -> Any:
    """An accelerate tracker, started: tensorboard (and others that keep files) under ``out_dir``; a tracker
    whose package is not installed is a ConfigError saying what to install."""
    from accelerate.state import PartialState
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    if not PartialState._shared_state:  # accelerate's trackers log through its logger, which needs the state
        PartialState()
    installed = sorted(str(t) for t in get_available_trackers())
    if name not in installed:
        raise ConfigError(
            f"--report-to {name}: the {name} package is not installed (pip install {name}); "
            f"installed trackers: {', '.join(installed) or 'none'}"
        )
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":  # <run dir>/tensorboard/, as before the trackers went through accelerate
        tracker = cls("tensorboard", out_dir)
    elif cls.requires_logging_directory:
        tracker = cls(project, out_dir)
    else:
        tracker = cls(project)
    tracker.main_process_only = False  # this writer exists on the main process only
    if callable(getattr(tracker, "start", None)):  # accelerate >= 1.x starts trackers lazily (older: in __init__)
        tracker.start()
    return tracker


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory: on GPU, tensor memory allocated since the previous call (then reset) and the allocator's
    reservation; on CPU, the process's peak resident set so far (GiB)."""
    if device.type == "cuda":
        out = {
            "mem/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
        }
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
