"""Step schedules of the SSL methods (momentum, teacher temperature) and what an "epoch" is for a stream.

Indices are 0-based iteration numbers: the update after optimiser step ``s`` (1-based, as the loop counts) uses
index ``s - 1``, and the forward pass of step ``s`` uses index ``s - 1`` too.
"""

from __future__ import annotations

import math

from vlp.config import ConfigError


def cosine_increase(base: float, final: float, index: int, total: int) -> float:
    """``final - (final - base) * (1 + cos(pi * index / total)) / 2``: base at 0, the mean at total/2, final at total.

    The EMA momentum schedule of BYOL (Grill et al., 2020, eq. 6 of the appendix), MoCo v3 and DINO
    (``cosine_scheduler(base, 1, ...)``).
    """
    if total <= 0:
        return final
    progress = min(max(index / total, 0.0), 1.0)
    return final - (final - base) * (1 + math.cos(math.pi * progress)) / 2


def linear_warmup(start: float, end: float, index: int, warmup: int) -> float:
    """DINO's teacher-temperature schedule: ``linspace(start, end, warmup)[index]``, then ``end``."""
    if index >= warmup:
        return end
    if warmup == 1:
        return start
    return start + (end - start) * index / (warmup - 1)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimiser steps that consume ``num_samples`` at ``global_batch`` samples per step (at least 1)."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    return max(1, math.ceil(num_samples / global_batch))


def epoch_num_samples(cfg) -> int:
    """Samples in one epoch of a run's training stream: data.train_num_samples, else the synthetic set's size.

    The training stream is resampled and infinite, so an epoch is defined by this count; with user shards and no
    ``--train-num-samples`` it is unknown and epoch-based settings cannot be resolved.
    """
    if cfg.data.train_num_samples:
        return int(cfg.data.train_num_samples)
    if not cfg.data.train_shards:
        return int(cfg.data.synthetic_train_samples)
    raise ConfigError(
        "an epoch-based SSL setting (ssl.dino.freeze_last_layer_epochs) needs the epoch size: pass "
        "--train-num-samples N (samples in your shards), or set --ssl.dino.freeze_last_layer_epochs 0"
    )
