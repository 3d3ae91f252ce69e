"""Sigmoid (SigLIP) image-text loss: the plain reference and the chunked, ring-distributed version.

logits = exp(t) * img @ txt.T + b; labels +1 on the diagonal and -1 elsewhere;
loss = -sum(log sigmoid(labels * logits)) / B (Zhai et al., 2023).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.distributed import all_gather_with_grad, ring_visit, world_info
from vlp.losses.base import (
    ChunkedContrastiveLoss,
    ContrastiveLoss,
    TileWorkspace,
    check_features,
    compute_dtype,
    effective_scale,
    global_sizes,
    tile_slices,
)


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


# --------------------------------------------------------------------------------------------------------------
# Chunked, ring-distributed implementation
# --------------------------------------------------------------------------------------------------------------
#
# With Z = s * I @ T.T + b and labels y = +1 on the diagonal, -1 elsewhere:
#   L = (1/N) [sum_{i != j} softplus(Z_ij) + sum_i softplus(-Z_ii)],   dL/dZ = (sigmoid(Z) - [i == j]) / N.
# The gradient of a tile needs nothing but the tile, so the forward pass computes the loss and all gradients
# in a single sweep (three matmuls per tile, as many as the naive backward) and backward only scales them.


def _sigmoid_tile(
    z: torch.Tensor, work: torch.Tensor, on_diagonal: bool, exp_safe: bool, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss sum of the logits tile ``z`` (overwritten by dL/dZ * N when ``need_grad``) and the tile's grad sum.

    Off-diagonal entries cost one exp and one log1p: softplus(z) = log1p(e), sigmoid(z) = e / (1 + e) with
    e = exp(z), used when ``exp_safe`` says e cannot overflow. Diagonal entries (positive pairs) are taken
    out and computed as softplus(-z), sigmoid(z) - 1 directly, so no cancellation occurs.
    """
    if on_diagonal:
        zd = z.diagonal().clone()
        z.diagonal().fill_(-math.inf)
    if exp_safe:
        z.exp_()
        loss = torch.log1p(z, out=work).sum()
        if need_grad:
            torch.add(z, 1, out=work)
            z.div_(work)
    else:
        loss = F.softplus(z).sum()
        if need_grad:
            z.sigmoid_()
    if on_diagonal:
        loss = loss + F.softplus(-zd).sum()
        if need_grad:
            z.diagonal().copy_(torch.sigmoid(-zd).neg_())
    return loss, (z.sum() if need_grad else None)


class _ChunkedSigLipFunction(torch.autograd.Function):
    """Tiled SigLIP loss over a ring of ranks; gradients are formed in the forward sweep and saved (O(B x D))."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, chunk, group, need_grad):  # type: ignore[override]
        info = world_info(group)
        sizes = global_sizes(img, group)
        n, d, ct = img.shape[0], img.shape[1], compute_dtype(img.dtype)
        s, b = scale.detach().to(ct), bias.detach().to(ct)
        rows = tile_slices(n, chunk)
        ws = TileWorkspace(chunk, max(sizes), ct, img.device, count=2)
        # exp(z) is safe when z <= s * max|I| * max|T| + b stays below the dtype's overflow threshold.
        exp_limit = math.log(torch.finfo(ct).max) - 2
        img_norm = img.to(ct).norm(dim=1).max() if n else torch.zeros((), dtype=ct)
        loss_sum = torch.zeros((), dtype=torch.float64, device=img.device)
        grad_sum = torch.zeros((), dtype=torch.float64, device=img.device)
        d_img = torch.zeros((n, d), dtype=ct, device=img.device) if need_grad else None

        def visit(owner: int, payload: list[torch.Tensor], parts: list[torch.Tensor]) -> None:
            nonlocal loss_sum, grad_sum
            (t_q,) = payload
            d_txt_q = parts[0] if need_grad else None
            bound = s * img_norm * t_q.to(ct).norm(dim=1).max() + b
            exp_safe = bool(bound.item() <= exp_limit)
            cols = tile_slices(t_q.shape[0], chunk)
            for rs in rows:
                i_c = img[rs].to(ct)
                i_s = i_c * s
                for cs in cols:
                    t_c = t_q[cs].to(ct)
                    z = ws.get(0, rs.stop - rs.start, cs.stop - cs.start)
                    work = ws.get(1, rs.stop - rs.start, cs.stop - cs.start)
                    torch.mm(i_s, t_c.T, out=z).add_(b)
                    tile_loss, tile_grad = _sigmoid_tile(z, work, owner == info.rank and rs == cs, exp_safe, need_grad)
                    loss_sum += tile_loss
                    if need_grad:
                        grad_sum += tile_grad
                        d_img[rs].addmm_(z, t_c)
                        d_txt_q[cs].addmm_(z.T, i_c)

        accs = [torch.zeros((n, d), dtype=ct, device=img.device)] if need_grad else []
        accs = ring_visit([txt], accs, visit, sizes=sizes, group=group)
        totals = [loss_sum, grad_sum]
        if need_grad:
            totals.append(torch.dot(img.reshape(-1).to(ct), d_img.reshape(-1)).to(torch.float64))
        totals = torch.stack(totals)
        if info.world_size > 1:
            dist.all_reduce(totals, group=group)
        big_n = sum(sizes)
        if need_grad:
            coef = info.world_size * s / big_n
            ctx.save_for_backward(d_img.mul_(coef), accs[0].mul_(coef))
            # dL/ds = (1/N) sum dZ * S = (1/N) sum_i <I_i, (dZ @ T)_i>; dL/db = (1/N) sum dZ.
            ctx.grad_scale = (totals[2] / big_n).to(scale.dtype).reshape(scale.shape)
            ctx.grad_bias = (totals[1] / big_n).to(bias.dtype).reshape(bias.shape)
            ctx.dtypes = (img.dtype, txt.dtype)
        return (totals[0] / big_n).to(ct)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        if not hasattr(ctx, "grad_scale"):
            raise RuntimeError("chunked siglip: backward through a forward that ran without gradients")
        d_img, d_txt = ctx.saved_tensors
        g = grad_out.to(d_img.dtype)
        grads = [
            (d_img * g).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
            (d_txt * g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None,
            ctx.grad_scale * grad_out.to(ctx.grad_scale.dtype) if ctx.needs_input_grad[2] else None,
            ctx.grad_bias * grad_out.to(ctx.grad_bias.dtype) if ctx.needs_input_grad[3] else None,
        ]
        return (*grads, None, None, None)


class ChunkedSigLipLoss(ChunkedContrastiveLoss):
    """SigLIP loss without the B x B logits: tile losses summed, gradients formed tile by tile in one sweep.

    Exact (up to float rounding) against :func:`siglip_loss_reference` on the global batch, for any world size.
    Text features travel round a ring of point-to-point sends together with the gradient accumulated for them,
    which arrives back at their owner; positives exist only in the local diagonal block. Per-rank memory is
    O(chunk_size^2 + local batch x dim). See :mod:`vlp.losses.base` for the reduction convention.
    """

    needs_bias = True

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):  # noqa: D102
        if logit_bias is None:
            raise ValueError("the siglip loss needs a logit_bias; build the model with loss.name=siglip")
        check_features(image_features, text_features)
        scale = effective_scale(logit_scale, self.max_logit_scale)
        need_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (image_features, text_features, scale, logit_bias)
        )
        return _ChunkedSigLipFunction.apply(
            image_features, text_features, scale, logit_bias, self.chunk_size, self.group, need_grad
        )
