"""The training precision a run asks for, resolved for the machine it runs on (one rule for every objective)."""

from __future__ import annotations

from typing import Any

from vlp.config import ConfigError


def resolve_precision(precision: str) -> tuple[str, Any]:
    """(accelerate's mixed_precision value, the matching torch dtype) for ``train.precision``: ``auto`` is bf16 on a
    GPU and fp32 ('no') on a CPU; bf16 and fp16 need a GPU."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on CPU")
    mp = {"fp32": "no"}.get(precision, precision)
    return mp, {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]
