"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

NT-Xent over the 2N views of a batch: each view's positive is the other view of its image, its negatives the
other 2N - 2 views; its own similarity is masked out. Negatives come from the global batch, gathered across
ranks with gradient. Defaults follow SLIP (Mu et al., 2021), which adds SimCLR to CLIP on ViTs: temperature 0.1
and a 3-layer MLP projection head (4096 hidden, 256 out, batch norm), plus a batch norm on the head's output as in
SimCLR's own code and lightly (``last_batch_norm``; docs/ssl.md, "vlp vs lightly").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.ssl_views import MultiView
from vlp.distributed import all_gather_with_grad, world_info
from vlp.ssl.backbone import backbone_dim, multi_view_features
from vlp.ssl.base import SSLMethod, collapse_statistic
from vlp.ssl.heads import GlobalBatchNorm1d, mlp


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent loss of this rank's anchors (both views) against the global batch; returns (loss, top-1 accuracy).

    ``z1``, ``z2``: (N, D) L2-normalised embeddings of the two views of this rank's N images. The loss is the mean
    over this rank's 2N anchors; averaged over ranks (as data parallelism does) it is the loss of the global
    batch, and with :func:`all_gather_with_grad` the averaged gradients are the global batch's.
    """
    world = world_info()
    n = z1.shape[0]
    k1, k2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
    labels = torch.arange(n, device=z1.device) + world.rank * n
    self_mask = F.one_hot(labels, k1.shape[0]).bool()
    logits_11 = (z1 @ k1.t() / temperature).masked_fill(self_mask, float("-inf"))
    logits_22 = (z2 @ k2.t() / temperature).masked_fill(self_mask, float("-inf"))
    logits_12 = z1 @ k2.t() / temperature
    logits_21 = z2 @ k1.t() / temperature
    logits_1 = torch.cat([logits_12, logits_11], dim=1)
    logits_2 = torch.cat([logits_21, logits_22], dim=1)
    loss = (F.cross_entropy(logits_1, labels) + F.cross_entropy(logits_2, labels)) / 2
    with torch.no_grad():
        acc = ((logits_1.argmax(1) == labels).float().mean() + (logits_2.argmax(1) == labels).float().mean()) / 2
    return loss, acc


class SimCLR(SSLMethod):
    """SimCLR on the image tower's backbone features with an MLP projection head."""

    name = "simclr"

    def __init__(self, visual: nn.Module, views: MultiView, cfg: Any) -> None:
        super().__init__(visual, views)
        self.temperature = cfg.temperature
        self.head = mlp(backbone_dim(visual), cfg.hidden_dim, cfg.out_dim, cfg.num_layers, batch_norm=cfg.batch_norm)
        if cfg.last_batch_norm:
            self.head.append(GlobalBatchNorm1d(cfg.out_dim))

    def compute(self, views: Sequence[torch.Tensor], visual: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        f1, f2 = multi_view_features(visual, views[:2])
        z1 = F.normalize(self.head(f1).float(), dim=-1)
        z2 = F.normalize(self.head(f2).float(), dim=-1)
        loss, acc = nt_xent(z1, z2, self.temperature)
        return loss, {"loss/simclr": loss.detach(), "ssl/simclr/acc": acc, "ssl/simclr/z_std": collapse_statistic(f1)}
