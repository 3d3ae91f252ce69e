"""BYOL (Grill et al., 2020) as an objective: config section ``ssl.byol``.

The method (online projector + predictor regressing an EMA target) is vlp/ssl/byol.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlp.objectives.registry import section
from vlp.objectives.ssl_options import check_momentum, check_positive, register_ssl_objective


@dataclass
class BYOLConfig:
    """BYOL (Grill et al., 2020): online projector + predictor regress an EMA target's projection."""

    momentum: float = 0.996
    """Target EMA at the start; raised to 1 on a half-cosine."""
    hidden_dim: int = 4096
    out_dim: int = 256

    def __post_init__(self) -> None:
        check_positive("ssl.byol", hidden_dim=self.hidden_dim, out_dim=self.out_dim)
        check_momentum("ssl.byol.momentum", self.momentum)


def method(cfg: Any, visual: Any, preset: Any):
    """BYOL from ``ssl.byol`` with BYOL's asymmetric views (crop area default 0.08-1)."""
    from data_pipelines.ssl_views import byol_views
    from vlp.ssl.base import preset_norm, scale_or
    from vlp.ssl.byol import BYOL

    mean, std = preset_norm(preset)
    views = byol_views(preset.image_size, scale_or(section(cfg, "ssl.views").crop_scale, (0.08, 1.0)), mean, std)
    return BYOL(visual, views, section(cfg, "ssl.byol"))


register_ssl_objective("byol", BYOLConfig, method, "BYOL: predict an EMA target network's projection of another view.")
