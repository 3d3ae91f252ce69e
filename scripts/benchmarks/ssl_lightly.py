"""The lightly (1.6) arm of scripts/benchmarks/ssl_reference.py: SimCLR, MoCo v2/v3, BYOL and DINO written the way
lightly's own examples write them, on a backbone handed in by the caller.

Each method uses lightly's heads (``lightly.models.modules``), losses (``lightly.loss``), momentum utilities
(``lightly.models.utils.update_momentum`` / ``deactivate_requires_grad``), its cosine schedule
(``lightly.utils.scheduler.cosine_schedule``) and, for MoCo v2, the memory bank inside ``NTXentLoss``. Sizes,
temperatures and momenta are read from vlp's config sections of the same run, so both arms have the same dimensions
and schedules; only the library differs. lightly is not a core dependency (``pip install -e .[benchmark]``).

Interface of an arm: ``loss(views, index) -> (loss, features of the first view)``; ``trainable`` (a module holding
every trained parameter, the backbone included); ``before_optimizer_step(index)`` and ``after_step(index, total)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    DINOProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn


def _frozen(module: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(module)
    deactivate_requires_grad(teacher)
    return teacher


class LightlyArm(nn.Module):
    """Base: a backbone (pooled features) and the method's heads; subclasses write lightly's training step."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.momentum = float("nan")

    @property
    def trainable(self) -> nn.Module:
        return self

    def before_optimizer_step(self, index: int) -> None:
        pass

    def after_step(self, index: int, total: int) -> None:
        pass


