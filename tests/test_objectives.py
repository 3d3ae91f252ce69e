"""The objective registry: a new objective is one definition (config + builder) that the engine trains by name,
whose options the command line gains, with no edit of vlp/config.py, the Trainer or the scripts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from vlp.config import PRETRAIN_ALIASES, ConfigError, parse_cli
from vlp.objectives import registry
from vlp.objectives.base import Objective
from vlp.objectives.registry import register_objective, run_config_class, section


@dataclass
class ToyConfig:
    """A toy objective: pull a learnt colour towards each image's mean colour."""

    weight: float = 1.0
    """Multiplier of the squared error."""


class MeanColour(Objective):
    requires_text = False

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.colour = nn.Parameter(torch.zeros(3))

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        x = torch.from_numpy(np.asarray(sample["image"].resize((8, 8)), dtype=np.float32)) / 255
        return {"mean": x.reshape(-1, 3).mean(0)}

    def forward(self, batch: dict[str, Any]):
        loss = self.weight * ((self.colour - batch["mean"]) ** 2).sum(1).mean()
        return loss, {"loss/toy": loss.detach()}


@pytest.fixture
def toy_objective():
    """Registers ``toy-mean`` (config section ``toy``) for one test and removes it afterwards."""

    @register_objective("toy-mean", "image", sections={"toy": ToyConfig})
    def build(cfg, world):
        """Mean colour regression (a test objective)."""
        return MeanColour(section(cfg, "toy").weight)

    yield build
    registry.OBJECTIVES.pop("toy-mean")
    registry.SECTIONS.pop("toy")
    registry._RUN_CLASSES.clear()


def test_an_objective_defined_here_trains_by_name_through_the_trainer(tmp_path, synthetic_data, toy_objective):
    from vlp.train.trainer import run_training

    argv = [
        "--objective",
        "toy-mean",
        "--toy.weight",
        "2.0",
        "--steps",
        "30",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--lr",
        "0.05",
        "--warmup-steps",
        "0",
        "--train-shards",
        synthetic_data.train_shards,
        "--output-dir",
        str(tmp_path / "run"),
        "--checkpoint-every",
        "10",
    ]
    cfg = parse_cli(run_config_class(), argv, PRETRAIN_ALIASES)
    assert cfg.toy.weight == 2.0 and cfg.objective == "toy-mean"
    summary = run_training(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/toy"] for r in records if "loss/toy" in r]
    assert len(losses) == 30 and losses[-1] < 0.2 * losses[0]
    assert summary["objective"] == "toy-mean" and summary["final_loss"] == pytest.approx(losses[-1])
    assert (tmp_path / "run" / "checkpoints" / "step-00000030" / "objective.pt").is_file()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "toy:\n  weight: 2.0" in saved  # its section is part of the run's saved config


def test_unknown_objective_lists_the_registered_ones():
    from vlp.preflight import check_pretrain_inputs

    cfg = parse_cli(run_config_class(), ["--objective", "simsiam"], PRETRAIN_ALIASES)
    with pytest.raises(ConfigError, match="unknown objective 'simsiam'; valid: byol, clip, dino, .*siglip, simclr"):
        check_pretrain_inputs(cfg)


def test_every_ssl_method_is_also_an_auxiliary_term_and_clip_siglip_are_image_text():
    specs = registry.OBJECTIVES
    assert registry.names("image_text") == ["clip", "siglip"]
    assert sorted(n for n, s in specs.items() if s.auxiliary) == ["byol", "dino", "moco", "simclr"]
    run = run_config_class()()
    assert (run.ssl.simclr.temperature, run.ssl.moco.version, run.ssl.dino.out_dim) == (0.1, 3, 65536)


def test_speed_features_reach_the_tower_of_a_standalone_ssl_objective():
    from vlp.distributed import world_info
    from vlp.train.engine import apply_speed_features

    cfg = parse_cli(
        run_config_class(),
        [
            "--objective",
            "simclr",
            "--model",
            "tiny",
            "--model.patch_dropout",
            "0.5",
            "--ssl.simclr.hidden_dim",
            "32",
            "--ssl.simclr.out_dim",
            "16",
        ],
        PRETRAIN_ALIASES,
    )
    obj = registry.resolve(cfg).build(cfg, world_info())
    assert type(obj.visual.patch_dropout).__name__ == "Identity"
    apply_speed_features(obj, cfg)
    assert type(obj.visual.patch_dropout).__name__ == "PatchDropout" and obj.visual.patch_dropout.prob == 0.5


def test_resuming_with_another_loss_is_refused_before_anything_is_rewritten(tmp_path, synthetic_data):
    from vlp.train.trainer import run_training

    args = [
        "--model",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--train-shards",
        synthetic_data.train_shards,
        "--output-dir",
        str(tmp_path / "run"),
        "--no-eval.zeroshot",
    ]
    run_training(parse_cli(run_config_class(), [*args, "--loss", "clip"], PRETRAIN_ALIASES))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    again = parse_cli(run_config_class(), [*args, "--loss", "siglip", "--resume", "latest"], PRETRAIN_ALIASES)
    with pytest.raises(ConfigError, match="the checkpoint trained objective 'clip', this run 'siglip'"):
        run_training(again)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
