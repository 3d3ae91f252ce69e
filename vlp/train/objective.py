"""Training objectives: what turns a batch into a loss. One objective per file, registered by name.

An objective is an ``nn.Module`` that owns every trainable module it uses (the dual tower, heads, teachers), so
that accelerate/DeepSpeed wrap all of them, and that knows how to turn a decoded sample into tensors. The loop
only calls ``sample_transform`` (through the data pipeline), ``forward`` and ``after_step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Objective(nn.Module):
    """Base class: ``forward(batch) -> (loss, logs)``; logs are floats or 0-d tensors for the metrics file.

    Objectives whose loss is a function of per-sample embeddings (the contrastive one) also implement
    :meth:`embed` and :meth:`loss_from_embeddings`, set ``supports_gradcache`` and accept
    ``forward(batch, mode="embed")``: that is what exact large-batch accumulation (vlp.train.gradcache) needs.
    """

    #: whether samples must carry a caption (False lets image-only shards through)
    requires_text: bool = True

    @property
    def supports_gradcache(self) -> bool:
        """Whether the loss splits into :meth:`embed` (per micro-batch) and :meth:`loss_from_embeddings`."""
        return False

    def embed(self, batch: dict[str, Any], reuse: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Embeddings of one (micro-)batch: per-sample rows, plus the :attr:`shared_keys` (e.g. the logit scale).

        ``reuse`` holds embeddings computed earlier for this batch whose producers are frozen
        (:meth:`frozen_outputs`); they are returned as given instead of being recomputed.
        """
        raise NotImplementedError(f"{type(self).__name__} has no separable embeddings")

    def loss_from_embeddings(self, emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of a whole (accumulated) batch from its concatenated :meth:`embed` outputs."""
        raise NotImplementedError(f"{type(self).__name__} has no separable embeddings")

    #: entries of :meth:`embed` that are not per-sample (identical for every micro-batch), in a fixed order: the
    #: backward pass visits them in this order, and every rank must visit them alike (ZeRO-2 reduces gradients in
    #: the order their hooks fire, so two ranks iterating a set in different hash-seeded orders would swap them)
    shared_keys: tuple[str, ...] = ()

    def frozen_outputs(self) -> tuple[str, ...]:
        """Entries of :meth:`embed` that need no gradient because everything producing them is frozen (in a fixed
        order, like :attr:`shared_keys`)."""
        return ()

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Decoded sample {"image": PIL RGB, "text": str | None, "json": dict | None} -> tensors for one sample."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (EMA teachers, momentum/temperature schedules)."""


# name -> factory(cfg: PretrainConfig, model: DualTower, preset: ModelPreset) -> Objective
OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str):
    """Decorator adding a factory to :data:`OBJECTIVES`."""
    def deco(fn):
        OBJECTIVES[name] = fn
        return fn
    return deco


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample tensors by key; lists of tensors (multi-view crops) become lists of stacked tensors."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor):
            out[key] = [torch.stack([v[i] for v in values]) for i in range(len(first))]
        else:
            out[key] = values
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor (and list of tensors) of a batch to ``device``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out
