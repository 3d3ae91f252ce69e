"""What every contrastive image-text loss shares: its signature, the temperature clamp and the reduction convention.

Reduction convention (all implementations): features are the local, L2-normalised features of this rank; the
global batch is their concatenation over the W ranks of the process group, in rank order, and the positive of
each image is the text at the same global index. Then:

* the returned value equals the loss on the global batch, on every rank;
* the gradient reaching the local features is W * dL/d(local features);
* the gradient reaching logit_scale t (and logit_bias b) is dL/dt (dL/db), identical on every rank.

So averaging parameter gradients over ranks, which is what DDP and DeepSpeed do, gives exactly the
single-process gradient on the concatenated global batch: the encoders' parameters receive
(1/W) * sum_r W * dL/dx_r * dx_r/dtheta = dL/dtheta, and t, b receive the average of W identical values.

The naive implementations achieve this by all-gathering the features with gradient and evaluating the
full-batch reference on every rank. The chunked implementations never form the global logits: each rank
computes the rows of the logits that belong to its own images, tile by tile, while the text features travel round
a ring; whatever a rank computes for another rank's texts (column log-sum-exps, text gradients) travels with them
back to their owner. Each rank then holds the exact dL/d(local features); it returns W times that as the
feature gradient, all-reduces the two scalar gradients of t and b so that they are identical everywhere, and
all-reduces its share of the loss value so that every rank returns the same L.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlp.distributed import all_gather_no_grad, world_info


def effective_scale(logit_scale: torch.Tensor, max_logit_scale: float | None) -> torch.Tensor:
    """exp(t), with t clamped to at most ``max_logit_scale`` (differentiably) when one is given."""
    if max_logit_scale is not None:
        # where() rather than clamp(): the gradient still flows at t == max exactly (clamp's is 0 there)
        logit_scale = torch.where(logit_scale > max_logit_scale, logit_scale.new_tensor(max_logit_scale), logit_scale)
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


# --------------------------------------------------------------------------------------------------------------
# Shared pieces of the chunked implementations
# --------------------------------------------------------------------------------------------------------------


class ChunkedContrastiveLoss(ContrastiveLoss):
    """Base of the tiled, ring-distributed losses: holds the tile edge and the process group.

    ``chunk_size`` is the edge of the square logits tiles (rows of local images x columns of one rank's texts)
    that are formed one at a time; memory for the loss is O(chunk_size^2 + local batch x dim), independent of
    the global batch and of the world size. ``group`` is the process group over which the batch is split
    (default: the whole world).
    """

    def __init__(
        self,
        max_logit_scale: float | None = None,
        chunk_size: int = 1024,
        group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__(max_logit_scale)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer (the logits tile edge), got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.group = group

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, max_logit_scale={self.max_logit_scale}"


def check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise ValueError unless both are floating (n, d) matrices of the same shape, dtype and device."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point (batch, dim) matrix, got shape {tuple(t.shape)} and dtype {t.dtype}"
            )
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)} must have the same shape (one caption per image)"
        )
    if image_features.dtype != text_features.dtype or image_features.device != text_features.device:
        raise ValueError(
            f"image and text features must share dtype and device, got {image_features.dtype} on "
            f"{image_features.device} and {text_features.dtype} on {text_features.device}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("the local batch is empty; every rank needs at least one image-text pair")


def global_sizes(features: torch.Tensor, group: torch.distributed.ProcessGroup | None) -> list[int]:
    """Every rank's local batch size (this rank's alone on one process); checks that feature dims agree."""
    if world_info(group).world_size == 1:
        return [features.shape[0]]
    shape = torch.tensor([[features.shape[0], features.shape[1]]], dtype=torch.int64, device=features.device)
    if group is None:
        shapes = all_gather_no_grad(shape)
    else:
        parts = [torch.empty_like(shape) for _ in range(world_info(group).world_size)]
        torch.distributed.all_gather(parts, shape, group=group)
        shapes = torch.cat(parts)
    dims = shapes[:, 1].tolist()
    if len(set(dims)) != 1:
        raise ValueError(f"feature dimension differs across ranks: {dims}; every rank must use the same model")
    return shapes[:, 0].tolist()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which tiles are formed and gradients accumulated: fp32 for 16-bit inputs, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def exp_headroom(dtype: torch.dtype) -> float:
    """How far (in log space) below a tile's shift a row's or column's largest term may lie.

    Half the exponent range down to the smallest normal number: terms lost to underflow are then below
    exp(-headroom) relative to the largest one, far under the dtype's precision (43.7 for fp32, 354 for fp64).
    """
    return -math.log(torch.finfo(dtype).tiny) / 2


def tile_slices(n: int, chunk: int) -> list[slice]:
    """Consecutive slices of at most ``chunk`` covering range(n)."""
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


class TileWorkspace:
    """Preallocated square buffers for logits tiles, reused across tiles and ring steps (no allocator churn)."""

    def __init__(self, chunk: int, n_max: int, dtype: torch.dtype, device: torch.device, count: int = 2) -> None:
        edge = min(chunk, n_max)
        self._bufs = [torch.empty(edge * edge, dtype=dtype, device=device) for _ in range(count)]

    def get(self, index: int, rows: int, cols: int) -> torch.Tensor:
        """Contiguous (rows, cols) view of buffer ``index``."""
        return self._bufs[index][: rows * cols].view(rows, cols)
