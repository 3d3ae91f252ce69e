"""Softmax (CLIP, InfoNCE) image-text loss: the plain reference and the chunked, ring-distributed version.

logits = exp(t) * img @ txt.T; loss = mean of the image->text and text->image cross-entropies, the positive
pair of each row/column being on the diagonal (Radford et al., 2021).
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
    exp_headroom,
    global_sizes,
    tile_slices,
)


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


# --------------------------------------------------------------------------------------------------------------
# Chunked, ring-distributed implementation
# --------------------------------------------------------------------------------------------------------------
#
# Notation: N global batch, X = s * I @ T.T the logits (s = exp(t)), lr_i / lc_j the row / column log-sum-exps.
#   L = 1/(2N) [sum_i (lr_i - X_ii) + sum_j (lc_j - X_jj)]
#   dL/dX_ij = (P_ij + Q_ij) / (2N) - delta_ij / N,   P = exp(X - lr[:, None]),  Q = exp(X - lc[None, :])
# Forward: one pass over the tiles computes both log-sum-exps (row LSEs stay local, column LSEs ride the ring).
# Backward: tiles are recomputed; G = P + Q gives dI += G @ T (local) and dT += G.T @ I (rides the ring home);
# dL/ds = (1/(2N)) sum_i <I_i, (G @ T)_i> - (1/N) sum_i S_ii needs no extra pass over the tiles.


def _logaddexp_(acc: torch.Tensor, part: torch.Tensor) -> None:
    torch.logaddexp(acc, part, out=acc)


def _lse_tile(x: torch.Tensor, headroom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exps of the logits tile ``x`` (overwritten).

    Fast path: a single exp shifted by the tile maximum serves both directions, valid when every row's and
    column's maximum lies within ``headroom`` of the tile maximum (always, in practice); otherwise two exps.
    """
    row_max, col_max = x.amax(1), x.amax(0)
    top = row_max.max()
    spread = torch.maximum(top - row_max.min(), top - col_max.min())
    if spread.item() <= headroom:
        x.sub_(top).exp_()
        return x.sum(1).log_().add_(top), x.sum(0).log_().add_(top)
    return torch.logsumexp(x, 1), torch.logsumexp(x, 0)


def _softmax_grad_tile(
    x: torch.Tensor, work: torch.Tensor, lr: torch.Tensor, lc: torch.Tensor, headroom: float
) -> torch.Tensor:
    """G = exp(x - lr[:, None]) + exp(x - lc[None, :]) in place of the logits tile ``x``.

    Fast path: one exp. K = min(max lr, max lc) bounds every logit of the tile, so E = exp(x - K) <= 1 and
    G = E * (exp(K - lr)[:, None] + exp(K - lc)[None, :]); valid when the factors stay below exp(headroom).
    """
    bound = torch.minimum(lr.max(), lc.max())
    spread = torch.maximum(bound - lr.min(), bound - lc.min())
    if spread.item() <= headroom:
        u, v = (bound - lr).exp_(), (bound - lc).exp_()
        x.sub_(bound).exp_()
        torch.add(u[:, None], v[None, :], out=work)
        return x.mul_(work)
    torch.sub(x, lr[:, None], out=work).exp_()
    return x.sub_(lc[None, :]).exp_().add_(work)


