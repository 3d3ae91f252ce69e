"""Speed features and GPU-readiness checks that run on a CPU.

FLIP patch dropout (``--model.patch_dropout``): drops the stated share of patch tokens in training only, leaves
evaluation bit-identical, and is refused for timm towers. ``--train.compile``: the compiled towers give the eager
outputs and gradients. Attention of every tower goes through ``scaled_dot_product_attention`` (the fused kernels on
a GPU). The ring exchange of the chunked losses uses only batched point-to-point operations that NCCL can run: each
send pairs with the next rank, each receive with the previous one, and since NCCL ignores tags, the sends on every
link must match the receives in posting order, shape and dtype.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.distributed_harness import run_shared, shared_check
from vlp.config import PRETRAIN_ALIASES, ConfigError, ModelConfig, PretrainConfig, parse_cli
from vlp.model import build_model, load_preset
from vlp.preflight import check_pretrain_inputs

ROOT = Path(__file__).resolve().parents[1]


def _tokens_into_blocks(model, images: torch.Tensor) -> int:
    """Sequence length entering the image tower's transformer blocks."""
    seen = []
    handle = model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        model.encode_image(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("prob, kept", [(0.5, 32), (0.75, 16)])
def test_patch_dropout_drops_in_training_only(prob, kept):
    base = build_model("tiny")  # 64 px / patch 8: 64 patches + the class token
    dropped = copy.deepcopy(base)
    dropped.set_patch_dropout(prob)
    images = torch.randn(3, 3, 64, 64)
    base.eval()
    dropped.eval()
    with torch.no_grad():
        assert torch.equal(base.encode_image(images), dropped.encode_image(images))  # eval: every patch kept
        assert torch.equal(base.image_backbone_features(images), dropped.image_backbone_features(images))
        assert _tokens_into_blocks(dropped, images) == 65
        dropped.train()
        base.train()
        assert _tokens_into_blocks(dropped, images) == 1 + kept
        assert _tokens_into_blocks(base, images) == 65
        assert not torch.allclose(base.encode_image(images), dropped.encode_image(images), atol=1e-3)
    assert list(dropped.state_dict()) == list(base.state_dict())  # no weights: checkpoints and exports unchanged
    dropped.set_patch_dropout(0.0)
    assert isinstance(dropped.visual.patch_dropout, nn.Identity)


def test_patch_dropout_refused_for_timm_towers_and_bad_values():
    with pytest.raises(ConfigError, match=r"model.patch_dropout=0.5 needs an open_clip ViT.*tiny-resnet") as e:
        build_model("tiny-resnet").set_patch_dropout(0.5)
    assert "\n" not in str(e.value)
    cfg = parse_cli(PretrainConfig, ["--model", "tiny-resnet", "--model.patch_dropout", "0.5"], PRETRAIN_ALIASES)
    with pytest.raises(ConfigError, match=r"timm tower \(resnet18\)"):
        check_pretrain_inputs(cfg)  # before torch-heavy set-up
    check_pretrain_inputs(
        parse_cli(PretrainConfig, ["--model", "tiny", "--model.patch_dropout", "0.5"], PRETRAIN_ALIASES)
    )
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"model.patch_dropout must be in \[0, 1\)"):
            ModelConfig(patch_dropout=bad)


def test_pretrain_command_line_refuses_patch_dropout_on_timm_tower_in_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/pretrain.py"),
            "--model",
            "tiny-resnet-hr",
            "--model.patch_dropout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.patch_dropout=0.5" in lines[0] and "tiny-resnet-hr" in lines[0]


def test_apply_speed_features_sets_patch_dropout_on_the_trained_tower():
    from open_clip.transformer import PatchDropout

    from vlp.train.engine import apply_speed_features

    cfg = parse_cli(PretrainConfig, ["--model", "tiny", "--model.patch_dropout", "0.25"], PRETRAIN_ALIASES)
    holder = nn.ModuleDict({"model": build_model("tiny")})
    apply_speed_features(holder, cfg)
    assert isinstance(holder["model"].visual.patch_dropout, PatchDropout)
    assert holder["model"].visual.patch_dropout.prob == 0.25


