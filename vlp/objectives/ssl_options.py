"""What the SSL objectives share: the view and monitor sections (``ssl.views``, ``ssl.monitor``), value checks,
and :func:`register_ssl_objective`, which registers a method both standalone and as an auxiliary term."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlp.config import ConfigError
from vlp.objectives.registry import register_objective, register_section


def check_scale(key: str, value: list[float] | None) -> None:
    if value is not None and not (len(value) == 2 and 0 < value[0] <= value[1] <= 1):
        raise ConfigError(f"{key} must be [min, max] with 0 < min <= max <= 1, got {value}")


def check_positive(section: str, **values: float) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {v}")


def check_momentum(key: str, value: float | None) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{key} must be in [0, 1], got {value}")


@dataclass
class SSLViewsConfig:
    """Augmented views for the SSL objectives; None keeps each method's reference value."""

    crop_scale: list[float] | None = None
    """RandomResizedCrop area range of the (global) views; reference: SimCLR/BYOL/MoCo v3 [0.08, 1],
    MoCo v2 [0.2, 1], DINO global [0.4, 1]."""
    local_crop_scale: list[float] | None = None
    """DINO local crops' area range; reference [0.05, 0.4]."""
    local_crop_size: int | None = None
    """DINO local crop side; None: image size x 96/224 rounded to the patch size (96 at 224)."""

    def __post_init__(self) -> None:
        check_scale("ssl.views.crop_scale", self.crop_scale)
        check_scale("ssl.views.local_crop_scale", self.local_crop_scale)
        if self.local_crop_size is not None and self.local_crop_size < 1:
            raise ConfigError(f"ssl.views.local_crop_size must be >= 1, got {self.local_crop_size}")


@dataclass
class SSLMonitorConfig:
    """Representation checks during training: k-NN top-1 on labelled held-out images and a collapse monitor."""

    every: int | None = None
    """Every N steps; None: 100 for runs with an SSL objective or --aux-ssl, 0 (off) otherwise."""
    label_key: str | None = None
    """Field of the held-out samples' json used as the k-NN class; None: the first field of each sample's json (for the
    embedded synthetic sets, 'shape' of shapes and silhouettes, 'object' of textures: the family every caption
    names)."""
    knn_k: int = 20
    knn_temperature: float = 0.07
    """Weighted k-NN vote as in DINO's evaluation (k=20, T=0.07)."""
    max_images: int = 1000

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 0:
            raise ConfigError(f"ssl.monitor.every must be >= 0 (0 turns it off), got {self.every}")
        check_positive(
            "ssl.monitor", knn_k=self.knn_k, knn_temperature=self.knn_temperature, max_images=self.max_images
        )


register_section(
    "ssl.views",
    SSLViewsConfig,
    group_doc="Self-supervised image objectives (standalone --objective NAME, or --aux-ssl NAME beside CLIP/SigLIP).",
)
register_section("ssl.monitor", SSLMonitorConfig)

#: method(cfg, visual, preset) -> vlp.ssl.base.SSLMethod
MethodBuilder = Callable[[Any, Any, Any], Any]


def register_ssl_objective(name: str, config_cls: type, method: MethodBuilder, description: str) -> None:
    """Register SSL method ``name`` (config section ``ssl.<name>``) as a standalone objective that trains the
    image tower alone on images, and as an auxiliary term beside an image-text loss (``--aux-ssl name``)."""

    def standalone(cfg: Any, world: Any, model: Any = None, preset: Any = None):
        from vlp.objectives.base import build_dual_tower
        from vlp.objectives.ssl_standalone import SSLObjective

        if model is None:
            model, preset = build_dual_tower(cfg, preset)
        obj = SSLObjective(model, method(cfg, model.visual, preset))
        obj.attach(cfg, model, preset)
        return obj

    def auxiliary(cfg: Any, model: Any, preset: Any):
        return method(cfg, model.visual, preset)

    standalone.__doc__ = description
    register_objective(
        name, "image", sections={f"ssl.{name}": config_cls}, auxiliary=auxiliary, description=description
    )(standalone)
