"""Shared SSL pieces: schedules, the EMA teacher, the key queue, backbone features, views, objectives in both modes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_pipelines.collate import collate
from data_pipelines.ssl_views import byol_specs, default_local_size, multicrop_views, simclr_views
from vlp.config import PRETRAIN_ALIASES, ConfigError, PretrainConfig, parse_cli
from vlp.distributed import world_info
from vlp.model import build_model, load_preset
from vlp.objectives import OBJECTIVES, get_objective, run_config_class
from vlp.objectives.registry import resolve
from vlp.ssl.backbone import backbone_dim, backbone_features, multi_view_features, patch_size
from vlp.ssl.ema import EMATeacher
from vlp.ssl.moco import KeyQueue
from vlp.ssl.schedules import cosine_increase, epoch_num_samples, linear_warmup, steps_per_epoch

SMALL_HEADS = [
    "--ssl.simclr.hidden_dim",
    "64",
    "--ssl.simclr.out_dim",
    "32",
    "--ssl.byol.hidden_dim",
    "64",
    "--ssl.byol.out_dim",
    "32",
    "--ssl.moco.hidden_dim",
    "64",
    "--ssl.moco.out_dim",
    "32",
    "--ssl.dino.out_dim",
    "64",
    "--ssl.dino.hidden_dim",
    "64",
    "--ssl.dino.bottleneck_dim",
    "32",
    "--ssl.dino.local_crops",
    "2",
    "--ssl.views.local_crop_size",
    "32",
    "--ssl.moco.queue_size",
    "64",
]


def _cfg(*args: str) -> PretrainConfig:
    return parse_cli(run_config_class(), [*SMALL_HEADS, "--batch-size", "4", *args], PRETRAIN_ALIASES)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


# ---- schedules ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [0.996, 0.99])
def test_momentum_cosine_schedule_start_middle_end(base):
    assert cosine_increase(base, 1.0, 0, 1000) == pytest.approx(base, abs=1e-15)
    assert cosine_increase(base, 1.0, 500, 1000) == pytest.approx((base + 1) / 2, abs=1e-15)
    assert cosine_increase(base, 1.0, 1000, 1000) == pytest.approx(1.0, abs=1e-15)
    # BYOL's form: 1 - (1 - base) (cos(pi k / K) + 1) / 2
    assert cosine_increase(base, 1.0, 250, 1000) == pytest.approx(1 - (1 - base) * (math.cos(math.pi / 4) + 1) / 2)


def test_teacher_temperature_warmup_start_middle_end():
    assert linear_warmup(0.04, 0.07, 0, 31) == pytest.approx(0.04)
    assert linear_warmup(0.04, 0.07, 15, 31) == pytest.approx(0.055)
    assert linear_warmup(0.04, 0.07, 30, 31) == pytest.approx(0.07)
    assert linear_warmup(0.04, 0.07, 500, 31) == pytest.approx(0.07)
    assert np.allclose([linear_warmup(0.04, 0.07, i, 5) for i in range(5)], np.linspace(0.04, 0.07, 5))
    assert linear_warmup(0.04, 0.04, 0, 0) == 0.04


def test_epoch_length_and_missing_epoch_size_error():
    assert steps_per_epoch(40000, 64) == 625
    assert steps_per_epoch(100, 64) == 2
    cfg = _cfg()
    assert epoch_num_samples(cfg) == cfg.data.synthetic_train_samples  # the synthetic set
    assert epoch_num_samples(_cfg("--train-shards", "x.tar", "--train-num-samples", "1234")) == 1234
    with pytest.raises(ConfigError, match="--train-num-samples"):
        epoch_num_samples(_cfg("--train-shards", "x.tar"))


# ---- EMA teacher ----------------------------------------------------------------------------------------------


def test_ema_teacher_parameters_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMATeacher({"net": student})
    teacher = ema["net"]
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(8, 3))  # moves BN running stats and num_batches_tracked
    t_before = [p.clone() for p in teacher.parameters()]
    b_before = [b.clone() for b in teacher.buffers()]
    ema.update({"net": student}, 0.9)
    for t, t0, s in zip(teacher.parameters(), t_before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    for t, t0, s in zip(teacher.buffers(), b_before, student.buffers()):
        if t.is_floating_point():
            torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
        else:
            assert int(t) == int(s) == 1  # integer buffers are copied
    ema.update({"net": student}, 1.0)  # momentum 1: frozen
    ema.update({"net": student}, 0.0)  # momentum 0: a copy
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def test_ema_teacher_in_bf16_keeps_an_fp32_average():
    """Under DeepSpeed bf16 the teacher is bf16; (1 - m) x a small difference must still move it."""
    student = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    ema = EMATeacher({"net": student})
    ema.to(torch.bfloat16)
    student.to(torch.bfloat16)
    with torch.no_grad():
        student.weight.fill_(1.0078125)  # the next bf16 value above 1
    ref = 1.0
    for _ in range(200):
        ema.update({"net": student}, 0.996)
        ref = 0.996 * ref + 0.004 * 1.0078125
    naive = torch.tensor(1.0, dtype=torch.bfloat16) * 0.996 + torch.tensor(1.0078125, dtype=torch.bfloat16) * 0.004
    assert naive.item() == 1.0  # a plain bf16 update would never move
    assert ema._shadow["net"][0].item() == pytest.approx(ref, abs=1e-5)  # fp32 rounding
    assert ema["net"].weight.item() == pytest.approx(ref, abs=4e-3) and ema["net"].weight.item() > 1.0


# ---- MoCo v2 queue --------------------------------------------------------------------------------------------


def test_key_queue_is_fifo():
    q = KeyQueue(dim=2, size=6)
    batches = [torch.full((2, 2), float(i)) for i in range(1, 5)]
    q.enqueue(batches[0])
    q.enqueue(batches[1])
    q.enqueue(batches[2])
    assert q.keys[0].tolist() == [1, 1, 2, 2, 3, 3] and int(q.ptr) == 0
    q.enqueue(batches[3])  # the oldest keys (batch 1) are replaced first
    assert q.keys[0].tolist() == [4, 4, 2, 2, 3, 3] and int(q.ptr) == 2


def test_moco_v2_queue_must_be_a_multiple_of_the_global_batch():
    preset = load_preset("tiny")
    cfg = _cfg("--objective", "moco", "--ssl.moco.version", "2", "--ssl.moco.queue_size", "100", "--batch-size", "24")
    with pytest.raises(ConfigError, match=r"queue_size 100 is not a multiple of the global batch 24.*96 or 120"):
        get_objective("moco").build(cfg, world_info(), model=build_model(preset), preset=preset)


# ---- backbone features ----------------------------------------------------------------------------------------


def test_backbone_features_equal_the_dual_tower_and_take_small_crops():
    model = build_model("tiny").eval()
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(backbone_features(model.visual, x), model.image_backbone_features(x))
    small = torch.randn(3, 3, 32, 32)
    feats = multi_view_features(model.visual, [x, x, small, small])
    assert [f.shape for f in feats] == [torch.Size([3, 128])] * 4
    torch.testing.assert_close(feats[2], backbone_features(model.visual, small))


def test_convolutional_tower_takes_any_crop_size():
    model = build_model("tiny-resnet").eval()
    x, small = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone_features(model.visual, x), model.image_backbone_features(x))
    assert backbone_features(model.visual, small).shape == (2, 256) and patch_size(model.visual) == 1
    assert backbone_dim(model.visual) == 256 and patch_size(build_model("tiny").visual) == 8


# ---- views ----------------------------------------------------------------------------------------------------


def test_views_shapes_and_recipes():
    img = _images(1)[0]
    a, b = simclr_views(64, (0.3, 1.0))(img)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == torch.float32 and not torch.equal(a, b)
    first, second = byol_specs(64)
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    mc = multicrop_views(64, 32, 3)
    crops = mc(img)
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3 and mc.sizes == [64, 64, 32, 32, 32]
    assert default_local_size(224, 16) == 96 and default_local_size(64, 8) == 24


# ---- objectives, standalone and auxiliary ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simclr", "moco", "byol", "dino"])
def test_standalone_objective_trains_only_the_image_tower(name):
    preset = load_preset("tiny")
    model = build_model(preset)
    obj = get_objective(name).build(_cfg("--objective", name), world_info(), model=model, preset=preset)
    assert obj.requires_text is False
    own = {id(p) for p in obj.parameters()}
    assert not any(id(p) in own for p in model.clip.transformer.parameters())  # no text tower
    assert not model.visual.proj.requires_grad  # the image-text projection is unused and frozen
    samples = [obj.sample_transform({"image": im, "text": None, "json": None}) for im in _images(4)]
    loss, logs = obj(collate(samples))
    loss.backward()
    assert torch.isfinite(loss) and logs[f"loss/{name}"] == loss.detach()
    trainable = [n for n, p in obj.named_parameters() if p.requires_grad]
    missing = [n for n, p in obj.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable and not missing  # every trainable parameter is used: DDP needs no find_unused_parameters
    assert all(p.grad is None for p in obj.method.parameters() if not p.requires_grad)


def test_auxiliary_term_adds_weighted_ssl_loss_to_siglip():
    preset = load_preset("tiny")
    cfg = _cfg("--loss", "siglip", "--aux-ssl", "simclr", "--aux-ssl-weight", "0.5")
    model = build_model(preset, cfg.loss)
    obj = get_objective("siglip").build(cfg, world_info(), model=model, preset=preset)
    assert {n for n, sp in OBJECTIVES.items() if sp.auxiliary} >= {"simclr", "moco", "byol", "dino"}
    samples = [obj.sample_transform({"image": im, "text": "a red circle", "json": None}) for im in _images(4)]
    loss, logs = obj(collate(samples))
    assert loss.item() == pytest.approx(logs["loss/contrastive"].item() + 0.5 * logs["loss/simclr"].item(), rel=1e-6)
    loss.backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0 and model.visual.proj.grad.abs().sum() > 0


def test_simclr_projection_ends_in_a_batch_norm_like_simclr_and_lightly():
    """SimCLR's own projection head (and lightly's SimCLRProjectionHead) batch-normalises its output; without it vlp's
    SimCLR learnt position to 24.7% k-NN where lightly's reached 31.5% (docs/ssl.md, vlp vs lightly)."""
    preset = load_preset("tiny")
    obj = get_objective("simclr").build(
        _cfg("--objective", "simclr"), world_info(), model=build_model(preset), preset=preset
    )
    head = obj.method.head
    assert [type(m).__name__ for m in head][-2:] == ["Linear", "GlobalBatchNorm1d"] and head[-1].affine
    z = head(torch.randn(8, backbone_dim(obj.visual), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(32), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.var(dim=0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)
    plain = get_objective("simclr").build(
        _cfg("--objective", "simclr", "--ssl.simclr.last_batch_norm", "false"),
        world_info(),
        model=build_model(preset),
        preset=preset,
    )
    assert type(plain.method.head[-1]).__name__ == "Linear"  # SLIP's head, on request


def test_unknown_aux_ssl_is_a_config_error():
    preset = load_preset("tiny")
    with pytest.raises(ConfigError, match="unknown --aux-ssl 'simsiam'; valid: byol, dino, moco, simclr"):
        get_objective("siglip").build(
            _cfg("--aux-ssl", "simsiam"), world_info(), model=build_model(preset), preset=preset
        )


def test_dino_schedules_inside_the_method():
    preset = load_preset("tiny")
    cfg = _cfg(
        "--objective",
        "dino",
        "--ssl.dino.freeze_last_layer_epochs",
        "1",
        "--train-num-samples",
        "12",
        "--ssl.dino.teacher_temp",
        "0.07",
        "--ssl.dino.warmup_teacher_temp_steps",
        "3",
    )
    obj = get_objective("dino").build(cfg, world_info(), model=build_model(preset), preset=preset)
    method = obj.method
    assert method.freeze_last_layer_steps == 3  # 12 samples / global batch 4
    batch = collate([obj.sample_transform({"image": im, "text": None, "json": None}) for im in _images(4)])
    seen = []
    for step in range(1, 6):
        loss, logs = obj(batch)
        loss.backward()
        seen.append(
            (
                logs["ssl/dino/last_layer_frozen"],
                round(logs["ssl/dino/teacher_temp"], 6),
                float(method.head.last_v.grad.abs().max()),
            )
        )
        obj.zero_grad()
        obj.after_step(step, 10)
    assert [s[0] for s in seen] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [s[1] for s in seen] == [0.04, 0.055, 0.07, 0.07, 0.07]
    assert all(s[2] == 0 for s in seen[:3]) and all(s[2] > 0 for s in seen[3:])
    assert method.momentum == pytest.approx(cosine_increase(0.996, 1.0, 4, 10))


def test_byol_teacher_follows_the_scheduled_ema():
    preset = load_preset("tiny")
    obj = get_objective("byol").build(
        _cfg("--objective", "byol"), world_info(), model=build_model(preset), preset=preset
    )
    method = obj.method
    with torch.no_grad():
        for p in obj.visual.parameters():
            p.add_(0.01)
    teacher_before = [p.clone() for p in method.teacher["backbone"].parameters()]
    obj.after_step(51, 100)  # 0-based index 50 of 100: the middle of the cosine
    m = method.momentum
    assert m == pytest.approx((0.996 + 1) / 2)
    for t, t0, s in zip(method.teacher["backbone"].parameters(), teacher_before, obj.visual.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)


SSL_DEMO_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "ssl").glob("*-tiny.yaml"))


