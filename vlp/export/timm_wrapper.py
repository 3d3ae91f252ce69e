"""Export a timm image tower (other than a SigLIP ViT) as transformers' ``TimmWrapperModel``, for ``hf-vision``.

``TimmWrapperModel`` builds ``timm.create_model(architecture, num_classes=0, **model_args)``, so it holds exactly the
trunk of open_clip's ``TimmModel`` when timm itself registers the architecture. Its ``pooler_output`` is the pooled
trunk features (our ``image_backbone_features``); the contrastive projection after them, which transformers has no
place for, is written beside the weights as ``image_projection.safetensors`` (``weight`` [embed_dim, features] and,
when present, ``bias``): ``image_embeds = pooler_output @ weight.T + bias`` equals our ``encode_image`` before
normalisation. The eval transform goes into ``config.json``'s ``pretrained_cfg``, from which transformers'
``TimmWrapperImageProcessor`` (``AutoImageProcessor``) builds timm's eval transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from vlp.export.towers import NotRepresentableError, outside_timm_error, registered_outside_timm, timm_tower_name

PROJECTION_NAME = "image_projection.safetensors"


def _projection(visual: nn.Module) -> tuple[nn.Linear | None, list[str]]:
    """The Linear after the pooled trunk features (open_clip's head proj, or the trunk's own classifier used as the
    projection when ``timm_proj`` is empty) and the trunk state keys that belong to it."""
    head = visual.head
    names = [n for n, _ in head.named_children()]
    bad = [n for n in names if n not in ("drop", "proj")]
    if bad:
        raise NotRepresentableError(
            f"cannot export to TimmWrapperModel: open_clip head {bad} (attention pooling or "
            "an MLP projection; only a linear projection after timm's pooling maps)"
        )
    if "proj" in names:
        return head.proj, []
    classifier = visual.trunk.get_classifier() if hasattr(visual.trunk, "get_classifier") else None
    if isinstance(classifier, nn.Linear):
        prefix = next(n for n, m in visual.trunk.named_modules() if m is classifier)
        return classifier, [f"{prefix}.weight", f"{prefix}.bias"]
    return None, []


def timm_wrapper_parts(model) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config.json dict, TimmWrapperModel state dict, projection tensors) for a model with a timm image tower."""
    from transformers import TimmWrapperConfig

    visual = model.visual
    if not isinstance(visual, open_clip.timm_model.TimmModel):
        raise NotRepresentableError(f"TimmWrapperModel holds timm towers; this one is {type(visual).__name__}")
    name = model.preset.vision_cfg.get("timm_model_name") or timm_tower_name(visual)  # the name timm was asked for
    owner = registered_outside_timm(name)
    if owner:
        raise outside_timm_error(visual, name, owner)
    vc = model.preset.vision_cfg
    proj, classifier_keys = _projection(visual)
    model_args = dict(vc.get("timm_model_kwargs") or {})
    pool = vc.get("timm_pool", "avg")
    if pool:
        model_args["global_pool"] = pool
    pp = model.preset.preprocess or {}
    mode = pp.get("resize_mode") or "shortest"
    if mode not in ("shortest", "squash"):
        raise NotRepresentableError(
            f"preprocess.resize_mode={mode!r} has no timm eval transform; valid: shortest, squash"
        )
    size = model.preset.image_size
    pretrained_cfg = {
        "architecture": name,
        "input_size": [3, size, size],
        "interpolation": pp.get("interpolation") or "bicubic",
        "mean": list(pp.get("mean") or open_clip.OPENAI_DATASET_MEAN),
        "std": list(pp.get("std") or open_clip.OPENAI_DATASET_STD),
        "crop_pct": 1.0,
        "crop_mode": "center" if mode == "shortest" else "squash",
        "num_classes": 0,
    }
    cfg = TimmWrapperConfig(architecture=name, model_args=model_args or None, num_labels=0)
    cfg.architectures = ["TimmWrapperModel"]
    data = cfg.to_dict()
    data.update(pretrained_cfg=pretrained_cfg, num_classes=0, label_names=[])
    state = {f"timm_model.{k}": v for k, v in visual.trunk.state_dict().items() if k not in classifier_keys}
    projection: dict[str, torch.Tensor] = {}
    if proj is not None:
        projection["weight"] = proj.weight.detach()
        if proj.bias is not None:
            projection["bias"] = proj.bias.detach()
    return data, state, projection


def export_timm_wrapper(model, out_dir: str | Path, overwrite: bool = False, info: dict | None = None) -> Path:
    """config.json (TimmWrapperConfig with the eval transform), model.safetensors (the trunk), the projection file
    and the model card."""
    import json

    from vlp.export.card import write_model_card
    from vlp.export.hf import WEIGHTS_NAME, prepare_output_dir, save_weights

    data, state, projection = timm_wrapper_parts(model)
    out = prepare_output_dir(out_dir, overwrite)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_weights(state, out / WEIGHTS_NAME)
    if projection:
        save_weights(projection, out / PROJECTION_NAME)
    write_model_card(out, "hf-vision", data["architecture"], "TimmWrapperModel", info or {"preset": model.preset.name})
    return out
