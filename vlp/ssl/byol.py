"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent").

The online network (backbone, projector, predictor) predicts the target network's projection of the other view;
the target is an EMA of the online backbone + projector (tau = 0.996 raised to 1 on a half-cosine). The loss is
``2 - 2 cos(p, z')`` per direction, symmetrised by summing both directions, averaged over the batch. Projector and
predictor: 2-layer MLPs, 4096 hidden, 256 out, batch norm (over the global batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.ssl_views import MultiView
from vlp.ssl.backbone import backbone_dim, multi_view_features
from vlp.ssl.base import SSLMethod, collapse_statistic
from vlp.ssl.ema import EMATeacher
from vlp.ssl.heads import mlp
from vlp.ssl.schedules import cosine_increase


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 - 2 <p, z> / (|p| |z|)`` (z is a target: no gradient flows into it)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOL(SSLMethod):
    """BYOL on the image tower's backbone features."""

    name = "byol"

    def __init__(self, visual: nn.Module, views: MultiView, cfg: Any) -> None:
        super().__init__(visual, views)
        self.base_momentum = cfg.momentum
        self.projector = mlp(backbone_dim(visual), cfg.hidden_dim, cfg.out_dim, 2)
        self.predictor = mlp(cfg.out_dim, cfg.hidden_dim, cfg.out_dim, 2)
        self.teacher = EMATeacher({"backbone": visual, "projector": self.projector})
        self.momentum = self.base_momentum

    def compute(self, views: Sequence[torch.Tensor], visual: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        f1, f2 = multi_view_features(visual, views[:2])
        p1 = self.predictor(self.projector(f1)).float()
        p2 = self.predictor(self.projector(f2)).float()
        with torch.no_grad():
            t1, t2 = multi_view_features(self.teacher["backbone"], views[:2])
            z1, z2 = self.teacher["projector"](t1).float(), self.teacher["projector"](t2).float()
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return loss, {
            "loss/byol": loss.detach(),
            "ssl/byol/momentum": self.momentum,
            "ssl/byol/z_std": collapse_statistic(f1),
        }

    def update_teacher(self, index: int, total_steps: int) -> None:
        self.momentum = cosine_increase(self.base_momentum, 1.0, index, total_steps)
        self.teacher.update({"backbone": self.student_visual, "projector": self.projector}, self.momentum)
