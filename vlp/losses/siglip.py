"""Sigmoid (SigLIP) image-text loss: the plain reference.

logits = exp(t) * img @ txt.T + b; labels +1 on the diagonal and -1 elsewhere;
loss = -sum(log sigmoid(labels * logits)) / B (Zhai et al., 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.distributed import all_gather_with_grad
from vlp.losses.base import ContrastiveLoss, effective_scale


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    max_logit_scale: float | None = None,
) -> torch.Tensor:
    """Single-process SigLIP loss on a full batch; materialises the B x B logits."""
    logits = effective_scale(logit_scale, max_logit_scale) * image_features @ text_features.T + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


class NaiveSigLipLoss(ContrastiveLoss):
    """Gathers all features with gradient and evaluates the reference on the global batch (on every rank)."""

    needs_bias = True

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):  # noqa: D102
        if logit_bias is None:
            raise ValueError("the siglip loss needs a logit_bias; build the model with loss.name=siglip")
        img = all_gather_with_grad(image_features)
        txt = all_gather_with_grad(text_features)
        return siglip_loss_reference(img, txt, logit_scale, logit_bias, self.max_logit_scale)