class _ChunkedClipFunction(torch.autograd.Function):
    """Tiled CLIP loss over a ring of ranks; saves features and LSE vectors only, recomputes tiles in backward."""

    @staticmethod
    def forward(ctx, img, txt, scale, chunk, group):  # type: ignore[override]
        info = world_info(group)
        sizes = global_sizes(img, group)
        n, ct = img.shape[0], compute_dtype(img.dtype)
        s = scale.detach().to(ct)
        headroom = exp_headroom(ct)
        rows = tile_slices(n, chunk)
        ws = TileWorkspace(chunk, max(sizes), ct, img.device, count=1)
        lr = torch.full((n,), -math.inf, dtype=ct, device=img.device)
        diag = torch.empty((n,), dtype=ct, device=img.device)

        def visit(owner: int, payload: list[torch.Tensor], parts: list[torch.Tensor]) -> None:
            (t_q,), (lc_q,) = payload, parts
            cols = tile_slices(t_q.shape[0], chunk)
            for rs in rows:
                i_s = img[rs].to(ct) * s
                for cs in cols:
                    x = ws.get(0, rs.stop - rs.start, cs.stop - cs.start)
                    torch.mm(i_s, t_q[cs].to(ct).T, out=x)
                    if owner == info.rank and rs == cs:
                        diag[rs] = x.diagonal()
                    row, col = _lse_tile(x, headroom)
                    _logaddexp_(lr[rs], row)
                    _logaddexp_(lc_q[cs], col)

        lc0 = torch.full((n,), -math.inf, dtype=ct, device=img.device)
        (lc,) = ring_visit(
            [txt], [lc0], visit, sizes=sizes, identities=[-math.inf], combines=[_logaddexp_], group=group
        )
        total = torch.stack([(lr - diag).sum() + (lc - diag).sum(), diag.sum()]).to(torch.float64)
        if info.world_size > 1:
            dist.all_reduce(total, group=group)
        big_n = sum(sizes)
        ctx.save_for_backward(img, txt, scale, lr, lc)
        ctx.chunk, ctx.group, ctx.sizes = chunk, group, sizes
        ctx.diag_sum = total[1]
        return (total[0] / (2 * big_n)).to(ct)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        img, txt, scale, lr, lc = ctx.saved_tensors
        chunk, group, sizes = ctx.chunk, ctx.group, ctx.sizes
        info = world_info(group)
        n, d, ct = img.shape[0], img.shape[1], compute_dtype(img.dtype)
        s = scale.detach().to(ct)
        headroom = exp_headroom(ct)
        rows = tile_slices(n, chunk)
        ws = TileWorkspace(chunk, max(sizes), ct, img.device, count=2)
        d_img = torch.zeros((n, d), dtype=ct, device=img.device)

        def visit(owner: int, payload: list[torch.Tensor], parts: list[torch.Tensor]) -> None:
            (t_q, lc_q), (d_txt_q,) = payload, parts
            cols = tile_slices(t_q.shape[0], chunk)
            for rs in rows:
                i_c = img[rs].to(ct)
                i_s = i_c * s
                for cs in cols:
                    t_c = t_q[cs].to(ct)
                    x = ws.get(0, rs.stop - rs.start, cs.stop - cs.start)
                    work = ws.get(1, rs.stop - rs.start, cs.stop - cs.start)
                    torch.mm(i_s, t_c.T, out=x)
                    g = _softmax_grad_tile(x, work, lr[rs], lc_q[cs], headroom)
                    d_img[rs].addmm_(g, t_c)
                    d_txt_q[cs].addmm_(g.T, i_c)

        (d_txt,) = ring_visit(
            [txt, lc], [torch.zeros((n, d), dtype=ct, device=img.device)], visit, sizes=sizes, group=group
        )
        big_n, world = sum(sizes), info.world_size
        grad_scale = None
        if ctx.needs_input_grad[2]:
            gs = torch.dot(img.reshape(-1).to(ct), d_img.reshape(-1)).to(torch.float64).reshape(1)
            if world > 1:
                dist.all_reduce(gs, group=group)
            # dL/ds = 1/(2N) sum G*S - 1/N sum S_ii, with S = X / s.
            grad_scale = grad_out.to(torch.float64) * (gs[0] / (2 * big_n) - ctx.diag_sum / (big_n * s))
            grad_scale = grad_scale.to(scale.dtype).reshape(scale.shape)
        coef = grad_out.to(ct) * (world * s)
        grad_img = grad_txt = None
        if ctx.needs_input_grad[0]:
            grad_img = d_img.mul_(coef / (2 * big_n)).addcmul_(txt, -coef / big_n).to(img.dtype)
        if ctx.needs_input_grad[1]:
            grad_txt = d_txt.mul_(coef / (2 * big_n)).addcmul_(img, -coef / big_n).to(txt.dtype)
        return grad_img, grad_txt, grad_scale, None, None


class ChunkedClipLoss(ChunkedContrastiveLoss):
    """CLIP loss without the B x B logits: online log-sum-exp over tiles, tiles recomputed in backward.

    Exact (up to float rounding) against :func:`clip_loss_reference` on the global batch, for any world size;
    text features and their gradients travel round a ring of point-to-point sends, so per-rank memory is
    O(chunk_size^2 + local batch x dim). See :mod:`vlp.losses.base` for the reduction convention.
    """

    def forward(self, image_features, text_features, logit_scale, logit_bias=None):  # noqa: D102
        check_features(image_features, text_features)
        scale = effective_scale(logit_scale, self.max_logit_scale)
        return _ChunkedClipFunction.apply(image_features, text_features, scale, self.chunk_size, self.group)
