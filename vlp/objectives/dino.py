"""DINO (Caron et al., 2021) as an objective: config section ``ssl.dino`` and multi-crop views.

The method (centred, sharpened EMA teacher; weight-normalised head) is vlp/ssl/dino.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vlp.config import ConfigError
from vlp.objectives.registry import section
from vlp.objectives.ssl_options import check_momentum, check_positive, register_ssl_objective

log = logging.getLogger(__name__)


@dataclass
class DINOConfig:
    """DINO (Caron et al., 2021): self-distillation with a centred, sharpened EMA teacher and multi-crop."""

    out_dim: int = 65536
    """Prototypes K of the head's weight-normalised last layer."""
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    batch_norm: bool = False
    norm_last_layer: bool = True
    """Fix the last layer's weight-norm scale to 1 (more stable; the reference default)."""
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    """Teacher temperature after warmup (e.g. 0.07 with warmup_teacher_temp 0.04 for longer runs)."""
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    """Linear warmup of the teacher temperature from warmup_teacher_temp to teacher_temp over these steps."""
    center_momentum: float = 0.9
    momentum: float = 0.996
    """Teacher EMA at the start; raised to 1 on a half-cosine."""
    local_crops: int = 8
    """Local crops per image beside the 2 global ones."""
    freeze_last_layer_epochs: float = 1.0
    """Keep the last layer fixed for this many epochs (epoch = samples per epoch / global batch, in steps)."""

    def __post_init__(self) -> None:
        check_positive(
            "ssl.dino",
            out_dim=self.out_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            num_layers=self.num_layers,
            student_temp=self.student_temp,
            teacher_temp=self.teacher_temp,
            warmup_teacher_temp=self.warmup_teacher_temp,
        )
        check_momentum("ssl.dino.momentum", self.momentum)
        check_momentum("ssl.dino.center_momentum", self.center_momentum)
        if self.local_crops < 0 or self.warmup_teacher_temp_steps < 0 or self.freeze_last_layer_epochs < 0:
            raise ConfigError(
                "ssl.dino.local_crops, warmup_teacher_temp_steps and freeze_last_layer_epochs must be "
                f">= 0, got {self.local_crops}, {self.warmup_teacher_temp_steps}, "
                f"{self.freeze_last_layer_epochs}"
            )


def method(cfg: Any, visual: Any, preset: Any):
    """DINO from ``ssl.dino`` with multi-crop views (global area default 0.4-1, local 0.05-0.4).

    The last layer stays frozen for ``freeze_last_layer_epochs`` epochs, an epoch being the steps that consume
    data.train_num_samples (or the synthetic set) at the global batch size.
    """
    from data_pipelines.ssl_views import default_local_size, multicrop_views
    from vlp.distributed import world_info
    from vlp.ssl.backbone import patch_size
    from vlp.ssl.base import preset_norm, scale_or
    from vlp.ssl.dino import DINO
    from vlp.ssl.schedules import epoch_num_samples, steps_per_epoch

    dcfg, vcfg = section(cfg, "ssl.dino"), section(cfg, "ssl.views")
    mean, std = preset_norm(preset)
    local_size = vcfg.local_crop_size or default_local_size(preset.image_size, patch_size(visual))
    views = multicrop_views(
        preset.image_size,
        local_size,
        dcfg.local_crops,
        scale_or(vcfg.crop_scale, (0.4, 1.0)),
        scale_or(vcfg.local_crop_scale, (0.05, 0.4)),
        mean,
        std,
    )
    freeze = 0
    if dcfg.freeze_last_layer_epochs > 0:
        global_batch = cfg.train.batch_size * world_info().world_size
        epoch = steps_per_epoch(epoch_num_samples(cfg), global_batch)
        freeze = int(round(dcfg.freeze_last_layer_epochs * epoch))
        log.info(
            "DINO: last layer frozen for the first %d steps (%.3g epochs of %d steps)",
            freeze,
            dcfg.freeze_last_layer_epochs,
            epoch,
        )
    return DINO(visual, views, dcfg, freeze_last_layer_steps=freeze)


register_ssl_objective(
    "dino", DINOConfig, method, "DINO: self-distillation from a centred, sharpened EMA teacher over multi-crop views."
)
