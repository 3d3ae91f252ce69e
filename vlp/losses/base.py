"""What every contrastive image-text loss shares: its signature and the temperature clamp.

Reduction convention (all implementations): features are the local, L2-normalised features of this rank. The
returned value equals the loss on the global batch (the concatenation over ranks) on every rank, and its
gradient is such that averaging parameter gradients over ranks (what DDP and DeepSpeed do) gives exactly the
single-process gradient on the global batch. Hence the gradient reaching the local features is
W * dL/d(local features), and the gradient reaching logit_scale / logit_bias is W * dL/dt / W-averaged = dL/dt.
"""

from __future__ import annotations

import torch
from torch import nn


def effective_scale(logit_scale: torch.Tensor, max_logit_scale: float | None) -> torch.Tensor:
    """exp(t), with t clamped to at most ``max_logit_scale`` (differentiably) when one is given."""
    if max_logit_scale is not None:
        logit_scale = logit_scale.clamp(max=max_logit_scale)
    return logit_scale.exp()


class ContrastiveLoss(nn.Module):
    """Interface: loss(image_features, text_features, logit_scale, logit_bias) -> scalar."""

    needs_bias: bool = False

    def __init__(self, max_logit_scale: float | None = None) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError
