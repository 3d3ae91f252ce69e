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

#: DeepSpeed releases whose private methods vlp.train.engine.apply_deepspeed_patches replaces, as tested (>=, <)
DEEPSPEED_TESTED = ("0.19", "0.20")


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise ConfigError, in one line naming the working range, when the installed DeepSpeed (or ``version``) is
    outside the tested range: the patches replace private methods that other releases may not have or use alike."""
    from packaging.version import Version

    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            version = installed("deepspeed")
        except PackageNotFoundError:
            raise ConfigError(
                f"DeepSpeed is not installed; pip install 'deepspeed>={DEEPSPEED_TESTED[0]},<{DEEPSPEED_TESTED[1]}'"
            ) from None
    low, high = DEEPSPEED_TESTED
    if not Version(low) <= Version(version) < Version(high):
        raise ConfigError(
            f"DeepSpeed {version} is installed, but vlp patches DeepSpeed internals tested only with "
            f"deepspeed>={low},<{high}; pip install 'deepspeed>={low},<{high}'"
        )


def resolve_deepspeed_config(spec: str) -> Path:
    """A DeepSpeed JSON given as a path or as a name in configs/deepspeed/ (zero2, zero3, ...)."""
    path = Path(spec)
    if path.is_file():
        return path
    named = configs_dir() / "deepspeed" / f"{spec}.json"
    if named.is_file():
        return named
    raise ConfigError(
        f"DeepSpeed config {spec!r} not found; give a JSON path or one of {', '.join(DEEPSPEED_CONFIG_NAMES)}"
    )


def check_shards_exist(spec: str) -> None:
    """Fail early, with the path, when local shards named by ``spec`` do not exist."""
    import braceexpand

    for source in spec.split("::"):
        paths = list(braceexpand.braceexpand(source))
        local = [p for p in paths if "://" not in p and not p.startswith("pipe:")]
        missing = [p for p in local if not Path(p).is_file()]
        if local and len(missing) == len(local):
            raise ConfigError(
                f"no shards found for {source!r} (first missing: {missing[0]}); "
                "pass --train-shards with existing .tar files, e.g. /data/shard-{000000..000009}.tar"
            )
        if missing:
            log.warning("%d of %d shards of %s are missing (first: %s)", len(missing), len(local), source, missing[0])


def check_trackers_installed(report_to: str) -> None:
    """Fail early when a tracker named in ``--report-to`` is not installed (its Python package is missing)."""
    import importlib.util

    for name in (t.strip() for t in report_to.split(",")):
        if name and name != "none" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def check_pretrain_inputs(cfg: PretrainConfig) -> None:
    """Raise ConfigError for an unknown objective, loss or preset, shards that do not exist, a DeepSpeed config not
    found, a tracker that is not installed, or patch dropout asked of a timm image tower."""
    from vlp.objectives import registry

    registry.resolve(cfg)
    if cfg.aux_ssl:
        registry.auxiliary_term(cfg.aux_ssl)
    preset = load_preset(cfg.model.name)
    check_trackers_installed(cfg.train.report_to)
    if cfg.model.patch_dropout and "timm_model_name" in preset.vision_cfg:
        raise ConfigError(
            f"model.patch_dropout={cfg.model.patch_dropout} needs an open_clip ViT image tower, but "
            f"preset {preset.name!r} has a timm tower ({preset.vision_cfg['timm_model_name']}); use 0 "
            "or a ViT preset"
        )
    if cfg.data.train_shards:
        check_shards_exist(cfg.data.train_shards)
    if cfg.train.deepspeed:
        resolve_deepspeed_config(cfg.train.deepspeed)
        check_deepspeed_version()
