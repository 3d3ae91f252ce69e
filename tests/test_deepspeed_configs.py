"""The shipped DeepSpeed JSONs and accelerate launch configs, and how their `auto` fields are filled."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vlp.config import ConfigError, PretrainConfig
from vlp.distributed import WorldInfo
from vlp.model import load_preset
from vlp.train.engine import DEEPSPEED_CONFIG_NAMES, fill_deepspeed_config, resolve_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", DEEPSPEED_CONFIG_NAMES)
def test_deepspeed_jsons(name):
    conf = json.loads(resolve_deepspeed_config(name).read_text())
    stage = int(name[4])
    assert conf["zero_optimization"]["stage"] == stage
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert conf[key] == "auto", key
    assert conf["bf16"]["enabled"] == "auto" and conf["fp16"]["enabled"] == "auto" and conf["fp16"]["loss_scale"] == 0
    assert "optimizer" not in conf and "scheduler" not in conf  # vlp's AdamW groups and schedule are used
    offload = conf["zero_optimization"].get("offload_optimizer", {}).get("device")
    assert (offload == "cpu") == (name == "zero3_offload")


@pytest.mark.parametrize(
    "name, stage", [("zero2.yaml", 2), ("zero3.yaml", 3), ("multinode_zero2.yaml", 2), ("cpu_multi.yaml", None)]
)
def test_accelerate_launch_configs(name, stage):
    conf = yaml.safe_load((ROOT / "configs" / "accelerate" / name).read_text())
    if stage is None:
        assert conf["distributed_type"] == "MULTI_CPU" and conf["use_cpu"] is True
        return
    assert conf["distributed_type"] == "DEEPSPEED"
    ds = json.loads((ROOT / conf["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    if name.startswith("multinode"):
        assert conf["num_machines"] > 1 and conf["main_process_ip"]
        assert conf["num_processes"] % conf["num_machines"] == 0


def _fill(conf: dict, batch=8, accum=4, world=2, clip=1.0) -> dict:
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=conf)
    plugin.set_mixed_precision("no")  # what AcceleratorState does
    cfg = PretrainConfig()
    cfg.train.batch_size, cfg.train.accum_steps, cfg.optim.grad_clip = batch, accum, clip
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    hidden = max(load_preset("tiny").embed_dim, 128)  # the tiny preset's widest layer (width 128)
    return fill_deepspeed_config(accelerator, cfg, WorldInfo(rank=0, world_size=world), hidden)


def test_auto_fields_come_from_the_run_and_the_real_world_size():
    conf = _fill(json.loads(resolve_deepspeed_config("zero3").read_text()))
    assert (
        conf["train_micro_batch_size_per_gpu"],
        conf["gradient_accumulation_steps"],
        conf["train_batch_size"],
        conf["gradient_clipping"],
    ) == (8, 4, 64, 1.0)
    z = conf["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        128 * 128,
        int(0.9 * 128 * 128),
        1280,
    )  # tiny preset: width 128
    assert _fill(json.loads(resolve_deepspeed_config("zero2").read_text()), clip=None)["gradient_clipping"] == 0.0


def test_inconsistent_explicit_batch_sizes_and_optimizer_sections_are_user_errors():
    conf = json.loads(resolve_deepspeed_config("zero2").read_text())
    conf["train_batch_size"] = 100
    with pytest.raises(ConfigError, match="train_batch_size 100 != micro batch 8 x accumulation 4 x 2 processes"):
        _fill(conf)
    conf = json.loads(resolve_deepspeed_config("zero2").read_text())
    conf["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    with pytest.raises(ConfigError, match="remove its 'optimizer'"):
        _fill(conf)
    with pytest.raises(ConfigError, match="zero0, zero1, zero2, zero3, zero3_offload"):
        resolve_deepspeed_config("zero9")