def test_the_ssl_demo_configs_are_all_there():
    assert [p.name for p in SSL_DEMO_CONFIGS] == [
        "byol-tiny.yaml",
        "dino-tiny.yaml",
        "moco-tiny.yaml",
        "siglip-simclr-tiny.yaml",
        "simclr-tiny.yaml",
    ]


@pytest.mark.parametrize("path", SSL_DEMO_CONFIGS, ids=lambda p: p.stem)
def test_shipped_ssl_demo_configs_parse_and_build(path):
    """Each configs/ssl/*-tiny.yaml parses, names a known preset, and builds its objective on that preset."""
    cfg = parse_cli(run_config_class(), ["--config", str(path)], PRETRAIN_ALIASES)
    preset = load_preset(cfg.model.name)
    obj = resolve(cfg).build(cfg, world_info(), model=build_model(preset), preset=preset)
    views = obj.sample_transform({"image": _images(1)[0], "text": "a red circle", "json": None})["ssl_views"]
    side = preset.vision_cfg["image_size"]
    assert len(views) == 2 + (cfg.ssl.dino.local_crops if cfg.objective == "dino" else 0)
    assert views[0].shape == views[1].shape == (3, side, side)


def test_runs_are_named_for_what_they_train():
    from vlp.train.trainer import resolve_output_dir

    dino = parse_cli(run_config_class(), ["--objective", "dino"], PRETRAIN_ALIASES)
    assert resolve_output_dir(dino).name.endswith("-dino")
    clip = parse_cli(run_config_class(), ["--loss", "clip", "--aux-ssl", "simclr"], PRETRAIN_ALIASES)
    assert resolve_output_dir(clip).name.endswith("-clip")
