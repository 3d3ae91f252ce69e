"""MoCo: momentum contrast, v3 (Chen, Xie & He, 2021) and v2 (Chen, Fan, Girshick & He, 2020).

v3, "An Empirical Study of Training Self-Supervised Vision Transformers": queries come from the online backbone,
projector and predictor, keys from a momentum encoder (backbone + projector, EMA with m = 0.99 raised to 1 on a
half-cosine); the keys of the whole global batch are the negatives. The loss is symmetric,
``ctr(q1, k2) + ctr(q2, k1)`` with ``ctr = 2 tau * CrossEntropy(q k^T / tau)`` and tau = 0.2 (the ViT setting).
Projector: 3 layers, predictor: 2 layers, 4096 hidden, 256 out, BN everywhere (the last one non-affine), no biases.

v2, "Improved Baselines with Momentum Contrastive Learning": one direction, q from the online encoder + 2-layer
MLP head (128 out), the positive key from the momentum encoder (m = 0.999, constant), the negatives from a FIFO
queue of K = 65536 past keys; after every step the keys of the global batch are enqueued, replacing the oldest,
so K must be a multiple of the global batch; tau = 0.2. (v2's shuffled BN is not needed: the ViT backbone and
the MLP head have no batch norm.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.ssl_views import MultiView
from vlp.config import ConfigError
from vlp.distributed import all_gather_no_grad, world_info
from vlp.ssl.backbone import backbone_dim, multi_view_features
from vlp.ssl.base import SSLMethod, collapse_statistic
from vlp.ssl.ema import EMATeacher
from vlp.ssl.heads import mlp
from vlp.ssl.schedules import cosine_increase


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """``2 tau * CE(q k_all^T / tau, own index)``: this rank's normalised queries against all ranks' keys."""
    world = world_info()
    k_all = all_gather_no_grad(k)
    labels = torch.arange(q.shape[0], device=q.device) + world.rank * q.shape[0]
    return F.cross_entropy(q @ k_all.t() / temperature, labels) * (2 * temperature)


def moco_v2_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with the positive key first and the queue (D, K) as negatives; returns (loss, top-1 accuracy)."""
    l_pos = (q * k).sum(dim=-1, keepdim=True)
    l_neg = q @ queue
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    acc = (logits.detach().argmax(1) == 0).float().mean()
    return F.cross_entropy(logits, labels), acc


class KeyQueue(nn.Module):
    """MoCo v2's FIFO dictionary: K keys as columns of a (dim, K) buffer, initialised to random unit vectors.

    :meth:`enqueue` writes the gathered global batch of keys over the oldest ones; every rank holds and updates
    the same queue.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.keys.shape[1])

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` columns (``keys``: (B, dim), B dividing K)."""
        b = keys.shape[0]
        if self.size % b:
            raise ConfigError(f"MoCo v2 queue size {self.size} is not a multiple of the global batch {b}")
        p = int(self.ptr)
        self.keys[:, p : p + b] = keys.t().to(self.keys.dtype)
        self.ptr.fill_((p + b) % self.size)


class MoCoV3(SSLMethod):
    """MoCo v3: online projector + predictor, momentum encoder (backbone + projector), symmetric loss."""

    name = "moco"

    def __init__(self, visual: nn.Module, views: MultiView, cfg: Any) -> None:
        super().__init__(visual, views)
        hidden = cfg.hidden_dim or 4096
        out = cfg.resolved_out_dim
        self.temperature = cfg.temperature
        self.base_momentum = cfg.resolved_momentum
        self.cosine = cfg.resolved_momentum_cosine
        self.projector = mlp(backbone_dim(visual), hidden, out, 3, last_batch_norm=True, bias=False)
        self.predictor = mlp(out, hidden, out, 2, last_batch_norm=True, bias=False)
        self.teacher = EMATeacher({"backbone": visual, "projector": self.projector})
        self.momentum = self.base_momentum

    def compute(self, views: Sequence[torch.Tensor], visual: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        f1, f2 = multi_view_features(visual, views[:2])
        q1 = F.normalize(self.predictor(self.projector(f1)).float(), dim=-1)
        q2 = F.normalize(self.predictor(self.projector(f2)).float(), dim=-1)
        with torch.no_grad():
            t1, t2 = multi_view_features(self.teacher["backbone"], views[:2])
            k1 = F.normalize(self.teacher["projector"](t1).float(), dim=-1)
            k2 = F.normalize(self.teacher["projector"](t2).float(), dim=-1)
        loss = moco_v3_loss(q1, k2, self.temperature) + moco_v3_loss(q2, k1, self.temperature)
        return loss, {
            "loss/moco": loss.detach(),
            "ssl/moco/momentum": self.momentum,
            "ssl/moco/z_std": collapse_statistic(f1),
        }

    def update_teacher(self, index: int, total_steps: int) -> None:
        m = cosine_increase(self.base_momentum, 1.0, index, total_steps) if self.cosine else self.base_momentum
        self.momentum = m
        self.teacher.update({"backbone": self.student_visual, "projector": self.projector}, m)


class MoCoV2(SSLMethod):
    """MoCo v2: MLP head, momentum key encoder, FIFO queue of negatives."""

    name = "moco"

    def __init__(self, visual: nn.Module, views: MultiView, cfg: Any, global_batch: int | None = None) -> None:
        super().__init__(visual, views)
        if global_batch is not None and cfg.queue_size % global_batch:
            lower = cfg.queue_size // global_batch * global_batch
            raise ConfigError(
                f"ssl.moco.queue_size {cfg.queue_size} is not a multiple of the global batch {global_batch} "
                f"(train.batch_size x processes); use e.g. {lower or global_batch} or {lower + global_batch}"
            )
        width = backbone_dim(visual)
        self.temperature = cfg.temperature
        self.base_momentum = cfg.resolved_momentum
        self.cosine = cfg.resolved_momentum_cosine
        self.head = mlp(width, cfg.hidden_dim or width, cfg.resolved_out_dim, 2, batch_norm=False)
        self.teacher = EMATeacher({"backbone": visual, "head": self.head})
        self.queue = KeyQueue(cfg.resolved_out_dim, cfg.queue_size)
        self.momentum = self.base_momentum

    def compute(self, views: Sequence[torch.Tensor], visual: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        (f_q,) = multi_view_features(visual, views[:1])
        q = F.normalize(self.head(f_q).float(), dim=-1)
        with torch.no_grad():
            (f_k,) = multi_view_features(self.teacher["backbone"], views[1:2])
            k = F.normalize(self.teacher["head"](f_k).float(), dim=-1)
        loss, acc = moco_v2_loss(q, k, self.queue.keys.clone().detach().float(), self.temperature)
        if self.training:
            self.queue.enqueue(all_gather_no_grad(k))
        return loss, {
            "loss/moco": loss.detach(),
            "ssl/moco/acc": acc,
            "ssl/moco/momentum": self.momentum,
            "ssl/moco/z_std": collapse_statistic(f_q),
        }

    def update_teacher(self, index: int, total_steps: int) -> None:
        m = cosine_increase(self.base_momentum, 1.0, index, total_steps) if self.cosine else self.base_momentum
        self.momentum = m
        self.teacher.update({"backbone": self.student_visual, "head": self.head}, m)
