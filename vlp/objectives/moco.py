"""MoCo v3 (Chen, Xie & He, 2021) and v2 (Chen et al., 2020) as an objective: config section ``ssl.moco``.

The methods (momentum encoder, InfoNCE, v2's key queue) are vlp/ssl/moco.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vlp.config import ConfigError  # noqa: F401
from vlp.objectives.registry import section
from vlp.objectives.ssl_options import check_momentum, check_positive, register_ssl_objective


@dataclass
class MoCoConfig:
    """MoCo v3 (Chen, Xie & He, 2021) or v2 (Chen et al., 2020, with a key queue); None picks the version's value."""

    version: Literal[2, 3] = 3
    temperature: float = 0.2
    """InfoNCE temperature (0.2 for both: MoCo v3's ViT setting and MoCo v2)."""
    momentum: float | None = None
    """Momentum-encoder EMA; None: 0.99 (v3, cosine to 1) or 0.999 (v2, constant)."""
    momentum_cosine: bool | None = None
    """Raise the momentum to 1 on a half-cosine over training; None: true for v3, false for v2."""
    out_dim: int | None = None
    """Embedding size; None: 256 (v3) or 128 (v2)."""
    hidden_dim: int | None = None
    """MLP hidden size; None: 4096 (v3) or the backbone width (v2)."""
    queue_size: int = 65536
    """v2 only: keys in the queue (K); must be a multiple of the global batch."""

    def __post_init__(self) -> None:
        check_positive("ssl.moco", temperature=self.temperature, queue_size=self.queue_size)
        check_momentum("ssl.moco.momentum", self.momentum)

    @property
    def resolved_momentum(self) -> float:
        return self.momentum if self.momentum is not None else (0.99 if self.version == 3 else 0.999)

    @property
    def resolved_momentum_cosine(self) -> bool:
        return self.momentum_cosine if self.momentum_cosine is not None else self.version == 3

    @property
    def resolved_out_dim(self) -> int:
        return self.out_dim if self.out_dim is not None else (256 if self.version == 3 else 128)


def method(cfg: Any, visual: Any, preset: Any):
    """MoCo ``ssl.moco.version`` with its reference views (v3: BYOL's, crop 0.08-1; v2: aug+, crop 0.2-1)."""
    from data_pipelines.ssl_views import byol_views, moco_v2_views
    from vlp.distributed import world_info
    from vlp.ssl.base import preset_norm, scale_or
    from vlp.ssl.moco import MoCoV2, MoCoV3

    mean, std = preset_norm(preset)
    mcfg, crop = section(cfg, "ssl.moco"), section(cfg, "ssl.views").crop_scale
    if mcfg.version == 3:
        return MoCoV3(visual, byol_views(preset.image_size, scale_or(crop, (0.08, 1.0)), mean, std), mcfg)
    views = moco_v2_views(preset.image_size, scale_or(crop, (0.2, 1.0)), mean, std)
    return MoCoV2(visual, views, mcfg, global_batch=cfg.train.batch_size * world_info().world_size)


register_ssl_objective(
    "moco", MoCoConfig, method, "MoCo v3 (or v2 with a key queue): InfoNCE against a momentum encoder's keys."
)