class SimCLRArm(LightlyArm):
    def __init__(self, backbone: nn.Module, dim: int, cfg: Any) -> None:
        super().__init__(backbone)
        self.head = SimCLRProjectionHead(dim, cfg.hidden_dim, cfg.out_dim, cfg.num_layers, cfg.batch_norm)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def loss(self, views: Sequence[torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        f0, f1 = self.backbone(views[0]), self.backbone(views[1])
        return self.criterion(self.head(f0), self.head(f1)), f0


class _MomentumArm(LightlyArm):
    """Online modules and their EMA copies (updated by lightly's update_momentum after every optimiser step)."""

    ema_names: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, base_momentum: float, cosine: bool) -> None:
        super().__init__(backbone)
        self.base_momentum, self.cosine = base_momentum, cosine

    def make_teacher(self, **fresh: nn.Module) -> None:
        """EMA copies of :attr:`ema_names`; ``fresh`` modules (built anew, as lightly's DINO example builds its
        teacher head: a weight-normalised layer cannot be deep-copied) take the student's weights."""
        copies = {}
        for n in self.ema_names:
            if n in fresh:
                fresh[n].load_state_dict(getattr(self, n).state_dict())
                deactivate_requires_grad(fresh[n])
                copies[n] = fresh[n]
            else:
                copies[n] = _frozen(getattr(self, n))
        self.teacher = nn.ModuleDict(copies)

    @property
    def trainable(self) -> nn.Module:
        return nn.ModuleList([getattr(self, n) for n in self._modules if n != "teacher"])

    def after_step(self, index: int, total: int) -> None:
        m = cosine_schedule(index, total, self.base_momentum, 1.0) if self.cosine else self.base_momentum
        self.momentum = float(m)
        for n in self.ema_names:
            update_momentum(getattr(self, n), self.teacher[n], m=self.momentum)


class MoCoV3Arm(_MomentumArm):
    ema_names = ("backbone", "projector")

    def __init__(self, backbone: nn.Module, dim: int, cfg: Any) -> None:
        super().__init__(backbone, cfg.resolved_momentum, cfg.resolved_momentum_cosine)
        hidden, out = cfg.hidden_dim or 4096, cfg.resolved_out_dim
        self.projector = MoCoProjectionHead(dim, hidden, out, num_layers=3, batch_norm=True)
        self.predictor = MoCoProjectionHead(out, hidden, out, num_layers=2, batch_norm=True)
        self.criterion = NTXentLoss(temperature=cfg.temperature)
        self.scale = 2 * cfg.temperature  # MoCo v3's ctr() = 2 tau * cross-entropy
        self.make_teacher()

    def loss(self, views: Sequence[torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        f0, f1 = self.backbone(views[0]), self.backbone(views[1])
        q0, q1 = self.predictor(self.projector(f0)), self.predictor(self.projector(f1))
        with torch.no_grad():
            k0 = self.teacher["projector"](self.teacher["backbone"](views[0]))
            k1 = self.teacher["projector"](self.teacher["backbone"](views[1]))
        return self.scale * (self.criterion(q0, k1) + self.criterion(q1, k0)), f0


class MoCoV2Arm(_MomentumArm):
    ema_names = ("backbone", "head")

    def __init__(self, backbone: nn.Module, dim: int, cfg: Any) -> None:
        super().__init__(backbone, cfg.resolved_momentum, cfg.resolved_momentum_cosine)
        out = cfg.resolved_out_dim
        self.head = MoCoProjectionHead(dim, cfg.hidden_dim or dim, out, num_layers=2, batch_norm=False)
        self.criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.queue_size, out))
        self.make_teacher()

    def loss(self, views: Sequence[torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        f0 = self.backbone(views[0])
        query = self.head(f0)
        with torch.no_grad():
            key = self.teacher["head"](self.teacher["backbone"](views[1]))
        return self.criterion(query, key), f0


class BYOLArm(_MomentumArm):
    ema_names = ("backbone", "projector")

    def __init__(self, backbone: nn.Module, dim: int, cfg: Any) -> None:
        super().__init__(backbone, cfg.momentum, True)
        self.projector = BYOLProjectionHead(dim, cfg.hidden_dim, cfg.out_dim)
        self.predictor = BYOLPredictionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.criterion = NegativeCosineSimilarity()
        self.make_teacher()

    def loss(self, views: Sequence[torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        f0, f1 = self.backbone(views[0]), self.backbone(views[1])
        p0, p1 = self.predictor(self.projector(f0)), self.predictor(self.projector(f1))
        with torch.no_grad():
            z0 = self.teacher["projector"](self.teacher["backbone"](views[0]))
            z1 = self.teacher["projector"](self.teacher["backbone"](views[1]))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0)), f0


class DINOArm(_MomentumArm):
    ema_names = ("backbone", "head")

    def __init__(self, backbone: nn.Module, dim: int, cfg: Any, freeze_last_layer_steps: int) -> None:
        super().__init__(backbone, cfg.momentum, True)
        if cfg.num_layers != 3:
            raise ValueError(f"lightly's DINOProjectionHead has 3 layers, got ssl.dino.num_layers {cfg.num_layers}")

        def head(freeze: int) -> DINOProjectionHead:
            return DINOProjectionHead(
                dim,
                cfg.hidden_dim,
                cfg.bottleneck_dim,
                cfg.out_dim,
                batch_norm=cfg.batch_norm,
                freeze_last_layer=freeze,
                norm_last_layer=cfg.norm_last_layer,
            )

        self.head = head(freeze_last_layer_steps)
        self.criterion = DINOLoss(
            output_dim=cfg.out_dim,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_steps,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )
        self.make_teacher(head=head(-1))

    def loss(self, views: Sequence[torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [self.backbone(v) for v in views]
        student_out = [self.head(f) for f in feats]
        with torch.no_grad():
            teacher_out = [self.teacher["head"](self.teacher["backbone"](v)) for v in views[:2]]
        return self.criterion(teacher_out, student_out, epoch=index), feats[0]

    def before_optimizer_step(self, index: int) -> None:
        self.head.cancel_last_layer_gradients(current_epoch=index)


def build_arm(name: str, backbone: nn.Module, dim: int, cfg: Any, vlp_method: Any) -> LightlyArm:
    """lightly's ``name`` (simclr, moco-v3, moco-v2, byol, dino) on ``backbone``, sized by ``cfg``'s sections."""
    ssl = cfg.ssl
    if name == "simclr":
        return SimCLRArm(backbone, dim, ssl.simclr)
    if name == "moco-v3":
        return MoCoV3Arm(backbone, dim, ssl.moco)
    if name == "moco-v2":
        return MoCoV2Arm(backbone, dim, ssl.moco)
    if name == "byol":
        return BYOLArm(backbone, dim, ssl.byol)
    if name == "dino":
        return DINOArm(backbone, dim, ssl.dino, vlp_method.freeze_last_layer_steps)
    raise ValueError(f"unknown method {name!r}; valid: simclr, moco-v3, moco-v2, byol, dino")