def test_compiled_towers_match_eager():
    """Graph capture and autograd of the compiled trunks (dynamo + AOTAutograd) against eager. Inductor's code
    generation takes 40 s here on a cold cache, so it is checked by the GPU suite's dry run instead (the same
    training run with and without --train.compile ends at the same loss; tests/test_gpu_suite.py)."""
    import torch._dynamo

    preset = load_preset("tiny")
    preset.vision_cfg["layers"] = preset.text_cfg["layers"] = 1
    eager = build_model(preset)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled.compile_towers(backend="aot_eager")
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(1, 49000, (4, 32))
    outs = []
    for model in (eager, compiled):
        model.train()
        img, txt, _, _ = model(images, tokens)
        (img @ txt.T).square().sum().backward()
        outs.append((img.detach(), txt.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both trunks really went through dynamo
    (ie, te, ge), (ic, tc, gc) = outs
    torch.testing.assert_close(ic, ie, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tc, te, rtol=1e-4, atol=1e-5)
    assert ge.keys() == gc.keys()  # compile in place: same parameter names
    for name in ge:
        if ge[name] is not None:
            scale = float(ge[name].abs().max()) + 1e-12
            assert float((gc[name] - ge[name]).abs().max()) <= 1e-3 * scale, name


def _count_sdpa(monkeypatch, model, images, tokens) -> int:
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model.train()
    img, txt, _, _ = model(images, tokens)
    (img.sum() + txt.sum()).backward()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", original)
    return len(calls)


def test_open_clip_towers_use_scaled_dot_product_attention(monkeypatch):
    model = build_model("tiny")  # 3 image + 3 text blocks
    n = _count_sdpa(monkeypatch, model, torch.randn(2, 3, 64, 64), torch.randint(1, 49000, (2, 32)))
    assert n == 6


def test_timm_siglip_tower_uses_scaled_dot_product_attention(monkeypatch):
    model = build_model("vit-b-16-siglip")  # 12 image blocks + MAP pooling + 12 text blocks
    n = _count_sdpa(monkeypatch, model, torch.randn(1, 3, 224, 224), torch.randint(1, 49000, (1, 64)))
    assert n == 25


@shared_check(3)
def _p2p_worker(rank: int, world: int) -> dict:
    """Chunked clip and siglip loss, forward + backward, recording every batched point-to-point operation."""
    from vlp.losses import LOSSES

    records: list[list[tuple]] = []
    other_calls: list[str] = []
    original = dist.batch_isend_irecv

    def recording(ops):
        records.append(
            [
                (
                    op.op.__name__,
                    op.peer,
                    tuple(op.tensor.shape),
                    str(op.tensor.dtype),
                    op.tensor.device.type,
                    op.tensor.is_contiguous(),
                )
                for op in ops
            ]
        )
        return original(ops)

    def forbid(name):
        def f(*a, **k):
            other_calls.append(name)
            raise RuntimeError(f"{name} used outside batch_isend_irecv")

        return f

    dist.batch_isend_irecv = recording
    saved = {n: getattr(dist, n) for n in ("send", "recv")}
    for n in saved:
        setattr(dist, n, forbid(n))
    try:
        g = torch.Generator().manual_seed(rank)
        sizes = [5, 3, 4][:world]
        for name in ("clip", "siglip"):
            img = torch.nn.functional.normalize(torch.randn(sizes[rank], 16, generator=g), dim=-1).requires_grad_()
            txt = torch.nn.functional.normalize(torch.randn(sizes[rank], 16, generator=g), dim=-1).requires_grad_()
            t = torch.tensor(2.0, requires_grad=True)
            b = torch.tensor(-5.0, requires_grad=True) if name == "siglip" else None
            loss = LOSSES[(name, "chunked")](chunk_size=2)(img, txt, t, b)
            loss.backward()
    finally:
        dist.batch_isend_irecv = original
        for n, f in saved.items():
            setattr(dist, n, f)
    return {"records": records, "other": other_calls}


def test_ring_exchange_is_nccl_compatible_point_to_point():
    world = 3
    results = run_shared(_p2p_worker, world)
    for rank, res in enumerate(results):
        assert res["other"] == []
        assert len(res["records"]) >= 4 * (world - 1)  # payload + accumulator, forward + backward, two losses
        for batch in res["records"]:
            kinds = {op[0] for op in batch}
            assert kinds == {"isend", "irecv"}
            for kind, peer, _, _, device, contiguous in batch:
                assert peer == ((rank + 1) % world if kind == "isend" else (rank - 1) % world)
                assert device == "cpu" and contiguous
    # NCCL ignores tags: on each link r -> r+1 the sends must pair with the receives by order alone.
    for rank, res in enumerate(results):
        nxt = results[(rank + 1) % world]
        sent = [op[2:4] for batch in res["records"] for op in batch if op[0] == "isend"]
        received = [op[2:4] for batch in nxt["records"] for op in batch if op[0] == "irecv"]
        assert sent == received
        assert len(sent) > 0
