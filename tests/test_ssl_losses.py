"""SSL losses against independent transcriptions of their reference formulas, and their known collapsed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.ssl.byol import byol_loss
from vlp.ssl.dino import DINOLoss
from vlp.ssl.heads import DINOHead, GlobalBatchNorm1d, mlp
from vlp.ssl.moco import moco_v2_loss, moco_v3_loss
from vlp.ssl.simclr import nt_xent


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR eq. (1) averaged over all 2N anchors, written out term by term."""
    z = torch.cat([z1, z2]).tolist()
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sims = [sum(a * b for a, b in zip(z[i], z[j])) / t for j in range(n2)]
        denom = sum(math.exp(sims[j]) for j in range(n2) if j != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n2


def test_nt_xent_matches_reference_formula():
    z1, z2 = _unit(6, 5, seed=1), _unit(6, 5, seed=2)
    loss, acc = nt_xent(z1, z2, 0.1)
    assert loss.item() == pytest.approx(_nt_xent_reference(z1, z2, 0.1), rel=1e-10)
    assert 0.0 <= acc.item() <= 1.0


@pytest.mark.parametrize("n", [2, 8])
def test_nt_xent_collapsed_is_log_2n_minus_1(n):
    z = F.normalize(torch.ones(n, 16, dtype=torch.float64), dim=-1)
    loss, _ = nt_xent(z, z.clone(), 0.1)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-12)


def test_moco_v3_loss_matches_reference_and_collapse():
    q, k, t = _unit(5, 4, seed=3), _unit(5, 4, seed=4), 0.2
    ref = 0.0
    for i in range(5):
        logits = [float(q[i] @ k[j]) / t for j in range(5)]
        ref += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    ref = ref / 5 * 2 * t
    assert moco_v3_loss(q, k, t).item() == pytest.approx(ref, rel=1e-10)
    same = F.normalize(torch.ones(5, 4, dtype=torch.float64), dim=-1)
    assert moco_v3_loss(same, same, t).item() == pytest.approx(2 * t * math.log(5), rel=1e-12)


def test_moco_v2_loss_matches_reference_and_collapse():
    q, k, t = _unit(3, 4, seed=5), _unit(3, 4, seed=6), 0.2
    queue = _unit(7, 4, seed=7).t()
    ref = 0.0
    for i in range(3):
        logits = [float(q[i] @ k[i]) / t] + [float(q[i] @ queue[:, j]) / t for j in range(7)]
        ref += -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    loss, acc = moco_v2_loss(q, k, queue, t)
    assert loss.item() == pytest.approx(ref / 3, rel=1e-10)
    same = F.normalize(torch.ones(3, 4, dtype=torch.float64), dim=-1)
    loss, _ = moco_v2_loss(same, same, same[:1].t().expand(4, 7), t)
    assert loss.item() == pytest.approx(math.log(8), rel=1e-12)  # ln(K + 1)


def test_byol_loss_matches_reference_and_limits():
    g = torch.Generator().manual_seed(8)
    p, z = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = sum(2 - 2 * float(p[i] @ z[i]) / (float(p[i].norm()) * float(z[i].norm())) for i in range(4)) / 4
    assert byol_loss(p, z).item() == pytest.approx(ref, rel=1e-12)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-12)  # aligned predictions: 0
    assert byol_loss(p, -p).item() == pytest.approx(4.0, rel=1e-12)  # opposite: 4
    pz = p.clone().requires_grad_(True)
    zz = z.clone().requires_grad_(True)
    byol_loss(pz, zz).backward()
    assert zz.grad is None and pz.grad.abs().sum() > 0  # the target gets no gradient


def _dino_reference(student, teacher, center, n_crops, t_s, t_t):
    """DINO Algorithm 1 / eq. (3): H(P_t(x), P_s(x')) over global x and every other crop x', averaged."""
    b = teacher.shape[0] // 2
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            for r in range(b):
                tl = [(teacher[iq * b + r, d] - center[0, d]).item() / t_t for d in range(teacher.shape[1])]
                tz = sum(math.exp(x) for x in tl)
                sl = [student[v * b + r, d].item() / t_s for d in range(student.shape[1])]
                log_z = math.log(sum(math.exp(x) for x in sl))
                total += sum(-(math.exp(tl[d]) / tz) * (sl[d] - log_z) for d in range(len(sl))) / b
            terms += 1
    return total / terms


def test_dino_loss_matches_reference_and_updates_center():
    g = torch.Generator().manual_seed(9)
    n_crops, b, k = 4, 3, 7
    student = torch.randn(n_crops * b, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(2 * b, k, generator=g, dtype=torch.float64)
    loss_fn = DINOLoss(k, student_temp=0.1, center_momentum=0.9).double()
    loss_fn.center.copy_(0.1 * torch.randn(1, k, generator=g, dtype=torch.float64))
    center_before = loss_fn.center.clone()
    loss = loss_fn(student, teacher, n_crops, teacher_temp=0.04)
    ref = _dino_reference(student, teacher, center_before, n_crops, 0.1, 0.04)
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    expected_center = 0.9 * center_before + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)


@pytest.mark.parametrize("out_dim", [16, 65536])
def test_dino_collapsed_student_gives_log_out_dim(out_dim):
    g = torch.Generator().manual_seed(10)
    student = torch.full((4 * 2, out_dim), 0.3)  # the same logit everywhere: a uniform student distribution
    teacher = torch.randn(2 * 2, out_dim, generator=g)
    loss = DINOLoss(out_dim)(student, teacher, 4, teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(out_dim), rel=1e-5)


def test_dino_head_weight_norm_and_frozen_last_layer():
    head = DINOHead(12, out_dim=10, hidden_dim=16, bottleneck_dim=8, num_layers=3)
    x = torch.randn(5, 12)
    out = head(x)
    w = head.last_v / head.last_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, F.normalize(head.mlp(x), dim=-1) @ w.t())
    assert not head.last_g.requires_grad and torch.all(head.last_g == 1)  # norm_last_layer: g fixed to 1
    head.freeze_last_layer = True
    head(x).pow(2).sum().backward()
    assert head.last_v.grad is not None and head.last_v.grad.abs().max().item() == 0.0
    assert head.mlp[0].weight.grad.abs().max().item() > 0
    head.zero_grad()
    head.freeze_last_layer = False
    head(x).pow(2).sum().backward()
    assert head.last_v.grad.abs().max().item() > 0


def test_global_batch_norm_is_batch_norm_on_one_process():
    torch.manual_seed(0)
    ours, ref = GlobalBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(8, 6)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    head = mlp(6, 32, 4, 3, last_batch_norm=True, bias=False)
    assert [type(m).__name__ for m in head] == [
        "Linear",
        "GlobalBatchNorm1d",
        "ReLU",
        "Linear",
        "GlobalBatchNorm1d",
        "ReLU",
        "Linear",
        "GlobalBatchNorm1d",
    ]
    assert head[-1].weight is None and head[0].bias is None  # MoCo v3: non-affine last BN, no biases
