"""The export command: which format, from where, to where (what ``scripts/export_hf.py`` parses and calls)."""

from __future__ import annotations

import logging
from pathlib import Path

from vlp.config import ConfigError, ExportConfig

log = logging.getLogger(__name__)

FORMATS = ("hf-vision", "hf-full", "open_clip", "import-hf", "import-open_clip")


def run_export(cfg: ExportConfig) -> Path:
    """Do the export (or import) that ``cfg`` describes; returns the folder written."""
    if not cfg.checkpoint:
        raise ConfigError(
            "--checkpoint is required (a run directory, a checkpoint file, or for import-hf a "
            "transformers model folder)"
        )
    if not cfg.output:
        raise ConfigError("--output is required (the folder to write)")
    if cfg.format != "import-hf" and (cfg.preset or cfg.loss or cfg.vision_only):
        raise ConfigError("--preset, --loss and --vision-only apply to --format import-hf only")
    if cfg.format != "import-open_clip" and cfg.model_config:
        raise ConfigError("--model-config applies to --format import-open_clip only")
    if cfg.format == "import-open_clip":
        from vlp.export.hf import save_imported
        from vlp.export.open_clip_format import import_open_clip

        model, loss = import_open_clip(cfg.checkpoint, cfg.model_config)
        out = save_imported(
            model, loss, cfg.output, overwrite=cfg.overwrite, source=cfg.checkpoint, source_format="open_clip"
        )
        log.info(
            "imported %s into %s (fine-tune: scripts/pretrain.py --config %s/config.yaml)", cfg.checkpoint, out, out
        )
        return out
    if cfg.format == "import-hf":
        from vlp.export.hf import import_hf, save_imported

        if not Path(cfg.checkpoint).is_dir():
            raise ConfigError(f"--checkpoint {cfg.checkpoint}: expected a transformers model folder")
        if (Path(cfg.checkpoint) / "open_clip_config.json").is_file() and not (
            Path(cfg.checkpoint) / "config.json"
        ).is_file():
            raise ConfigError(f"--checkpoint {cfg.checkpoint} is an open_clip folder; use --format import-open_clip")
        model, loss = import_hf(cfg.checkpoint, preset=cfg.preset, loss=cfg.loss, vision_only=cfg.vision_only)
        out = save_imported(model, loss, cfg.output, overwrite=cfg.overwrite, source=cfg.checkpoint)
        log.info(
            "imported %s into %s (fine-tune: scripts/pretrain.py --config %s/config.yaml)", cfg.checkpoint, out, out
        )
        return out
    from vlp.checkpointing import load_trained_model
    from vlp.export.card import run_info

    model, run_cfg = load_trained_model(cfg.checkpoint)
    model.eval()
    info = run_info(cfg.checkpoint, run_cfg)
    if cfg.format == "hf-vision":
        from vlp.export.hf import export_hf_vision

        return export_hf_vision(model, cfg.output, overwrite=cfg.overwrite, info=info)
    if cfg.format == "hf-full":
        from vlp.export.hf import export_hf_full

        return export_hf_full(model, cfg.output, overwrite=cfg.overwrite, info=info)
    from vlp.export.open_clip_format import export_open_clip

    return export_open_clip(model, cfg.output, overwrite=cfg.overwrite, info=info)
