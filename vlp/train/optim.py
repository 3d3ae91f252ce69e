"""AdamW parameter groups and the warmup-then-cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from vlp.config import ConfigError, OptimConfig


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm scales, the temperature/bias scalars (all 1-d or 0-d) and embeddings' positional tables."""
    return param.ndim < 2 or "logit_scale" in name or "logit_bias" in name or "positional_embedding" in name


def param_groups(model: nn.Module, weight_decay: float, lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """AdamW groups: decayed matrices, everything :func:`no_weight_decay` exempts, and one group per entry of
    ``lr_scales`` (parameter name suffix -> learning-rate multiplier, kept as the group's ``lr_scale``) holding the
    parameters whose names end with it (without weight decay when :func:`no_weight_decay` exempts them)."""
    decay, no_decay = [], []
    scaled: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = no_weight_decay(name, p)
        suffix = next((k for k in (lr_scales or {}) if name.endswith(k)), None)
        if suffix is not None:
            scaled.setdefault((suffix, exempt), []).append(p)
        else:
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for (suffix, exempt), params in scaled.items():
        scale = lr_scales[suffix]  # type: ignore[index]
        groups.append({"params": params, "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale})
    return groups


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can update these parameters (floating point, on a CPU or CUDA device)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, lr_scales: Mapping[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused where ``cfg.fused`` asks for it (None: wherever supported); a group
    with an ``lr_scale`` runs at that multiple of ``cfg.lr`` (the schedule scales every group alike)."""
    groups = param_groups(model, cfg.weight_decay, lr_scales)
    for group in groups:
        group["lr"] = cfg.resolved_lr * group.get("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    fused = fused_supported(params) if cfg.fused is None else cfg.fused
    if fused and not fused_supported(params):
        raise ConfigError(
            "optim.fused=true needs floating-point parameters on a CPU or CUDA device; "
            "use optim.fused=false (or leave it unset)"
        )
    return torch.optim.AdamW(groups, lr=cfg.resolved_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """LambdaLR applying :func:`warmup_cosine`; stepped once per optimiser step."""
    warmup = cfg.resolved_warmup_steps(total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup, max(total_steps, 1), cfg.min_lr_ratio)
    )
