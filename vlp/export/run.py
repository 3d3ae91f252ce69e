"""The export command: which format, from where, to where (what ``scripts/export_hf.py`` parses and calls)."""

from __future__ import annotations

import logging
from pathlib import Path

from vlp.config import ConfigError, ExportConfig

log = logging.getLogger(__name__)

FORMATS = ("hf-vision", "hf-full", "open_clip", "import-hf")


def run_export(cfg: ExportConfig) -> Path:
    """Do the export (or import) that ``cfg`` describes; returns the folder written."""
    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required (a run directory, a checkpoint file, or for import-hf a "
                          "transformers model folder)")
    if not cfg.output:
        raise ConfigError("--output is required (the folder to write)")
    if cfg.format != "import-hf" and (cfg.preset or cfg.loss or cfg.vision_only):
        raise ConfigError("--preset, --loss and --vision-only apply to --format import-hf only")
    if cfg.format == "import-hf":
        from vlp.export.hf import import_hf, save_imported

        if not Path(cfg.checkpoint).is_dir():
            raise ConfigError(f"--checkpoint {cfg.checkpoint}: expected a transformers model folder")
        model, loss = import_hf(cfg.checkpoint, preset=cfg.preset, loss=cfg.loss, vision_only=cfg.vision_only)
        out = save_imported(model, loss, cfg.output, overwrite=cfg.overwrite)
        log.info("imported %s into %s (fine-tune: scripts/pretrain.py --config %s/config.yaml)", cfg.checkpoint,
                 out, out)
        return out
    from vlp.checkpointing import load_trained_model

    model, _ = load_trained_model(cfg.checkpoint)
    model.eval()
    if cfg.format == "hf-vision":
        from vlp.export.hf import export_hf_vision

        return export_hf_vision(model, cfg.output, overwrite=cfg.overwrite)
    if cfg.format == "hf-full":
        from vlp.export.hf import export_hf_full

        return export_hf_full(model, cfg.output, overwrite=cfg.overwrite)
    from vlp.export.open_clip_format import export_open_clip

    return export_open_clip(model, cfg.output, overwrite=cfg.overwrite)
