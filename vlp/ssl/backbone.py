"""The image tower as an SSL backbone: pooled features before the contrastive projection, at any crop size.

The SSL heads read what ``DualTower.image_backbone_features`` returns (the pooled output of the image tower,
before the image-text projection). Multi-crop needs the same tower on smaller crops too, so for open_clip ViTs
the positional embedding is resized to the crop's patch grid (bicubic, as DINO's ``interpolate_pos_encoding``);
at the preset's own size the computation is exactly the DualTower's.
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from vlp.config import ConfigError


def check_not_zero3(module: nn.Module) -> None:
    """Refuse DeepSpeed ZeRO-3 (partitioned parameters) with a clear error.

    The SSL objectives read the image tower through its sub-modules (its pooled backbone features) and keep EMA
    teachers updated from the student's parameters; both need whole parameters, which ZeRO-3 only materialises
    inside the owning module's own forward.
    """
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise ConfigError(
            "the SSL objectives (standalone and --aux-ssl) do not support DeepSpeed ZeRO-3 "
            "(partitioned parameters); use ZeRO-2, e.g. accelerate launch --config_file "
            "configs/accelerate/zero2.yaml, or ZeRO-0/1"
        )


def backbone_dim(visual: nn.Module) -> int:
    """Width of the pooled backbone features of an image tower."""
    if isinstance(visual, VisionTransformer):
        return int(visual.class_embedding.shape[-1])
    if isinstance(visual, open_clip.timm_model.TimmModel):
        return int(visual.trunk.num_features)
    raise TypeError(f"unsupported vision tower {type(visual).__name__}")


def projection_parameters(visual: nn.Module) -> list[nn.Parameter]:
    """The tower's image-text projection, which backbone features do not use."""
    if isinstance(visual, VisionTransformer):
        return [visual.proj] if visual.proj is not None else []
    if isinstance(visual, open_clip.timm_model.TimmModel):
        return list(visual.head.parameters())
    raise TypeError(f"unsupported vision tower {type(visual).__name__}")


def _resized_pos_embed(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    pos = visual.positional_embedding
    if tuple(grid) == tuple(visual.grid_size):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    gh, gw = visual.grid_size
    patch_pos = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)


def backbone_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled features of ``visual`` for ``images`` (B, 3, H, W) before the contrastive projection."""
    if isinstance(visual, VisionTransformer):
        x = visual.conv1(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + _resized_pos_embed(visual, grid).to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        pooled, _ = visual._pool(visual.transformer(x))
        return pooled
    if isinstance(visual, open_clip.timm_model.TimmModel):
        patch_embed = getattr(visual.trunk, "patch_embed", None)  # timm ViTs take their own size; CNNs any size
        native = getattr(patch_embed, "img_size", None)
        if native is not None and tuple(images.shape[-2:]) != tuple(native):
            raise ConfigError(
                f"timm ViT image towers take {tuple(native)} crops only, got "
                f"{tuple(images.shape[-2:])}; set --ssl.views.local_crop_size {native[-1]}"
            )
        return visual.trunk(images)
    raise TypeError(f"unsupported vision tower {type(visual).__name__}")


def multi_view_features(visual: nn.Module, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Backbone features per view, running consecutive views of the same size as one batch (DINO's multi-crop)."""
    out: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        feats = backbone_features(visual, torch.cat(list(views[start:end]), dim=0))
        out.extend(feats.chunk(end - start, dim=0))
        start = end
    return out


def patch_size(visual: nn.Module) -> int:
    """Patch side of a ViT tower (crop sides should be multiples of it); 1 for convolutional towers."""
    if isinstance(visual, VisionTransformer):
        return int(visual.patch_size[0])
    if isinstance(visual, open_clip.timm_model.TimmModel) and hasattr(visual.trunk, "patch_embed"):
        return int(visual.trunk.patch_embed.patch_size[0])
    return 1


__all__ = [
    "backbone_dim",
    "backbone_features",
    "check_not_zero3",
    "multi_view_features",
    "patch_size",
    "projection_parameters",
]
