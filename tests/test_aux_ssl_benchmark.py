"""scripts/benchmarks/aux_ssl_zeroshot.py: every arm's flags parse into the run it names (a typo would otherwise
surface only after an hour of runs), and the table reads its rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aux():
    sys.path.insert(0, str(ROOT / "scripts" / "benchmarks"))
    try:
        import aux_ssl_zeroshot

        yield aux_ssl_zeroshot
    finally:
        sys.path.remove(str(ROOT / "scripts" / "benchmarks"))


def test_each_arm_parses_into_its_loss_and_auxiliary_method(aux):
    from vlp.config import PRETRAIN_ALIASES, parse_cli
    from vlp.objectives import run_config_class

    for arm in aux.ARMS:
        cfg = parse_cli(run_config_class(), aux.arm_flags(arm) + ["--steps", "500"], PRETRAIN_ALIASES)
        loss, _, method = arm.partition("+")
        assert cfg.loss.name == loss and cfg.aux_ssl == (method or None)
        if method:
            assert cfg.ssl.views.crop_scale == [0.35, 1.0]
            assert getattr(cfg.ssl, method).hidden_dim == 512
    dino = parse_cli(run_config_class(), aux.arm_flags("siglip+dino"), PRETRAIN_ALIASES).ssl.dino
    assert (dino.out_dim, dino.local_crops, dino.batch_norm, dino.momentum) == (1024, 4, True, 0.99)


def test_table_has_one_line_per_arm_with_the_seed_range(aux, tmp_path):
    rows = [
        {"arm": "siglip", "seed": s, "steps": 500, "zeroshot/shape/top1": v, "final_loss": 1.0, "wall_s": 10}
        for s, v in ((0, 0.5), (1, 0.7))
    ]
    rows.append(
        {"arm": "siglip+byol", "seed": 0, "steps": 500, "zeroshot/shape/top1": 0.9, "final_loss": 2.0, "wall_s": 30}
    )
    aux.write_table(tmp_path, rows)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2] == "| SigLIP | 500 | 0,1 | 60.0 (50.0-70.0) |  | 1.000 | 10 |"
    assert lines[3] == "| SigLIP + BYOL | 500 | 0 | 90.0 |  | 2.000 | 30 |" and len(lines) == 4


def test_the_siglip_simclr_demo_config_is_the_tables_simclr_arm(aux):
    from vlp.config import PRETRAIN_ALIASES, parse_cli
    from vlp.objectives import run_config_class

    demo = parse_cli(run_config_class(), ["--config", "configs/ssl/siglip-simclr-tiny.yaml"], PRETRAIN_ALIASES)
    arm = parse_cli(run_config_class(), aux.arm_flags("siglip+simclr") + ["--steps", "500"], PRETRAIN_ALIASES)
    for section in ("model", "loss", "optim", "data", "aux_ssl", "aux_ssl_weight"):
        assert getattr(demo, section) == getattr(arm, section), section
    assert (demo.ssl.simclr, demo.ssl.views) == (arm.ssl.simclr, arm.ssl.views)
    assert (
        (demo.train.steps, demo.train.batch_size, demo.train.seed)
        == (500, 64, 0)
        == (
            arm.train.steps,
            arm.train.batch_size,
            arm.train.seed,
        )
    )
