"""Small helpers several test modules share."""

from __future__ import annotations


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state so that the next Accelerator may use another backend."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def losses_after_last_resume(run) -> dict[int, float]:
    """Per-step losses of a run's metrics.jsonl as its last incarnation left them (a resume replaces the steps a
    crashed run had logged after the checkpoint it resumed from)."""
    import json
    from pathlib import Path

    out: dict[int, float] = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "resumed_from_step" in r:
            out = {s: v for s, v in out.items() if s <= r["resumed_from_step"]}
        elif "loss" in r:
            out[r["step"]] = r["loss"]
    return out
