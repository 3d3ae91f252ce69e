"""vlp's SSL losses and DINO step against lightly 1.6 (the reference of scripts/benchmarks/ssl_reference.py) on the
same tensors. Skipped without lightly (``pip install -e .[benchmark]``)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightly")
from lightly.loss import DINOLoss as LightlyDINOLoss  # noqa: E402
from lightly.loss import NegativeCosineSimilarity, NTXentLoss  # noqa: E402

from vlp.config import PRETRAIN_ALIASES, parse_cli  # noqa: E402
from vlp.distributed import world_info  # noqa: E402
from vlp.model import build_model, load_preset  # noqa: E402
from vlp.objectives import get_objective, run_config_class  # noqa: E402
from vlp.ssl.backbone import backbone_dim  # noqa: E402
from vlp.ssl.byol import byol_loss  # noqa: E402
from vlp.ssl.dino import DINOLoss  # noqa: E402
from vlp.ssl.moco import moco_v2_loss  # noqa: E402
from vlp.ssl.simclr import nt_xent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"))
from ssl_lightly import build_arm  # noqa: E402


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_nt_xent_moco_v2_and_byol_losses_equal_lightly():
    z1, z2 = _randn(6, 5, seed=1), _randn(6, 5, seed=2)
    ref = NTXentLoss(temperature=0.1)(z1, z2)
    assert nt_xent(F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), 0.1)[0].item() == pytest.approx(ref.item())

    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(12, 5)).double()
    queue = criterion.memory_bank.bank.clone().t()  # (dim, K), as vlp's KeyQueue holds it
    q, k = _randn(6, 5, seed=3).requires_grad_(), _randn(6, 5, seed=4)
    ref = criterion(q, k)  # the memory bank enqueues k after reading it
    ours = moco_v2_loss(F.normalize(q, dim=-1), F.normalize(k, dim=-1), queue, 0.2)[0]
    assert ours.item() == pytest.approx(ref.item())
    torch.testing.assert_close(criterion.memory_bank.bank[:6], F.normalize(k, dim=-1))

    p, z = _randn(6, 5, seed=5), _randn(6, 5, seed=6)
    assert byol_loss(p, z).item() == pytest.approx(2 + 2 * NegativeCosineSimilarity()(p, z).item())


def test_dino_loss_and_centre_equal_lightly_over_steps():
    ours, ref = DINOLoss(16).double(), LightlyDINOLoss(16, warmup_teacher_temp_epochs=0).double()
    for step in range(3):
        student = [_randn(4, 16, seed=10 * step + v) for v in range(5)]  # 2 global + 3 local crops
        teacher = [_randn(4, 16, seed=10 * step + 7 + v) for v in range(2)]
        expected = ref(teacher, student, teacher_temp=0.04)
        got = ours(torch.cat(student), torch.cat(teacher), num_crops=5, teacher_temp=0.04)
        assert got.item() == pytest.approx(expected.item(), rel=1e-7)  # lightly divides by a float32 temperature
        torch.testing.assert_close(ours.center, ref.center.reshape(1, -1))


def _copy_dino_head(vlp_head, lightly_head) -> None:
    """vlp's DINOHead weights into lightly's DINOProjectionHead (no batch norm: same layers, same functions)."""
    ours = [m for m in vlp_head.mlp if isinstance(m, torch.nn.Linear)]
    theirs = [m for m in lightly_head.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for a, b in zip(ours, theirs, strict=True):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        lightly_head.last_layer.weight_v.copy_(vlp_head.last_v)
        lightly_head.last_layer.weight_g.copy_(vlp_head.last_g)


def test_dino_step_equals_lightly_on_the_same_weights_and_views():
    """One DINO step of the whole method (student on 2 global + 2 local crops, EMA teacher on the global ones, centred
    and sharpened): the loss and every backbone gradient equal lightly's, and so does the teacher after an update."""
    args = ["--objective", "dino", "--model", "tiny-resnet", "--batch-size", "4", "--ssl.dino.out_dim", "32"]
    args += ["--ssl.dino.hidden_dim", "32", "--ssl.dino.bottleneck_dim", "16", "--ssl.dino.local_crops", "2"]
    args += ["--ssl.dino.freeze_last_layer_epochs", "0", "--ssl.views.local_crop_size", "32"]
    cfg = parse_cli(run_config_class(), args, PRETRAIN_ALIASES)
    preset = load_preset("tiny-resnet")
    obj = get_objective("dino").build(cfg, world_info(), model=build_model(preset), preset=preset)
    arm = build_arm("dino", copy.deepcopy(obj.visual.trunk), backbone_dim(obj.visual), cfg, obj.method)
    _copy_dino_head(obj.method.head, arm.head)
    _copy_dino_head(obj.method.head, arm.teacher["head"])
    obj.train(), arm.train()
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)]
    views += [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]

    ours, _ = obj({"ssl_views": views})
    theirs, _ = arm.loss(views, 0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours.backward()
    theirs.backward()
    for (name, a), b in zip(obj.visual.trunk.named_parameters(), arm.backbone.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(obj.method.loss_fn.center, arm.criterion.center.reshape(1, -1))

    with torch.no_grad():  # the same student move on both sides, then each library's EMA update
        for a, b in zip(obj.visual.trunk.parameters(), arm.backbone.parameters(), strict=True):
            noise = 0.01 * torch.randn(a.shape, generator=g)
            a.add_(noise), b.add_(noise)
    obj.after_step(1, 10)
    arm.after_step(0, 10)
    assert obj.method.momentum == pytest.approx(arm.momentum) == pytest.approx(cfg.ssl.dino.momentum)
    teacher = obj.method.teacher["backbone"].trunk
    for a, b in zip(teacher.parameters(), arm.teacher["backbone"].parameters(), strict=True):
        torch.testing.assert_close(a, b)
