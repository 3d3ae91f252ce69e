"""Chunked CLIP/SigLIP losses against the plain full-batch references, on one process.

Cross-process exactness (world sizes 2-4) is in test_losses_distributed.py; both use the helpers here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlp.config import LossConfig
from vlp.losses import (
    LOSSES,
    ChunkedClipLoss,
    ChunkedSigLipLoss,
    NaiveClipLoss,
    NaiveSigLipLoss,
    build_loss,
    clip_loss_reference,
    siglip_loss_reference,
)
from vlp.losses.clip import _lse_tile, _softmax_grad_tile

# (max_logit_scale, t, b) per loss: the values the issue names first, then others.
CLIP_PARAMS = [
    (math.log(100.0), math.log(100.0), None),
    (math.log(100.0), math.log(1 / 0.07), None),
    (None, math.log(30.0), None),
]
SIGLIP_PARAMS = [(None, math.log(10.0), -10.0), (None, math.log(3.0), 2.0), (None, math.log(50.0), -5.0)]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-4)}  # (loss, gradients), relative


def make_batch(n: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image/text features whose positives are correlated but not trivially separable."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 2 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


def loss_and_grads(loss_fn, img, txt, t: float, b: float | None) -> list[torch.Tensor | None]:
    """[loss, d img, d txt, d t, d b] of ``loss_fn(img, txt, t, b)`` (b None for clip)."""
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    pdt = torch.float64 if img.dtype == torch.float64 else torch.float32  # parameters stay fp32 under bf16
    ts = torch.tensor(t, dtype=pdt, requires_grad=True)
    bs = None if b is None else torch.tensor(b, dtype=pdt, requires_grad=True)
    loss = loss_fn(img, txt, ts, bs)
    loss.backward()
    return [loss.detach(), img.grad, txt.grad, ts.grad, None if bs is None else bs.grad]


def reference(name: str, img, txt, max_scale, t, b) -> list[torch.Tensor | None]:
    """Single-process reference loss and gradients on the full batch."""
    if name == "clip":
        return loss_and_grads(lambda i, x, s, _: clip_loss_reference(i, x, s, max_scale), img, txt, t, None)
    return loss_and_grads(lambda i, x, s, c: siglip_loss_reference(i, x, s, c, max_scale), img, txt, t, b)


def rel_errors(got: list, ref: list, floors: list[float] | None = None) -> list[float]:
    """max|got - ref| / max(max|ref|, floor) per entry (0 where both are None).

    ``floors`` are the rounding level of the reference itself, for values that are differences of much larger
    terms (see :func:`clip_floors`); without them, agreement is measured relative to the reference alone.
    """
    floors = floors or [0.0] * len(ref)
    out = []
    for a, r, floor in zip(got, ref, floors):
        if r is None:
            assert a is None
            out.append(0.0)
            continue
        denom = max(float(r.double().abs().max()), floor, 1e-300)
        out.append(float((a.double() - r.double()).abs().max()) / denom)
    return out


def clip_floors(t: float, max_scale: float | None, n_global: int, world: int = 1) -> list[float]:
    """Magnitudes of the terms whose differences make the CLIP loss and gradients.

    loss = mean(lse_i - X_ii) and dL/dt are differences of logits of size s = exp(t); dL/dI_i = s/N (sum_j p_ij
    T_j - T_i) is a difference of terms of size s/N (times W for the local-gradient convention). When a pair is
    classified with near certainty, the difference is far below those terms and any float implementation,
    the reference included, carries rounding of eps times the terms: agreement is measured relative to them.
    """
    s = math.exp(min(t, max_scale) if max_scale is not None else t)
    return [s, world * s / n_global, world * s / n_global, s, 0.0]


def chunked(name: str, max_scale, chunk: int, group=None):
    cls = ChunkedClipLoss if name == "clip" else ChunkedSigLipLoss
    return cls(max_logit_scale=max_scale, chunk_size=chunk, group=group)


class MaxStorage(TorchDispatchMode):
    """Records the largest storage (bytes) that any op produced or wrote into while active."""

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.untyped_storage().nbytes())
        return out


# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_chunked_matches_reference_single_process(name, dtype):
    params = CLIP_PARAMS if name == "clip" else SIGLIP_PARAMS
    loss_tol, grad_tol = TOL[dtype]
    checked = 0
    for n, chunks in ((1, (1, 2)), (7, (7, 3)), (64, (16, 24))):
        for k, (max_scale, t, b) in enumerate(params):
            img, txt = make_batch(n, 32, dtype, seed=n + k)
            ref = reference(name, img, txt, max_scale, t, b)
            floors = clip_floors(t, max_scale, n) if name == "clip" else None  # n = 1: exactly zero
            for chunk in chunks:
                got = loss_and_grads(chunked(name, max_scale, chunk), img, txt, t, b)
                errs = rel_errors(got, ref, floors)
                assert errs[0] <= loss_tol, (n, chunk, t, errs)
                assert max(errs[1:]) <= grad_tol, (n, chunk, t, errs)
                checked += 1
    assert checked == 18


def test_registry_and_build_loss_pass_chunk_size():
    assert LOSSES[("clip", "chunked")] is ChunkedClipLoss
    assert LOSSES[("siglip", "chunked")] is ChunkedSigLipLoss
    loss = build_loss(LossConfig(name="siglip", impl="chunked", chunk_size=96))
    assert isinstance(loss, ChunkedSigLipLoss) and loss.chunk_size == 96 and loss.max_logit_scale is None
    loss = build_loss(LossConfig(name="clip", impl="chunked", chunk_size=7))
    assert isinstance(loss, ChunkedClipLoss) and loss.chunk_size == 7
    assert loss.max_logit_scale == pytest.approx(math.log(100.0))
    assert isinstance(build_loss(LossConfig(name="clip", impl="naive")), NaiveClipLoss)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_chunk_size_raises(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedClipLoss(chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedSigLipLoss(chunk_size=bad)


def test_bad_features_raise():
    t, b = torch.tensor(1.0), torch.tensor(-1.0)
    img, txt = make_batch(4, 8, torch.float32, 0)
    for loss in (ChunkedClipLoss(chunk_size=2), ChunkedSigLipLoss(chunk_size=2)):
        with pytest.raises(ValueError, match="same shape"):
            loss(img, txt[:3], t, b)
        with pytest.raises(ValueError, match="matrix"):
            loss(img[0], txt[0], t, b)
        with pytest.raises(ValueError, match="dtype"):
            loss(img, txt.double(), t, b)
        with pytest.raises(ValueError, match="empty"):
            loss(img[:0], txt[:0], t, b)
    with pytest.raises(ValueError, match="logit_bias"):
        ChunkedSigLipLoss(chunk_size=2)(img, txt, t, None)


def test_never_materialises_the_logits_matrix():
    """No op output during forward+backward is larger than a tile or a feature matrix; the naive one is B x B."""
    n, d, chunk = 256, 16, 32
    img, txt = make_batch(n, d, torch.float32, 0)
    bound = max(n * d, chunk * chunk) * 4
    for name, (max_scale, t, b) in (("clip", CLIP_PARAMS[0]), ("siglip", SIGLIP_PARAMS[0])):
        with MaxStorage() as probe:
            loss_and_grads(chunked(name, max_scale, chunk), img, txt, t, b)
        assert probe.max_bytes <= bound, (name, probe.max_bytes, bound)
    with MaxStorage() as probe:
        loss_and_grads(NaiveSigLipLoss(), img, txt, math.log(10.0), -10.0)
    assert probe.max_bytes >= n * n * 4  # the probe does see a B x B matrix when there is one


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tile_kernels_fast_and_safe_paths_agree(dtype):
    """Both branches of the single-exp tile kernels give the textbook values."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 23, generator=g, dtype=torch.float64) * 30).to(dtype)
    want_row, want_col = torch.logsumexp(x, 1), torch.logsumexp(x, 0)
    for headroom in (-1.0, math.inf):
        row, col = _lse_tile(x.clone(), headroom)
        torch.testing.assert_close(row, want_row, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
        torch.testing.assert_close(col, want_col, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    # Gradient tile against global LSEs that bound the tile (as they do in the loss).
    lr = want_row + torch.rand(37, generator=g, dtype=torch.float64).to(dtype)
    lc = want_col + torch.rand(23, generator=g, dtype=torch.float64).to(dtype)
    want = torch.exp(x - lr[:, None]) + torch.exp(x - lc[None, :])
    for headroom in (-1.0, math.inf):
        got = _softmax_grad_tile(x.clone(), torch.empty_like(x), lr, lc, headroom)
        # Entries are probabilities (<= 2); fp32 ones below 1e-20 are at the underflow limit of either path.
        torch.testing.assert_close(
            got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-20 if dtype == torch.float32 else 0
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_take_the_safe_paths_and_stay_exact(dtype):
    """Logit spreads beyond the single-exp headroom (clip) and exp overflow risk (siglip) are still exact."""
    n, d = 40, 8
    img, txt = make_batch(n, d, torch.float64, 3)
    img[: n // 2] = txt[0]  # half the images align with one text, half oppose it: logits span +-|s|
    img[n // 2 :] = -txt[0]
    norm = 4.0 if dtype == torch.float64 else 1.0  # fp64 headroom (354) needs unnormalised features to exceed
    img, txt = (img * norm).to(dtype), txt.to(dtype)
    loss_tol, grad_tol = TOL[dtype]
    ref = reference("clip", img, txt, None, math.log(100.0), None)
    got = loss_and_grads(chunked("clip", None, 16), img, txt, math.log(100.0), None)
    errs = rel_errors(got, ref)
    assert errs[0] <= loss_tol and max(errs[1:]) <= grad_tol, errs
    t = math.log(100.0) if dtype == torch.float32 else math.log(800.0)  # s * |I| * |T| + b beyond log(max)
    ref = reference("siglip", img, txt, None, t, 3.0)
    got = loss_and_grads(chunked("siglip", None, 16), img, txt, t, 3.0)
    errs = rel_errors(got, ref)
    assert errs[0] <= loss_tol and max(errs[1:]) <= grad_tol, errs


def test_no_grad_forward_equals_reference():
    img, txt = make_batch(50, 16, torch.float64, 1)
    t, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    with torch.no_grad():
        got_s = ChunkedSigLipLoss(chunk_size=8)(img, txt, t, b)
        got_c = ChunkedClipLoss(chunk_size=8)(img, txt, t)
    assert not got_s.requires_grad
    assert float(got_s) == pytest.approx(float(siglip_loss_reference(img, txt, t, b)), rel=1e-13)
    assert float(got_c) == pytest.approx(float(clip_loss_reference(img, txt, t)), rel=1e-13)


def test_upstream_gradient_and_frozen_inputs():
    """Gradients scale with the upstream gradient; inputs that need no gradient get none."""
    img, txt = make_batch(20, 16, torch.float64, 2)
    for loss in (ChunkedClipLoss(chunk_size=6), ChunkedSigLipLoss(chunk_size=6)):
        i1, t1 = img.clone().requires_grad_(), txt.clone()
        s1 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        b1 = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
        (2.5 * loss(i1, t1, s1, b1)).backward()
        i2 = img.clone().requires_grad_()
        s2 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        b2 = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
        loss(i2, txt, s2, b2).backward()
        torch.testing.assert_close(i1.grad, 2.5 * i2.grad, rtol=1e-13, atol=0)
        torch.testing.assert_close(s1.grad, 2.5 * s2.grad, rtol=1e-13, atol=0)
        assert t1.grad is None


def test_temperature_clamp_blocks_gradient_like_reference():
    img, txt = make_batch(30, 16, torch.float64, 4)
    t = math.log(200.0)  # above the clamp log(100)
    got = loss_and_grads(chunked("clip", math.log(100.0), 8), img, txt, t, None)
    ref = reference("clip", img, txt, math.log(100.0), t, None)
    assert float(got[3]) == 0.0 == float(ref[3])
    assert max(rel_errors(got, ref)[:3]) <= 1e-12


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_bf16_inputs_accumulate_in_fp32(name):
    """16-bit features: tiles and sums in fp32, so the loss matches the fp32 reference on the same values."""
    img, txt = make_batch(48, 32, torch.bfloat16, 5)
    max_scale, t, b = (CLIP_PARAMS if name == "clip" else SIGLIP_PARAMS)[0]
    got = loss_and_grads(chunked(name, max_scale, 16), img, txt, t, b)
    ref = reference(name, img.float(), txt.float(), max_scale, t, b)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    errs = rel_errors(got, ref)
    assert errs[0] <= 1e-5, errs
    assert max(errs[1:3]) <= 1e-2 and max(errs[3:]) <= 1e-4, errs  # feature grads rounded to bf16 once
