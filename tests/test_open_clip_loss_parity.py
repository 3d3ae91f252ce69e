"""The reference CLIP/SigLIP losses equal open_clip's ClipLoss / SigLipLoss: loss and every gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from vlp.config import LossConfig
from vlp.losses import build_loss


def features(n=12, d=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    return img, txt


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("t", [math.log(1 / 0.07), math.log(100.0), 0.3])
def test_clip_matches_open_clip(t):
    img, txt = features()
    scale = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    ours = build_loss(LossConfig(name="clip", impl="naive"))(img, txt, scale)
    theirs = ClipLoss()(img, txt, scale.exp())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for a, b in zip(grads(ours, img, txt, scale), grads(theirs, img, txt, scale)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_clip_scale_is_clamped_at_log_100():
    img, txt = features()
    scale = torch.tensor(math.log(500.0), dtype=torch.float64, requires_grad=True)
    ours = build_loss(LossConfig(name="clip"))(img, txt, scale)
    theirs = ClipLoss()(img, txt, torch.tensor(100.0, dtype=torch.float64))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert grads(ours, scale)[0].item() == 0.0


@pytest.mark.parametrize("t, b", [(math.log(10.0), -10.0), (1.7, -3.0)])
def test_siglip_matches_open_clip(t, b):
    img, txt = features()
    scale = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    ours = build_loss(LossConfig(name="siglip", impl="naive"))(img, txt, scale, bias)
    theirs = SigLipLoss()(img, txt, scale.exp(), bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for a, c in zip(grads(ours, img, txt, scale, bias), grads(theirs, img, txt, scale, bias)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-14)


def test_siglip_formula_by_hand():
    img, txt = features(n=3, d=4)
    t, b = torch.tensor(0.5, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    logits = math.exp(0.5) * img @ txt.T - 1.0
    expected = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            expected -= math.log(1 / (1 + math.exp(-z * logits[i, j].item())))
    ours = build_loss(LossConfig(name="siglip", impl="naive"))(img, txt, t, b)
    assert ours.item() == pytest.approx(expected / 3, rel=1e-12)
