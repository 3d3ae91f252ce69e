"""Small helpers several test modules share."""

from __future__ import annotations


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state so that the next Accelerator may use another backend."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
