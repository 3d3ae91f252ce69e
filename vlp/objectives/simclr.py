"""SimCLR (Chen et al., 2020) as an objective: config section ``ssl.simclr`` and SimCLR's views.

The method (NT-Xent over 2N views, projection MLP) is vlp/ssl/simclr.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlp.objectives.registry import section
from vlp.objectives.ssl_options import check_positive, register_ssl_objective


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al., 2020) as SLIP (Mu et al., 2021) runs it on a ViT: NT-Xent over 2N views."""

    temperature: float = 0.1
    """NT-Xent temperature (SLIP's SimCLR term)."""
    hidden_dim: int = 4096
    out_dim: int = 256
    num_layers: int = 3
    """Projection MLP depth (SLIP: 3 layers, 4096 hidden, 256 out)."""
    batch_norm: bool = True
    """Batch norm (over the global batch) in the projection MLP, as in SimCLR and SLIP."""
    last_batch_norm: bool = True
    """A batch norm (affine, over the global batch) on the projection's output, as SimCLR's own code and lightly's
    SimCLRProjectionHead have it (false: SLIP's head, which ends in the linear layer). Measured against lightly on the
    synthetic set (docs/ssl.md, vlp vs lightly): without it the tower learnt position to 24.7% k-NN where lightly's
    reached 31.5%; with it 37.6%."""

    def __post_init__(self) -> None:
        check_positive(
            "ssl.simclr",
            temperature=self.temperature,
            hidden_dim=self.hidden_dim,
            out_dim=self.out_dim,
            num_layers=self.num_layers,
        )


def method(cfg: Any, visual: Any, preset: Any):
    """SimCLR from ``ssl.simclr`` with SimCLR's views (crop area ``ssl.views.crop_scale``, default 0.08-1)."""
    from data_pipelines.ssl_views import simclr_views
    from vlp.ssl.base import preset_norm, scale_or
    from vlp.ssl.simclr import SimCLR

    mean, std = preset_norm(preset)
    views = simclr_views(preset.image_size, scale_or(section(cfg, "ssl.views").crop_scale, (0.08, 1.0)), mean, std)
    return SimCLR(visual, views, section(cfg, "ssl.simclr"))


register_ssl_objective("simclr", SimCLRConfig, method, "SimCLR: NT-Xent between two augmented views of each image.")
