"""Projection/prediction heads shared by the SSL methods, and batch norm over the global batch.

The methods differ only in the MLP's depth, width, bias and where batch norm sits, so one builder makes them all:

- SimCLR as in SLIP (Mu et al., 2021): 3 layers, 4096 hidden, 256 out, BN + ReLU between layers; by default also a
  BN on the output, as in SimCLR's own code (added by vlp/ssl/simclr.py).
- MoCo v3 (Chen, Xie & He, 2021): projector 3 layers / predictor 2 layers, 4096 hidden, 256 out, no biases, BN
  after every layer, the last one without affine parameters.
- MoCo v2 (Chen et al., 2020): 2 layers (backbone width hidden, 128 out), ReLU, no BN.
- BYOL (Grill et al., 2020): projector and predictor 2 layers, 4096 hidden, 256 out, BN + ReLU.
- DINO (Caron et al., 2021): :class:`DINOHead`.

Batch norm in the heads is :class:`GlobalBatchNorm1d`: statistics over the global batch of all ranks (the
reference implementations use SyncBatchNorm, which has no CPU/gloo kernel), so that W processes compute exactly
what one process computes on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.distributed import all_gather_no_grad, all_gather_with_grad, world_info


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics come from the batch of every rank (equal local batch sizes).

    The local rows are normalised as rows of the gathered batch; the gather keeps the autograd graph, so with the
    usual data-parallel gradient averaging the gradients equal those of one process on the global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = world_info()
        if not self.training or world.world_size == 1:
            return super().forward(x)
        n = x.shape[0]
        full = all_gather_with_grad(x) if torch.is_grad_enabled() and x.requires_grad else all_gather_no_grad(x)
        return super().forward(full)[world.rank * n : (world.rank + 1) * n]


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    *,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    bias: bool = True,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear layers with (global) batch norm and ``activation`` between them.

    ``last_batch_norm`` adds a non-affine batch norm after the last layer (MoCo v3).
    """
    if num_layers < 1:
        raise ValueError(f"an MLP head needs at least 1 layer, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if not last:
            if batch_norm:
                layers.append(GlobalBatchNorm1d(d_out))
            layers.append(activation())
        elif last_batch_norm:
            layers.append(GlobalBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """DINO's projection head: MLP to a bottleneck, L2 normalisation, weight-normalised linear layer to K outputs.

    Reference defaults (Caron et al., 2021): 3 layers, 2048 hidden, GELU, no BN, bottleneck 256, K = 65536,
    ``norm_last_layer`` (the weight-norm scale g fixed to 1). The last layer is ``w = g * v / ||v||`` per output
    row. While ``freeze_last_layer`` is set, v and g receive zero gradients (they stay part of the graph, so
    data-parallel wrappers see them used); with AdamW this leaves the normalised last layer unchanged.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers == 1:
            self.mlp = nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
        else:
            self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm=batch_norm, activation=nn.GELU)
        self.mlp.apply(_trunc_normal_init)
        v = nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone()  # PyTorch's default init
        self.last_v = nn.Parameter(v)
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.freeze_last_layer = False

    @property
    def out_dim(self) -> int:
        return int(self.last_v.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        v, g = self.last_v, self.last_g
        if self.freeze_last_layer:
            v = v.detach() + 0.0 * v
            g = g.detach() + 0.0 * g
        w = g * v / v.norm(dim=1, keepdim=True)
        return x @ w.t()
