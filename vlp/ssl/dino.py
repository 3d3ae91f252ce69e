"""DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels: the student (backbone + :class:`~vlp.ssl.heads.DINOHead`) sees 2 global and
N local crops, the teacher (an EMA of the student, 0.996 raised to 1 on a half-cosine) sees only the 2 global
crops. Teacher outputs are centred (a running mean of teacher outputs, momentum 0.9, all-reduced across ranks)
and sharpened (temperature 0.04, optionally warmed up linearly from ``warmup_teacher_temp``); the loss is the
cross-entropy between the teacher's distribution for one global crop and the student's (temperature 0.1) for
every other crop, averaged over the pairs. The head's last layer is frozen for the first epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_pipelines.ssl_views import MultiView
from vlp.distributed import world_info
from vlp.ssl.backbone import backbone_dim, multi_view_features
from vlp.ssl.base import SSLMethod, collapse_statistic
from vlp.ssl.ema import EMATeacher
from vlp.ssl.heads import DINOHead
from vlp.ssl.schedules import cosine_increase, linear_warmup

log = logging.getLogger(__name__)


class DINOLoss(nn.Module):
    """DINO's cross-entropy between centred/sharpened teacher and student distributions, plus the centre update."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        num_crops: int,
        teacher_temp: float,
        update_center: bool = True,
    ) -> torch.Tensor:
        """``student_out``: (num_crops * B, K), crops in order, the 2 global ones first; ``teacher_out``: (2B, K)."""
        student = (student_out.float() / self.student_temp).chunk(num_crops)
        teacher = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total = student_out.new_zeros((), dtype=torch.float32)
        terms = 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        if update_center:
            self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """``center <- m * center + (1 - m) * mean of teacher outputs over the global batch``."""
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        world = world_info().world_size
        if world > 1:
            dist.all_reduce(batch_center)
        batch_center = batch_center / (teacher_out.shape[0] * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class DINO(SSLMethod):
    """DINO on the image tower's backbone features, with multi-crop and an EMA teacher."""

    name = "dino"

    def __init__(self, visual: nn.Module, views: MultiView, cfg: Any, freeze_last_layer_steps: int = 0) -> None:
        super().__init__(visual, views)
        self.cfg = cfg
        self.head = DINOHead(
            backbone_dim(visual),
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.num_layers,
            cfg.batch_norm,
            cfg.norm_last_layer,
        )
        self.teacher = EMATeacher({"backbone": visual, "head": self.head})
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.head.freeze_last_layer = freeze_last_layer_steps > 0
        self.momentum = cfg.momentum

    def teacher_temp(self, index: int) -> float:
        return linear_warmup(
            self.cfg.warmup_teacher_temp, self.cfg.teacher_temp, index, self.cfg.warmup_teacher_temp_steps
        )

    def compute(self, views: Sequence[torch.Tensor], visual: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        index = int(self.step)
        self.head.freeze_last_layer = index < self.freeze_last_layer_steps
        student_feats = multi_view_features(visual, views)
        student_out = self.head(torch.cat(student_feats, dim=0))
        with torch.no_grad():
            teacher_feats = torch.cat(multi_view_features(self.teacher["backbone"], views[:2]), dim=0)
            teacher_out = self.teacher["head"](teacher_feats)
        temp = self.teacher_temp(index)
        loss = self.loss_fn(student_out, teacher_out, len(views), temp, update_center=self.training)
        return loss, {
            "loss/dino": loss.detach(),
            "ssl/dino/teacher_temp": temp,
            "ssl/dino/momentum": self.momentum,
            "ssl/dino/last_layer_frozen": float(self.head.freeze_last_layer),
            "ssl/dino/z_std": collapse_statistic(student_feats[0]),
        }

    def update_teacher(self, index: int, total_steps: int) -> None:
        self.momentum = cosine_increase(self.cfg.momentum, 1.0, index, total_steps)
        self.teacher.update({"backbone": self.student_visual, "head": self.head}, self.momentum)
