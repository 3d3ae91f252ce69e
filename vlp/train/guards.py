"""Guard rails of the training loop: skipping non-finite steps, stopping a diverged run, fault injection.

A step whose loss or gradient is non-finite on any rank is skipped (no parameter or optimiser-state update) and
counted; ``max_consecutive`` such steps in a row stop the run with :class:`TrainingDiverged`, after the loop has
saved a checkpoint of the last good state. fp16 loss-scale overflows are skipped too (that is how dynamic loss
scaling searches its scale) and counted separately; they do not count towards the stop.

Fault injection (tests and drills only) is driven by the ``VLP_FAULTS`` environment variable, a comma-separated
list of ``KIND@STEP`` entries:

- ``sigkill@STEP``: every process SIGKILLs itself right after the optimiser update of step STEP;
- ``sigkill-checkpoint@STEP``: every process SIGKILLs itself while the checkpoint of step STEP is being written
  (after the model/optimiser shards, before the checkpoint is committed);
- ``nan-loss@STEP`` / ``nan-grad@STEP``: the loss / the gradients of step STEP become NaN.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

log = logging.getLogger(__name__)

FAULT_KINDS = ("sigkill", "sigkill-checkpoint", "nan-loss", "nan-grad")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message says where the last good state was saved."""


class NonFiniteGuard:
    """Counts skipped steps and decides when a run has diverged."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.skipped_nonfinite = 0
        self.skipped_overflow = 0
        self.consecutive = 0
        self.last_good_step = 0

    def record(self, step: int, applied: bool, reason: str | None) -> None:
        """Account for step ``step``: updated (``applied``) or skipped for ``reason``."""
        if applied:
            self.consecutive = 0
            self.last_good_step = step
        elif reason == "overflow":
            self.skipped_overflow += 1
        else:
            self.skipped_nonfinite += 1
            self.consecutive += 1
            log.warning(
                "step %d skipped: %s (%d in a row, stop at %d)",
                step,
                reason or "non-finite",
                self.consecutive,
                self.max_consecutive,
            )

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def message(self, step: int, checkpoint: str | None) -> str:
        where = (
            f"; the last good state (after step {self.last_good_step}, data position after step {step}) "
            f"is checkpointed in {checkpoint}"
            if checkpoint
            else ""
        )
        return (
            f"stopping at step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={self.max_consecutive}){where}. Lower the learning rate or check the "
            "data, then continue with --resume latest"
        )

    def metrics(self) -> dict[str, float]:
        return {
            "guard/skipped_nonfinite": float(self.skipped_nonfinite),
            "guard/skipped_overflow": float(self.skipped_overflow),
            "guard/consecutive_nonfinite": float(self.consecutive),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_overflow": self.skipped_overflow,
            "consecutive": self.consecutive,
            "last_good_step": self.last_good_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        self.skipped_overflow = int(state.get("skipped_overflow", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.last_good_step = int(state.get("last_good_step", 0))


class FaultInjector:
    """Reads ``VLP_FAULTS`` (module docstring); inert when it is unset."""

    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("VLP_FAULTS", "") if spec is None else spec
        self.faults: set[tuple[str, int]] = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, step = item.partition("@")
            if kind not in FAULT_KINDS or not step.isdigit():
                raise ValueError(f"VLP_FAULTS entry {item!r}: expected KIND@STEP with KIND in {', '.join(FAULT_KINDS)}")
            self.faults.add((kind, int(step)))
        if self.faults:
            log.warning("fault injection active: %s", ", ".join(f"{k}@{s}" for k, s in sorted(self.faults)))

    def active(self, kind: str, step: int) -> bool:
        return (kind, step) in self.faults

    def loss_factor(self, step: int) -> float:
        return float("nan") if self.active("nan-loss", step) else 1.0

    def grad_factor(self, step: int) -> float:
        return float("nan") if self.active("nan-grad", step) else 1.0

    def maybe_kill(self, kind: str, step: int) -> None:
        """SIGKILL this process when ``kind@step`` was requested (no cleanup, no flushing: a crash)."""
        if self.active(kind, step):
            log.warning("fault injection: SIGKILL (%s at step %d)", kind, step)
            os.kill(os.getpid(), signal.SIGKILL)
