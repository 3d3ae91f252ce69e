"""Softmax (CLIP, InfoNCE) image-text loss: the plain reference.

logits = exp(t) * img @ txt.T; loss = mean of the image->text and text->image cross-entropies, the positive
pair of each row/column being on the diagonal (Radford et al., 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.distributed import all_gather_with_grad
from vlp.losses.base import ContrastiveLoss, effective_scale


def clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    max_logit_scale: float | None = None,
) -> torch.Tensor:
    """Single-process CLIP loss on a full batch; materialises the B x B logits."""
    logits = effective_scale(logit_scale, max_logit_scale) * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class NaiveClipLoss(ContrastiveLoss):
    """Gathers all features with gradient and evaluates the reference on the global batch (on every rank)."""

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):  # noqa: D102
        img = all_gather_with_grad(image_features)
        txt = all_gather_with_grad(text_features)
        return clip_loss_reference(img, txt, logit_scale, self.max_logit_scale)
