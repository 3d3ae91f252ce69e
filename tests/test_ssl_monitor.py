"""Representation checks (k-NN top-1, collapse statistic) and short end-to-end SSL runs through the training loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlp.config import PRETRAIN_ALIASES, parse_cli
from vlp.objectives import run_config_class
from vlp.ssl.base import collapse_statistic
from vlp.ssl.monitor import RepresentationMonitor, knn_top1


def _knn_reference(feats: torch.Tensor, labels: list[int], k: int, t: float) -> float:
    """Leave-one-out weighted k-NN written out: sort the others by cosine similarity, vote exp(sim / t)."""
    f = torch.nn.functional.normalize(feats.double(), dim=-1).tolist()
    correct = 0
    for i, fi in enumerate(f):
        sims = sorted(((sum(a * b for a, b in zip(fi, fj)), j) for j, fj in enumerate(f) if j != i), reverse=True)
        votes: dict[int, float] = {}
        for s, j in sims[:k]:
            votes[labels[j]] = votes.get(labels[j], 0.0) + math.exp(s / t)
        correct += max(votes, key=votes.get) == labels[i]
    return correct / len(f)


def test_knn_top1_matches_reference_and_extremes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40,), generator=g)
    centers = torch.randn(3, 8, generator=g)
    feats = centers[labels] + 1.5 * torch.randn(40, 8, generator=g)
    acc = knn_top1(feats, labels, k=5, temperature=0.07)
    assert acc == pytest.approx(_knn_reference(feats, labels.tolist(), 5, 0.07))
    assert 0.4 < acc < 1.0
    assert knn_top1(centers[labels] + 1e-3 * torch.randn(40, 8, generator=g), labels) == 1.0


def test_collapse_statistic():
    g = torch.Generator().manual_seed(1)
    assert float(collapse_statistic(torch.ones(100, 32))) == pytest.approx(0.0, abs=1e-7)
    iso = torch.randn(4000, 64, generator=g)
    assert float(collapse_statistic(iso)) == pytest.approx(1.0, abs=0.03)  # isotropic: 1/sqrt(d) per dimension
    # centred: features sharing a large common direction (a ReLU tower's) still read as spread; uncentred, the
    # SimSiam statistic reads them as near-collapse
    shifted = torch.relu(torch.randn(1000, 256, generator=g) + 3)
    uncentred = torch.nn.functional.normalize(shifted, dim=-1).std(dim=0).mean() * 16
    assert float(collapse_statistic(shifted)) == pytest.approx(1.0, abs=0.03) and uncentred < 0.35
    # one direction plus a little noise is near-collapse either way
    line = torch.randn(1, 64, generator=g) * 10 + 0.01 * torch.randn(500, 64, generator=g)
    assert float(collapse_statistic(line)) > 0.5  # the noise is isotropic once the common direction is removed


@pytest.mark.parametrize("name", ["simclr", "moco-3", "moco-2", "byol", "dino"])
def test_z_std_is_the_collapse_statistic_of_the_first_views_backbone_features(name):
    """One meaning of ``ssl/<method>/z_std`` for every method (docs/ssl.md)."""
    from vlp.distributed import world_info
    from vlp.model import build_model, load_preset
    from vlp.objectives import get_objective
    from vlp.ssl.backbone import backbone_features

    method, _, version = name.partition("-")
    args = ["--objective", method, "--batch-size", "4", "--ssl.dino.local_crops", "2"]
    args += ["--ssl.views.local_crop_size", "32", "--ssl.moco.queue_size", "16"]
    args += ["--ssl.moco.version", version] if version else []
    cfg = parse_cli(run_config_class(), args, PRETRAIN_ALIASES)
    preset = load_preset("tiny")
    obj = get_objective(method).build(cfg, world_info(), model=build_model(preset), preset=preset)
    g = torch.Generator().manual_seed(0)
    sizes = [64, 64] + ([32, 32] if method == "dino" else [])
    views = [torch.randn(6, 3, s, s, generator=g) for s in sizes]
    obj.eval()
    with torch.no_grad():
        _, metrics = obj.method.compute(views, obj.visual)
        expect = collapse_statistic(backbone_features(obj.visual, views[0]))
    assert float(metrics[f"ssl/{method}/z_std"]) == pytest.approx(float(expect), rel=1e-5)
    assert 0.05 < float(expect) <= 1.5


def test_monitor_on_the_synthetic_held_out_set(synthetic_data):
    from vlp.model import build_model, build_transforms, load_preset

    cfg = parse_cli(
        run_config_class(), ["--ssl.monitor.every", "5", "--ssl.monitor.max_images", "60"], PRETRAIN_ALIASES
    )
    preset = load_preset("tiny")
    mon = RepresentationMonitor.from_config(cfg, synthetic_data.eval_shards, build_transforms(preset, False), True)
    assert mon is not None and len(mon.images) == 60 and mon.every == 5
    assert set(mon.classes) <= set(synthetic_data.class_families["shape"]) and len(mon.classes) >= 8
    model = build_model(preset)
    assert mon.maybe_run(4, model.visual, "cpu") == {}
    res = mon.maybe_run(5, model.visual, "cpu")
    assert res["monitor/knn_chance"] == pytest.approx(1 / len(mon.classes))
    assert 0.0 <= res["monitor/knn_top1"] <= 1.0 and res["monitor/embed_std"] > 0
    assert res["monitor/embed_std_x_sqrt_d"] == pytest.approx(res["monitor/embed_std"] * math.sqrt(128))
    assert model.visual.training  # mode restored
    off = parse_cli(run_config_class(), [], PRETRAIN_ALIASES)
    assert RepresentationMonitor.from_config(off, synthetic_data.eval_shards, None, is_ssl_run=False) is None


def _run(tmp_path, synthetic_data, *args: str) -> tuple[dict, list[dict]]:
    from vlp.train.metrics import read_metrics
    from vlp.train.trainer import run_pretraining

    out = tmp_path / "run"
    argv = [
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--output-dir",
        str(out),
        "--warmup-steps",
        "1",
        "--train-shards",
        synthetic_data.train_shards,
        "--eval-shards",
        synthetic_data.eval_shards,
        "--train-num-samples",
        "400",
        "--ssl.monitor.every",
        "3",
        "--ssl.simclr.hidden_dim",
        "64",
        "--ssl.dino.out_dim",
        "64",
        "--ssl.dino.hidden_dim",
        "64",
        "--ssl.dino.local_crops",
        "2",
        "--ssl.views.local_crop_size",
        "32",
        *args,
    ]
    summary = run_pretraining(parse_cli(run_config_class(), argv, PRETRAIN_ALIASES))
    assert json.loads((out / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    return summary, read_metrics(out / "metrics.jsonl")


def test_standalone_dino_run_logs_terms_and_monitor(tmp_path, synthetic_data):
    summary, records = _run(tmp_path, synthetic_data, "--objective", "dino")
    steps = [r for r in records if "loss/dino" in r]
    assert len(steps) == 3 and all(r["loss"] == r["loss/dino"] for r in steps)
    assert [r["ssl/dino/last_layer_frozen"] for r in steps] == [1.0, 1.0, 1.0]  # 1 epoch = 400 / 8 = 50 steps
    assert 0.0 <= summary["monitor/knn_top1"] <= 1.0 and summary["monitor/knn_chance"] == pytest.approx(0.1)
    assert not any(k.startswith("zeroshot/") for k in summary)  # no text tower was trained
    assert summary["objective"] == "dino" and summary["loss"] is None  # no image-text loss in a standalone run


def test_siglip_with_aux_simclr_run_logs_both_terms(tmp_path, synthetic_data):
    summary, records = _run(
        tmp_path,
        synthetic_data,
        "--loss",
        "siglip",
        "--aux-ssl",
        "simclr",
        "--aux-ssl-weight",
        "0.5",
        "--eval.zeroshot",
        "false",
    )
    steps = [r for r in records if "loss/simclr" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss/contrastive"] + 0.5 * r["loss/simclr"], rel=1e-5)
    assert "monitor/knn_top1" in summary
    assert summary["objective"] == "contrastive" and summary["loss"] == "siglip"


@pytest.mark.parametrize("objective", ["simclr", "byol"])
def test_short_standalone_run_lowers_its_loss_without_collapse(tmp_path, synthetic_data, objective):
    """20 steps on the 400 synthetic images (tiny heads, batch 16), with negatives (SimCLR) and without (BYOL, whose
    failure mode is collapse): the loss of the last 5 steps is below that of the first 5, the batch embeddings stay
    spread, and so do the held-out backbone features (docs/ssl.md's threshold: mean per-dimension std of the
    centred L2-normalised features x sqrt(d) above 0.1; 0 when collapsed)."""
    from vlp.train.metrics import read_metrics
    from vlp.train.trainer import run_pretraining

    out = tmp_path / "run"
    argv = [
        "--objective",
        objective,
        "--model",
        "tiny-resnet",
        "--steps",
        "20",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--output-dir",
        str(out),
        "--train-shards",
        synthetic_data.train_shards,
        "--eval-shards",
        synthetic_data.eval_shards,
        "--train-num-samples",
        "400",
        "--ssl.monitor.every",
        "20",
        "--checkpoint.export",
        "false",
        "--ssl.simclr.hidden_dim",
        "64",
        "--ssl.simclr.out_dim",
        "32",
        "--ssl.byol.hidden_dim",
        "64",
        "--ssl.byol.out_dim",
        "32",
        # SLIP's head (no batch norm on the projection's output): the default output batch norm whitens the
        # embeddings, so at initialisation a positive is no closer than the negatives and the loss starts at 5-7 and
        # falls only after some 50 steps (at batch 16: 5.5 -> 5.0 over these 20 steps, noisy; SLIP's head 4.4 -> 3.5)
        "--ssl.simclr.last_batch_norm",
        "false",
    ]
    summary = run_pretraining(parse_cli(run_config_class(), argv, PRETRAIN_ALIASES))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if f"loss/{objective}" in r]
    losses = [r[f"loss/{objective}"] for r in steps]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, (objective, first, last)
    assert min(r[f"ssl/{objective}/z_std"] for r in steps[-5:]) > 0.1
    assert summary["monitor/embed_std_x_sqrt_d"] > 0.1, summary["monitor/embed_std_x_sqrt_d"]
    # the run directory (no model.safetensors: export off) loads from its checkpoint: the trained image tower
    from vlp.checkpointing import consolidated_state_dict, load_trained_model, read_latest

    model, cfg = load_trained_model(out)
    state = consolidated_state_dict(read_latest(out / "checkpoints"))
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    assert cfg.objective == objective and visual
    assert all(torch.equal(model.visual.state_dict()[k], v) for k, v in visual.items())
