"""Export a run as an open_clip folder: ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads it.

open_clip-based tools (LAION's clip_benchmark, open_clip_train's eval) then evaluate our runs unchanged. The state
dict is our model's (we build open_clip's CLIP / CustomTextCLIP), so no key map is involved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlp.config import ConfigError, LossConfig
from vlp.export.hf import prepare_output_dir, save_weights
from vlp.export.towers import NotRepresentableError, is_meta, logit_values, registered_outside_timm
from vlp.model import DualTower, ModelPreset, build_model

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def check_open_clip_buildable(model: DualTower) -> None:
    """Refuse a model that open_clip cannot rebuild from a config alone (in a process without vlp), naming why."""
    preset = model.preset
    vc = preset.vision_cfg
    name = vc.get("timm_model_name")
    if name and vc.get("timm_model_kwargs"):
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        args = ", ".join(f"{k}={v}" for k, v in vc["timm_model_kwargs"].items())
        # a timm ViT maps to SigLIP's classes (hf-full too); any other timm model only to TimmWrapperModel
        instead = "hf-full or hf-vision" if isinstance(model.visual.trunk, TimmViT) else "hf-vision (TimmWrapperModel)"
        raise NotRepresentableError(
            f"cannot export to open_clip: the image tower is timm {name!r} built with timm.create_model arguments "
            f"({args}) that open_clip's TimmModel does not pass; use --format {instead}"
        )
    if name:
        owner = registered_outside_timm(name)
        if owner:
            raise NotRepresentableError(
                f"cannot export to open_clip: the image tower is timm {type(model.visual.trunk).__name__} {name!r}, "
                f"registered by {owner} and not by timm, so open_clip builds it only with vlp imported; no export "
                "format works for it: load the run with vlp"
            )
    if preset.tokenizer and "open_clip" not in preset.tokenizer:
        raise NotRepresentableError(
            "cannot export to open_clip: the text tower uses its own transformers tokenizer "
            f"({preset.tokenizer['hf']}), not open_clip's BPE; use --format hf-full"
        )


def open_clip_config(model: DualTower) -> dict:
    """open_clip_config.json: model_cfg (the preset, plus the logit scale/bias initialisers that decide which
    parameters exist) and preprocess_cfg (the eval transform)."""
    check_open_clip_buildable(model)
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
    preprocess = {
        "size": preset.image_size,
        "mode": "RGB",
        "interpolation": pp.get("interpolation") or "bicubic",
        "resize_mode": pp.get("resize_mode") or "shortest",
    }
    if pp.get("mean") is not None:
        preprocess["mean"] = list(pp["mean"])
    if pp.get("std") is not None:
        preprocess["std"] = list(pp["std"])
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(model: DualTower, out_dir: str | Path, overwrite: bool = False, info: dict | None = None) -> Path:
    """Write open_clip_config.json + open_clip_model.safetensors (+ README.md, the model card)."""
    from vlp.export.card import write_model_card
    from vlp.export.towers import tower_family_name

    cfg = open_clip_config(model)
    if is_meta(model):
        raise ValueError("cannot export a model built on the meta device (it has no weights)")
    out = prepare_output_dir(out_dir, overwrite)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    save_weights(model.clip.state_dict(), out / WEIGHTS_NAME)
    if model.preset.tokenizer:  # an imported open_clip model's HF tokenizer: open_clip reads it from the folder
        from vlp.export.hf import write_own_tokenizer

        write_own_tokenizer(out, model.preset.tokenizer["hf"], model.preset.context_length)
    arch = "CustomTextCLIP" if model.preset.custom_text else "CLIP"
    write_model_card(
        out, "open_clip", tower_family_name(model.clip), f"open_clip {arch}", info or {"preset": model.preset.name}
    )
    log.info("wrote open_clip folder %s", out)
    return out


# --------------------------------------------------------------------------------------------------------------
# Import: open_clip checkpoint -> our model
# --------------------------------------------------------------------------------------------------------------

WEIGHT_NAMES = (WEIGHTS_NAME, "open_clip_pytorch_model.bin", "open_clip_model.bin")


def read_open_clip(path: str | Path, model_config: str | None = None) -> tuple[dict, dict, Path]:
    """(model_cfg, preprocess_cfg, weights file) of an open_clip checkpoint.

    ``path`` is an open_clip ``local-dir:`` folder (open_clip_config.json + weights), or a weights file; then
    ``model_config`` names its model config: a JSON file (open_clip_config.json, or a bare model config as in
    open_clip's model_configs/) or the name of one of open_clip's built-in configs (e.g. ViT-B-32).
    """
    import open_clip

    p = Path(path)
    data: dict = {}
    if p.is_dir():
        if model_config:
            raise ConfigError("--model-config applies to a weights file; a folder holds its own open_clip_config.json")
        cfg_file = p / CONFIG_NAME
        if not cfg_file.is_file():
            raise ConfigError(
                f"{p}: no {CONFIG_NAME} (expected an open_clip local-dir folder, or a weights file with --model-config)"
            )
        data = json.loads(cfg_file.read_text())
        weights = next((p / n for n in WEIGHT_NAMES if (p / n).is_file()), None)
        if weights is None:
            raise ConfigError(f"{p}: no weights file; valid names: {', '.join(WEIGHT_NAMES)}")
    elif p.is_file():
        weights = p
        if not model_config:
            raise ConfigError(
                f"{p} is a weights file: pass --model-config (an open_clip model config JSON file or a "
                "built-in open_clip model name such as ViT-B-32)"
            )
        if Path(model_config).is_file():
            data = json.loads(Path(model_config).read_text())
        else:
            builtin = open_clip.get_model_config(model_config)
            if builtin is None:
                raise ConfigError(
                    f"--model-config {model_config!r} is neither a file nor an open_clip model name; "
                    f"valid names include {', '.join(open_clip.list_models()[:6])}, ..."
                )
            data = {"model_cfg": builtin}
    else:
        raise ConfigError(f"--checkpoint {p}: no such file or directory")
    model_cfg = data.get("model_cfg", data if "embed_dim" in data else None)
    if not model_cfg:
        raise ConfigError(f"{p}: the open_clip config has no model_cfg")
    return dict(model_cfg), dict(data.get("preprocess_cfg") or {}), weights


def preset_from_open_clip(name: str, model_cfg: dict, preprocess_cfg: dict, folder: Path | None) -> ModelPreset:
    """A preset with exactly the structure of an open_clip model config (open_clip builds both from it)."""
    import timm

    from vlp.export.hf import OPENAI_MEAN, OPENAI_STD

    mc = json.loads(json.dumps(model_cfg))
    unsupported = sorted(set(mc) & {"multimodal_cfg"}) + (
        ["text_cfg.hf_model_name"] if mc.get("text_cfg", {}).get("hf_model_name") else []
    )
    if unsupported:
        raise ConfigError(
            f"{name}: open_clip {', '.join(unsupported)} (CoCa or a transformers text encoder) is not "
            "importable; valid: CLIP / CustomTextCLIP with open_clip's text transformer"
        )
    vc, tc = mc["vision_cfg"], mc["text_cfg"]
    timm_name = vc.get("timm_model_name")
    if timm_name:
        if timm_name not in timm.list_models():
            raise ConfigError(f"{name}: timm model {timm_name!r} is not registered in timm {timm.__version__}")
        vc["timm_model_pretrained"] = False  # the weights come from the checkpoint
    tokenizer = None
    if tc.get("hf_tokenizer_name"):
        source = folder if folder is not None else Path(tc["hf_tokenizer_name"])
        if not (source.is_dir() and any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))):
            raise ConfigError(
                f"{name}: text_cfg.hf_tokenizer_name {tc['hf_tokenizer_name']!r} names a hub tokenizer; "
                "nothing can be downloaded here: use a local-dir folder holding the tokenizer files"
            )
        kwargs = dict(tc.get("tokenizer_kwargs") or {})
        if tc.get("tokenizer_mode"):
            kwargs["tokenizer_mode"] = tc["tokenizer_mode"]
        tokenizer = {"hf": str(source.resolve()), "open_clip": kwargs}
    size = vc.get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    if (
        int(
            preprocess_cfg.get("size", size)
            if not isinstance(preprocess_cfg.get("size"), list)
            else preprocess_cfg["size"][0]
        )
        != size
    ):
        raise ConfigError(f"{name}: preprocess size {preprocess_cfg['size']} differs from the image size {size}")
    preprocess = {
        "mean": list(preprocess_cfg.get("mean") or OPENAI_MEAN),
        "std": list(preprocess_cfg.get("std") or OPENAI_STD),
        "interpolation": preprocess_cfg.get("interpolation") or "bicubic",
        "resize_mode": preprocess_cfg.get("resize_mode") or "shortest",
    }
    return ModelPreset(
        name=name,
        embed_dim=int(mc["embed_dim"]),
        vision_cfg=vc,
        text_cfg=tc,
        custom_text=bool(mc.get("custom_text", False)),
        quick_gelu=bool(mc.get("quick_gelu", False)),
        preprocess=preprocess,
        tokenizer=tokenizer,
    )


def import_open_clip(path: str | Path, model_config: str | None = None) -> tuple[DualTower, LossConfig]:
    """Build our model from an open_clip checkpoint (same modules, so the same computation) and load its weights.

    The loss follows the checkpoint: siglip when it has a logit bias, else clip.
    """
    import torch

    model_cfg, preprocess_cfg, weights = read_open_clip(path, model_config)
    p = Path(path)
    preset = preset_from_open_clip(
        p.stem if p.is_file() else p.name, model_cfg, preprocess_cfg, p if p.is_dir() else None
    )
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    has_bias = "logit_bias" in state
    loss = LossConfig(
        name="siglip" if has_bias else "clip",
        init_logit_scale=model_cfg.get("init_logit_scale"),
        init_logit_bias=model_cfg.get("init_logit_bias") if has_bias else None,
    )
    model = build_model(preset, loss)
    if has_bias != (model.logit_bias is not None):
        raise ConfigError(
            f"{path}: the checkpoint {'has' if has_bias else 'lacks'} a logit bias but loss "
            f"{loss.name!r} {'does not use' if has_bias else 'needs'} one"
        )
    missing, unexpected = model.clip.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise ConfigError(f"{path} does not match its model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), loss
