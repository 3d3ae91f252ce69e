"""Projector checkpoints (``mm_projector.safetensors`` + ``mm_projector.json``) and the LLaVA export.

``export_llava`` writes a folder that ``transformers.LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load: the vision tower as a CLIPVisionModel/SiglipVisionModel, the projector as
``multi_modal_projector.linear_1/2``, the LLM, the feature layer and selection strategy, the image token id, and
a LlavaProcessor that expands ``<image>`` to as many tokens as the adapter used.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.projector import check_llava_projector, projector_depth
from adapters.vision import SELECT_TO_HF, FrozenVisionTower, HFTower, load_hf_vision_model
from vlp.config import ConfigError

log = logging.getLogger(__name__)

PROJECTOR_WEIGHTS = "mm_projector.safetensors"
PROJECTOR_CONFIG = "mm_projector.json"


# --------------------------------------------------------------------------------------------------------------
# Projector checkpoints
# --------------------------------------------------------------------------------------------------------------


def save_projector(projector: nn.Module, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the projector's weights and its config atomically (temporary names, then renames)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}
    tmp_w = out / f".{PROJECTOR_WEIGHTS}.tmp-{os.getpid()}"
    tmp_c = out / f".{PROJECTOR_CONFIG}.tmp-{os.getpid()}"
    save_file(state, str(tmp_w), metadata={"projector_type": str(meta.get("projector_type", ""))})
    tmp_c.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_w, out / PROJECTOR_WEIGHTS)
    os.replace(tmp_c, out / PROJECTOR_CONFIG)
    return out / PROJECTOR_WEIGHTS


def load_projector_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) from an ``mm_projector.safetensors`` file or a folder holding one."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"projector checkpoint not found: {path}")
    cfg_path = path.with_name(PROJECTOR_CONFIG)
    meta = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return load_file(str(path)), meta


# --------------------------------------------------------------------------------------------------------------
# LLaVA export
# --------------------------------------------------------------------------------------------------------------


def hf_projector_state(projector: nn.Module, projector_type: str, text_hidden: int) -> tuple[dict, str]:
    """The projector as LlavaMultiModalProjector weights and the activation name.

    ``mlp2x_gelu`` maps one to one (0 -> linear_1, 2 -> linear_2, GELU). ``linear`` is held exactly as
    linear_1 = the projector, an identity activation and linear_2 = the identity matrix. Deeper MLPs have no
    place in LlavaMultiModalProjector.
    """
    depth = projector_depth(projector_type)
    sd = {k: v.detach() for k, v in projector.state_dict().items()}
    if depth == 2:
        return {
            "linear_1.weight": sd["0.weight"],
            "linear_1.bias": sd["0.bias"],
            "linear_2.weight": sd["2.weight"],
            "linear_2.bias": sd["2.bias"],
        }, "gelu"
    if depth == 1:
        w = sd["0.weight"]
        return {
            "linear_1.weight": w,
            "linear_1.bias": sd["0.bias"],
            "linear_2.weight": torch.eye(text_hidden, dtype=w.dtype),
            "linear_2.bias": torch.zeros(text_hidden, dtype=w.dtype),
        }, "linear"
    check_llava_projector(projector_type)
    raise AssertionError(f"unhandled projector depth {depth}")


def hf_vision_tower(tower: FrozenVisionTower):
    """(transformers vision model, image processor) equal to ``tower``.

    A tower of this project goes through vlp.export's HF vision export (written to a temporary folder and loaded
    back with transformers), so the LLaVA folder holds exactly what ``scripts/export_hf.py --format hf-vision``
    would write.
    """
    if isinstance(tower, HFTower):
        return tower.model, tower.image_processor
    import tempfile

    from vlp.export import export_hf_vision
    from vlp.model import DualTower

    holder = nn.Module()
    holder.visual = tower.visual
    with tempfile.TemporaryDirectory(prefix="vlp-llava-tower-") as tmp:
        export_hf_vision(DualTower(holder, tower.preset), Path(tmp) / "vision")
        model, processor = load_hf_vision_model(Path(tmp) / "vision")
    return model, processor


def _llm_state_for_llava(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The causal LM's weights under LlavaForConditionalGeneration's names."""
    prefix = llm.base_model_prefix
    out = {}
    for k, v in llm.state_dict().items():
        if k.startswith(prefix + "."):
            out["model.language_model." + k[len(prefix) + 1 :]] = v
        elif k.startswith("lm_head."):
            out[k] = v
        else:
            raise ConfigError(f"cannot place LLM weight {k!r} in the LLaVA layout (expected {prefix}.* or lm_head.*)")
    return out


def build_llava_model(
    tower: FrozenVisionTower, projector: nn.Module, projector_type: str, llm: nn.Module, image_token_id: int
):
    """A transformers LlavaForConditionalGeneration holding the adapter's weights, and the vision image processor."""
    from accelerate import init_empty_weights
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision_model, image_processor = hf_vision_tower(tower)
    text_hidden = llm.config.hidden_size
    proj_state, act = hf_projector_state(projector, projector_type, text_hidden)
    config = LlavaConfig(
        vision_config=vision_model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=tower.num_positions,
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy=SELECT_TO_HF[tower.select],
        projector_hidden_act=act,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    state = {"model.vision_tower." + k: v for k, v in vision_model.state_dict().items()}
    state.update({"model.multi_modal_projector." + k: v for k, v in proj_state.items()})
    state.update(_llm_state_for_llava(llm))
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise AssertionError(f"LLaVA key map mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model, image_processor


def export_llava(
    tower: FrozenVisionTower,
    projector: nn.Module,
    projector_type: str,
    llm: nn.Module,
    tokenizer,
    image_token: str,
    image_token_id: int,
    out_dir: str | Path,
) -> Path:
    """Write the LLaVA folder (model + processor); returns its path."""
    from transformers import LlavaProcessor

    out = Path(out_dir)
    model, image_processor = build_llava_model(tower, projector, projector_type, llm, image_token_id)
    model.save_pretrained(out)
    patch_size = int(model.config.vision_config.patch_size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=SELECT_TO_HF[tower.select],
        image_token=image_token,
        num_additional_image_tokens=tower.num_prefix_tokens,
    )
    processor.save_pretrained(out)
    log.info("wrote a LlavaForConditionalGeneration folder to %s", out)
    return out
