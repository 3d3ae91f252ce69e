"""Extra tower definitions registered with timm, so presets can name them like any timm model.

``resnet_tiny_gn``: a small timm ResNet (BasicBlock, one block per stage, narrow channels) with GroupNorm
instead of BatchNorm. It learns spatial attributes from a few tens of thousands of small images on a CPU, which
the tiny ViT does not, and it keeps every sample independent of the others in its batch: with BatchNorm, the
per-rank batch statistics would make a multi-process step differ from one process on the global batch and break
exact gradient accumulation.
"""

from __future__ import annotations

from functools import partial

from timm.models import PretrainedCfg, build_model_with_cfg, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

_CFG = PretrainedCfg(architecture="resnet_tiny_gn", input_size=(3, 64, 64), pool_size=(2, 2), num_classes=1000)


def _group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, num_channels), num_channels)


@register_model
def resnet_tiny_gn(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet with [1, 1, 1, 1] BasicBlocks, channels (32, 64, 128, 256), stem width 32, GroupNorm(8)."""
    if pretrained:
        raise ValueError("resnet_tiny_gn has no pretrained weights")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.setdefault("channels", (32, 64, 128, 256))
    kwargs.setdefault("stem_width", 32)
    return build_model_with_cfg(ResNet, "resnet_tiny_gn", pretrained=False, pretrained_cfg=_CFG, block=BasicBlock,
                                layers=[1, 1, 1, 1],
                                norm_layer=partial(_group_norm), **kwargs)
