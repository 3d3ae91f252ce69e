"""The EMA teacher under DeepSpeed on 2 gloo processes: ZeRO-2 updates it identically on every rank, ZeRO-3 refuses.

DeepSpeed runs on CPU with DS_ACCELERATOR=cpu (set in conftest); its engine wraps the whole objective, as
accelerate does in scripts/pretrain.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.distributed_harness import run_distributed

pytestmark = pytest.mark.slow

LOCAL_BATCH = 4
ARGS = ["--batch-size", str(LOCAL_BATCH), "--ssl.byol.hidden_dim", "64", "--ssl.byol.out_dim", "32"]


def _engine(stage: int):
    import deepspeed

    from vlp.config import PRETRAIN_ALIASES, parse_cli
    from vlp.distributed import world_info
    from vlp.model import build_model, load_preset
    from vlp.objectives import get_objective, run_config_class

    torch.manual_seed(0)
    preset = load_preset("tiny")
    cfg = parse_cli(run_config_class(), ["--objective", "byol", *ARGS], PRETRAIN_ALIASES)
    obj = get_objective("byol").build(cfg, world_info(), model=build_model(preset), preset=preset)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    config = {
        "train_micro_batch_size_per_gpu": LOCAL_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=obj, optimizer=opt, config=config)
    return obj, engine


def _views(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)  # different data on every rank
    return [torch.randn(LOCAL_BATCH, 3, 64, 64, generator=g) for _ in range(2)]


def _zero2_worker(rank: int, world: int) -> dict:
    obj, engine = _engine(2)
    method = obj.method
    errors, momenta = [], []
    for step in (1, 2):
        loss, _ = engine({"ssl_views": _views(rank, step)})
        engine.backward(loss)
        engine.step()
        before = [p.detach().clone() for p in method.teacher["backbone"].parameters()]
        obj.after_step(step, 4)
        m = method.momentum
        momenta.append(m)
        errors.append(
            max(
                float((t - (m * t0 + (1 - m) * s)).abs().max())
                for t, t0, s in zip(method.teacher["backbone"].parameters(), before, obj.visual.parameters())
            )
        )
    teacher = torch.cat([p.detach().flatten() for p in method.teacher["backbone"].parameters()]).numpy()
    student = torch.cat([p.detach().flatten() for p in obj.visual.parameters()]).numpy()
    return {"errors": errors, "momenta": momenta, "teacher": teacher, "student": student}


def _zero3_worker(rank: int, world: int) -> str:
    from vlp.config import ConfigError

    obj, engine = _engine(3)
    try:
        engine({"ssl_views": _views(rank, 1)})
    except ConfigError as e:
        return str(e)
    return "no error"


def _worker(rank: int, world: int) -> dict:
    """Both checks in one process group (each spawn of 2 processes costs seconds of start-up)."""
    return {"zero2": _zero2_worker(rank, world), "zero3": _zero3_worker(rank, world)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, 2)


def test_ema_teacher_under_zero2_is_identical_on_both_ranks_and_follows_the_formula(results):
    r0, r1 = (r["zero2"] for r in results)
    expected = [1 - 0.004 * (1 + math.cos(math.pi * i / 4)) / 2 for i in (0, 1)]  # BYOL's cosine, 4 steps
    assert r0["momenta"] == pytest.approx(expected) and expected[0] == pytest.approx(0.996)
    assert max(r0["errors"] + r1["errors"]) < 1e-6
    np.testing.assert_array_equal(r0["teacher"], r1["teacher"])
    np.testing.assert_array_equal(r0["student"], r1["student"])
    assert np.abs(r0["teacher"] - r0["student"]).max() > 0  # the teacher lags the student


def test_zero3_is_refused_with_a_clear_error(results):
    messages = [r["zero3"] for r in results]
    assert all("do not support DeepSpeed ZeRO-3" in m and "ZeRO-2" in m for m in messages), messages
