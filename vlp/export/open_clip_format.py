"""Export a run as an open_clip folder: ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it.

open_clip-based tools (LAION's clip_benchmark, open_clip_train's eval) then evaluate our runs unchanged. The state
dict is our model's (we build open_clip's CLIP / CustomTextCLIP), so no key map is involved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlp.export.hf import prepare_output_dir, save_weights
from vlp.export.towers import is_meta, logit_values
from vlp.model import DualTower

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def open_clip_config(model: DualTower) -> dict:
    """open_clip_config.json: model_cfg (the preset, plus the logit scale/bias initialisers that decide which
    parameters exist) and preprocess_cfg (the eval transform)."""
    preset = model.preset
    model_cfg = preset.open_clip_config()
    scale, bias = logit_values(model.clip)
    model_cfg["init_logit_scale"] = scale
    if bias is not None:
        model_cfg["init_logit_bias"] = bias
    vc = model_cfg["vision_cfg"]
    if vc.get("timm_model_name"):
        vc["timm_model_pretrained"] = False
    pp = preset.preprocess or {}
    preprocess = {"size": preset.image_size, "mode": "RGB", "interpolation": pp.get("interpolation") or "bicubic",
                  "resize_mode": pp.get("resize_mode") or "shortest"}
    if pp.get("mean") is not None:
        preprocess["mean"] = list(pp["mean"])
    if pp.get("std") is not None:
        preprocess["std"] = list(pp["std"])
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(model: DualTower, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write open_clip_config.json + open_clip_model.safetensors."""
    cfg = open_clip_config(model)
    if is_meta(model):
        raise ValueError("cannot export a model built on the meta device (it has no weights)")
    out = prepare_output_dir(out_dir, overwrite)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    save_weights(model.clip.state_dict(), out / WEIGHTS_NAME)
    log.info("wrote open_clip folder %s", out)
    return out
