"""Checks of a run's named inputs that need no torch: the model preset, local shards, the DeepSpeed config.

Command lines run them right after parsing, so that a mistake is reported in a fraction of a second rather than
after importing torch, DeepSpeed and open_clip; the training code resolves the same inputs with the same functions.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlp.config import ConfigError, PretrainConfig
from vlp.presets import configs_dir, load_preset

log = logging.getLogger(__name__)

DEEPSPEED_CONFIG_NAMES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")


def resolve_deepspeed_config(spec: str) -> Path:
    """A DeepSpeed JSON given as a path or as a name in configs/deepspeed/ (zero2, zero3, ...)."""
    path = Path(spec)
    if path.is_file():
        return path
    named = configs_dir() / "deepspeed" / f"{spec}.json"
    if named.is_file():
        return named
    raise ConfigError(f"DeepSpeed config {spec!r} not found; give a JSON path or one of "
                      f"{', '.join(DEEPSPEED_CONFIG_NAMES)}")


def check_shards_exist(spec: str) -> None:
    """Fail early, with the path, when local shards named by ``spec`` do not exist."""
    import braceexpand

    for source in spec.split("::"):
        paths = list(braceexpand.braceexpand(source))
        local = [p for p in paths if "://" not in p and not p.startswith("pipe:")]
        missing = [p for p in local if not Path(p).is_file()]
        if local and len(missing) == len(local):
            raise ConfigError(f"no shards found for {source!r} (first missing: {missing[0]}); "
                              "pass --train-shards with existing .tar files, e.g. /data/shard-{000000..000009}.tar")
        if missing:
            log.warning("%d of %d shards of %s are missing (first: %s)", len(missing), len(local), source, missing[0])


def check_pretrain_inputs(cfg: PretrainConfig) -> None:
    """Raise ConfigError for an unknown preset, shards that do not exist, a DeepSpeed config not found, or patch
    dropout asked of a timm image tower."""
    preset = load_preset(cfg.model.name)
    if cfg.model.patch_dropout and "timm_model_name" in preset.vision_cfg:
        raise ConfigError(f"model.patch_dropout={cfg.model.patch_dropout} needs an open_clip ViT image tower, but "
                          f"preset {preset.name!r} has a timm tower ({preset.vision_cfg['timm_model_name']}); use 0 "
                          "or a ViT preset")
    if cfg.data.train_shards:
        check_shards_exist(cfg.data.train_shards)
    if cfg.train.deepspeed:
        resolve_deepspeed_config(cfg.train.deepspeed)
