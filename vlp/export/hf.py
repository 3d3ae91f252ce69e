"""Export our dual towers to Hugging Face transformers folders, and import HF CLIP/SigLIP folders back.

Formats:
  hf-vision  the image tower alone: ``CLIPVisionModelWithProjection`` (open_clip ViT) or ``SiglipVisionModel``
             (timm MAP-pooled ViT), the tower LLaVA-style models load.
  hf-full    both towers: ``CLIPModel`` or ``SiglipModel`` with tokenizer files built from open_clip's BPE
             vocabulary and an image processor, so that ``pipeline("zero-shot-image-classification")`` works.

Weights are written by us, with the key layout of transformers 4.x (every vision key under ``vision_model.``), which
5.x also reads; configs are written in full (not as a diff against the installed version's defaults) so that a
different transformers version reads the same numbers.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.config import ConfigError, LossConfig
from vlp.export import keymaps as km
from vlp.export import towers
from vlp.export.card import write_model_card
from vlp.export.towers import BPE_VOCAB_SIZE, EOT_ID, NotRepresentableError
from vlp.model import DualTower, ModelPreset, build_model

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
PAD_TOKEN = "<|pad|>"  # SigLIP exports only: pads with id 49408, whose embedding row copies row 0
# PIL resampling filter ids, as transformers' image processors store them.
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------------------
# Configs and state dicts (no files)
# --------------------------------------------------------------------------------------------------------------


def _our_state(model: DualTower | nn.Module) -> dict[str, torch.Tensor]:
    clip = model.clip if isinstance(model, DualTower) else model
    return dict(clip.state_dict())


def _clip_module(model: DualTower | nn.Module) -> nn.Module:
    return model.clip if isinstance(model, DualTower) else model


def vision_rules(clip: nn.Module) -> list[km.Rule]:
    """The vision key map for this model's tower family and depth."""
    layers = towers.num_vision_layers(clip)
    if towers.tower_family(clip) == "clip":
        return km.clip_vision_rules(layers)
    return km.siglip_vision_rules(layers)


def own_tokenizer(model: DualTower | nn.Module) -> str | None:
    """The folder of the model's own transformers tokenizer (an imported SigLIP's), or None for open_clip's BPE."""
    preset = getattr(model, "preset", None)
    return preset.tokenizer["hf"] if preset is not None and preset.tokenizer else None


def full_rules(model: DualTower | nn.Module) -> list[km.Rule]:
    """The whole-model key map (vision, text, logit scale/bias) for this model's family and depths."""
    clip = _clip_module(model)
    family = towers.tower_family(clip)
    layers = towers.num_text_layers(clip)
    if family == "clip":
        return vision_rules(clip) + km.clip_text_rules(layers) + km.logit_rules(siglip=False, bias=False)
    has_bias = getattr(clip, "logit_bias", None) is not None
    bpe = own_tokenizer(model) is None
    return vision_rules(clip) + km.siglip_text_rules(layers, bpe=bpe) + km.logit_rules(siglip=True, bias=has_bias)


def hf_vision_config(model: DualTower | nn.Module):
    """The transformers config of the exported vision tower (CLIPVisionConfig or SiglipVisionConfig)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    clip = _clip_module(model)
    if towers.tower_family(clip) == "clip":
        cfg = CLIPVisionConfig(**towers.clip_vision_config(clip.visual))
        cfg.architectures = ["CLIPVisionModelWithProjection"]
    else:
        cfg = SiglipVisionConfig(**towers.siglip_vision_config(clip.visual))
        cfg.architectures = ["SiglipVisionModel"]
    return cfg


def hf_full_config(model: DualTower | nn.Module):
    """The transformers config of the exported dual tower (CLIPConfig or SiglipConfig), logit scale/bias included."""
    from transformers import CLIPConfig, SiglipConfig

    clip = _clip_module(model)
    scale, bias = towers.logit_values(clip)
    if towers.tower_family(clip) == "clip":
        vision = towers.clip_vision_config(clip.visual)
        text = towers.clip_text_config(clip)
        if vision["projection_dim"] != text["projection_dim"]:
            raise NotRepresentableError(
                f"image and text embeddings differ in width ({vision['projection_dim']} vs {text['projection_dim']})"
            )
        extra = {} if bias is None else {"logit_bias": bias}
        cfg = CLIPConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=vision["projection_dim"],
            logit_scale_init_value=scale,
            **extra,
        )
        cfg.architectures = ["CLIPModel"]
    else:
        vision = towers.siglip_vision_config(clip.visual)
        tok_dir = own_tokenizer(model)
        text = towers.siglip_text_config(clip, own_tokenizer=tok_dir is not None)
        if tok_dir is not None:
            text.update(_special_ids(tok_dir))
        if text["projection_size"] != vision["hidden_size"]:
            raise NotRepresentableError(
                f"text embedding width {text['projection_size']} differs from the image embedding width "
                f"{vision['hidden_size']} (SiglipModel compares the MAP-pooled image features directly)"
            )
        cfg = SiglipConfig(text_config=text, vision_config=vision)
        cfg.architectures = ["SiglipModel"]
    return cfg


def hf_vision_state(model: DualTower | nn.Module) -> dict[str, torch.Tensor]:
    """HF state dict of the vision tower, keys as transformers 4.x and 5.x read them (``vision_model.`` ...)."""
    clip = _clip_module(model)
    hf_vision_config(clip)  # refuses unrepresentable towers before any tensor work
    state = {k: v for k, v in _our_state(clip).items() if k.startswith("visual.")}
    return km.ours_to_hf(state, vision_rules(clip), what="vision export")


def hf_full_state(model: DualTower | nn.Module) -> dict[str, torch.Tensor]:
    """HF state dict of the whole dual tower (CLIPModel / SiglipModel key layout)."""
    clip = _clip_module(model)
    hf_full_config(model)
    state = _our_state(clip)
    siglip = towers.tower_family(clip) == "siglip"
    if not siglip:
        state.pop("logit_bias", None)  # CLIPModel has no bias: it travels in config.json (softmax ignores it)
    out = km.ours_to_hf(state, full_rules(model), what="export")
    if siglip and "logit_bias" not in out:
        out["logit_bias"] = torch.zeros(1, dtype=out["logit_scale"].dtype, device=out["logit_scale"].device)
    return out


@functools.lru_cache(maxsize=8)
def _special_ids(folder: str) -> dict[str, int]:
    """bos/eos/pad ids of a transformers tokenizer folder (what SiglipTextConfig records)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


# --------------------------------------------------------------------------------------------------------------
# Preprocessing and tokenizer files
# --------------------------------------------------------------------------------------------------------------


def image_processor_dict(preset: ModelPreset, family: str) -> dict[str, Any]:
    """preprocessor_config.json reproducing the preset's eval transform (open_clip.image_transform, is_train=False)."""
    pp = preset.preprocess or {}
    size = preset.image_size
    mode = pp.get("resize_mode") or "shortest"
    interp = pp.get("interpolation") or "bicubic"
    if interp not in RESAMPLE:
        raise NotRepresentableError(f"preprocess.interpolation={interp!r}; valid: {', '.join(RESAMPLE)}")
    common = {
        "do_resize": True,
        "resample": RESAMPLE[interp],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pp.get("mean") or OPENAI_MEAN),
        "image_std": list(pp.get("std") or OPENAI_STD),
        "do_convert_rgb": True,
    }
    processor = "CLIPProcessor" if family == "clip" else "SiglipProcessor"
    if mode == "shortest":  # resize the shorter side to `size`, then centre-crop size x size
        return {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": processor,
            **common,
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
        }
    if mode == "squash":  # resize to size x size, ignoring the aspect ratio
        kind = "CLIPImageProcessor" if family == "clip" else "SiglipImageProcessor"
        return {
            "image_processor_type": kind,
            "processor_class": processor,
            **common,
            "size": {"height": size, "width": size},
            "do_center_crop": False,
        }
    raise NotRepresentableError(
        f"preprocess.resize_mode={mode!r} (resize the longer side and pad) has no "
        "transformers image processor; valid for export: shortest, squash"
    )


def image_processor(processor: Mapping[str, Any]):
    """The transformers image processor (CLIPImageProcessor / SiglipImageProcessor) an image_processor_dict names."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    kwargs = {k: v for k, v in processor.items() if k not in ("image_processor_type", "processor_class")}
    cls = {"CLIPImageProcessor": CLIPImageProcessor, "SiglipImageProcessor": SiglipImageProcessor}
    return cls[processor["image_processor_type"]](**kwargs)


def write_image_processor(out_dir: Path, processor: Mapping[str, Any]) -> None:
    """preprocessor_config.json, written by the transformers processor class itself (``save_pretrained``)."""
    image_processor(processor).save_pretrained(str(out_dir))


def bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """open_clip's BPE vocabulary and merges (the file it ships), with CLIP's special-token spellings.

    Ids are identical to open_clip's SimpleTokenizer: 256 byte symbols, the same with an end-of-word mark, one
    token per merge, then start and end of text (49406, 49407).
    """
    vocab, merges = _bpe_vocab_and_merges()
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=1)
def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == BPE_VOCAB_SIZE and vocab.index("<|endoftext|>") == EOT_ID
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_hf_tokenizer(context_length: int, pad_token: str = "<|endoftext|>", attention_mask: bool = True):
    """transformers CLIPTokenizer giving open_clip's token ids for the same strings.

    CLIP exports pad with the end-of-text token, as OpenAI's HF checkpoints do: the causal tower pools the first
    end-of-text token and never looks past it. SigLIP exports pad with :data:`PAD_TOKEN` (id 49408, embedding =
    row 0), and return no attention mask: the bidirectional tower attends to the padding exactly as during training.
    """
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocab_and_merges()
    if pad_token not in vocab:
        vocab[pad_token] = len(vocab)
    names = ["input_ids", "attention_mask"] if attention_mask else ["input_ids"]
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split()) for m in merges],
        pad_token=pad_token,
        model_max_length=context_length,
        model_input_names=names,
    )


def write_own_tokenizer(out_dir: Path, folder: str, context_length: int) -> None:
    """The model's own transformers tokenizer (an imported SigLIP's), saved by transformers, padding to the context."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.model_max_length = context_length
    tok.save_pretrained(str(out_dir))
    # transformers 4.x reads extra_special_tokens as a dict and fails on the empty list 5.x writes; the loading
    # flags 5.x records describe this machine, not the model
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("extra_special_tokens") in ([], {}):
        cfg.pop("extra_special_tokens")
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer(out_dir: Path, context_length: int, family: str) -> None:
    """tokenizer.json + tokenizer_config.json (5.x and 4.x fast), vocab.json + merges.txt (4.x slow)."""
    siglip = family == "siglip"
    tok = build_hf_tokenizer(context_length, PAD_TOKEN if siglip else "<|endoftext|>", attention_mask=not siglip)
    tok.save_pretrained(str(out_dir))
    vocab, merges = bpe_vocab_and_merges()
    if siglip:
        vocab[PAD_TOKEN] = BPE_VOCAB_SIZE
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        {
            "processor_class": "CLIPProcessor" if not siglip else "SiglipProcessor",
            "model_input_names": ["input_ids"] if siglip else ["input_ids", "attention_mask"],
            "do_lower_case": True,
            "errors": "replace",
        }
    )
    cfg_path.write_text(json.dumps(cfg, indent=2))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": PAD_TOKEN if siglip else "<|endoftext|>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


# --------------------------------------------------------------------------------------------------------------
# Writing folders
# --------------------------------------------------------------------------------------------------------------


# Every file name an export or import writes: --overwrite removes these and nothing else.
OUTPUT_FILES = {
    "config.json",
    "preprocessor_config.json",
    WEIGHTS_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "open_clip_config.json",
    "open_clip_model.safetensors",
    "preset.yaml",
    "checkpoint.pt",
    "config.yaml",
    "added_tokens.json",
    "processor_config.json",
    "chat_template.jinja",
    "spiece.model",
    "tokenizer.model",
    "README.md",
    "open_clip_pytorch_model.bin",
    "tokenizer",
    "source.json",
    "image_projection.safetensors",
}


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite``, and even then refuse one that holds files
    an export does not write (so a mistyped --output never deletes unrelated data)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--output {out} is not empty; pass --overwrite true to replace its contents")
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in OUTPUT_FILES or not (p.is_file() or p.name == "tokenizer")
        )
        if foreign:
            raise ConfigError(
                f"--output {out} holds files an export does not write ({', '.join(foreign[:5])}); "
                "refusing to overwrite it, choose an empty folder"
            )
        for p in out.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_weights(state: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    """safetensors file with the ``format: pt`` metadata that transformers checks."""
    from safetensors.torch import save_file

    if any(t.device.type == "meta" for t in state.values()):
        raise ConfigError("cannot save a model built on the meta device (it has no weights)")
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in state.items()
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _config_dict(cfg) -> dict[str, Any]:
    data = json.loads(cfg.to_json_string(use_diff=False))
    for key in ("_name_or_path",):
        data.pop(key, None)
    return data


def export_hf_vision(
    model: DualTower, out_dir: str | Path, overwrite: bool = False, info: dict[str, Any] | None = None
) -> Path:
    """Write the vision tower as a transformers folder (config.json, preprocessor_config.json, model.safetensors).

    A timm tower that is not a SigLIP ViT becomes a ``TimmWrapperModel`` (vlp/export/timm_wrapper.py)."""
    import open_clip

    try:
        cfg = hf_vision_config(model)
    except NotRepresentableError as siglip_error:
        if not isinstance(model.visual, open_clip.timm_model.TimmModel):
            raise
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        from vlp.export.timm_wrapper import export_timm_wrapper, timm_wrapper_parts

        try:
            timm_wrapper_parts(model)
        except NotRepresentableError:
            if isinstance(model.visual.trunk, TimmViT):  # a ViT: why SiglipVisionModel cannot hold it is the news
                raise siglip_error from None
            raise
        return export_timm_wrapper(model, out_dir, overwrite=overwrite, info=info)
    state = hf_vision_state(model)
    family = towers.tower_family(model.clip)
    processor = image_processor_dict(model.preset, family)
    out = prepare_output_dir(out_dir, overwrite)
    _write_json(out / "config.json", _config_dict(cfg))
    write_image_processor(out, processor)
    save_weights(state, out / WEIGHTS_NAME)
    write_model_card(out, "hf-vision", family, cfg.architectures[0], info or {"preset": model.preset.name})
    log.info("wrote %s (%s, %d tensors) to %s", cfg.architectures[0], family, len(state), out)
    return out


def export_hf_full(
    model: DualTower, out_dir: str | Path, overwrite: bool = False, info: dict[str, Any] | None = None
) -> Path:
    """Write both towers as CLIPModel / SiglipModel with tokenizer and image processor files."""
    cfg = hf_full_config(model)
    state = hf_full_state(model)
    family = towers.tower_family(model.clip)
    processor = image_processor_dict(model.preset, family)
    _, bias = towers.logit_values(model.clip)
    if family == "clip" and bias is not None:
        log.warning(
            "CLIPModel has no logit bias: b=%.4f is kept in config.json as `logit_bias`; softmax "
            "probabilities (the zero-shot pipeline) do not depend on it",
            bias,
        )
    if family == "siglip" and bias is None:
        log.warning(
            "this model was trained without a logit bias; SiglipModel gets logit_bias = 0 and the "
            "zero-shot pipeline will report sigmoid scores, not the softmax this model was trained for"
        )
    out = prepare_output_dir(out_dir, overwrite)
    _write_json(out / "config.json", _config_dict(cfg))
    write_image_processor(out, processor)
    context = model.preset.context_length
    if own_tokenizer(model):
        write_own_tokenizer(out, own_tokenizer(model), context)
    else:
        write_tokenizer(out, context, family)
    save_weights(state, out / WEIGHTS_NAME)
    write_model_card(out, "hf-full", family, cfg.architectures[0], info or {"preset": model.preset.name})
    log.info("wrote %s (%d tensors) to %s", cfg.architectures[0], len(state), out)
    return out


# --------------------------------------------------------------------------------------------------------------
# Import: HF folder -> our model
# --------------------------------------------------------------------------------------------------------------

VISION_ONLY = {"clip_vision_model", "siglip_vision_model"}


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json (expected a transformers CLIP/SigLIP model folder)")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") not in ("clip", "siglip", *VISION_ONLY):
        raise ConfigError(
            f"{folder}: model_type {cfg.get('model_type')!r} is not importable; valid: clip, siglip, "
            "clip_vision_model, siglip_vision_model"
        )
    return cfg


def read_hf_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (model.safetensors, a sharded index, or pytorch_model.bin), vision keys under
    ``vision_model.`` even where transformers 5.x saved a bare vision model without the prefix."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / WEIGHTS_NAME).is_file():
        state = load_file(str(folder / WEIGHTS_NAME))
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    cfg = read_hf_config(folder)
    if cfg["model_type"] in VISION_ONLY:
        state = {
            k if k.startswith(("vision_model.", "visual_projection.")) else f"vision_model.{k}": v
            for k, v in state.items()
        }
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio r with int(width * r) == hidden (open_clip sizes its MLP that way)."""
    r = hidden / width
    return r if int(width * r) == hidden else (hidden + 0.5) / width


def _norm_act(cfg: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
    """(norm_kwargs, act_kwargs, quick_gelu) for an HF sub-config."""
    act = cfg.get("hidden_act", "gelu")
    eps = float(cfg.get("layer_norm_eps", 1e-5))
    norm = {} if eps == 1e-5 else {"eps": eps}
    if act == "quick_gelu":
        return norm, None, True
    if act == "gelu":
        return norm, None, False
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        return norm, {"approximate": "tanh"}, False
    raise NotRepresentableError(
        f"{where} hidden_act={act!r} has no open_clip equivalent; valid: gelu, quick_gelu, gelu_pytorch_tanh"
    )


def _preprocess_from_hf(folder: Path, image_size: int) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        log.warning("%s: no preprocessor_config.json; keeping OpenAI mean/std, bicubic, shortest-side resize", folder)
        return {
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
    pp = json.loads(path.read_text())
    interp = {v: k for k, v in RESAMPLE.items()}.get(int(pp.get("resample", 3)), "bicubic")
    size = pp.get("size", {})
    if isinstance(size, int):  # older configs (CLIPFeatureExtractor): an int is the shorter side, or a square
        siglip_type = str(pp.get("image_processor_type", "")).startswith("Siglip")
        size = {"height": size, "width": size} if siglip_type else {"shortest_edge": size}
    if isinstance(size, dict) and "shortest_edge" in size and pp.get("do_center_crop", True):
        mode = "shortest"
    elif isinstance(size, dict) and "height" in size and not pp.get("do_center_crop", False):
        mode = "squash"
    else:
        raise NotRepresentableError(
            f"{path}: resize {size} with do_center_crop={pp.get('do_center_crop')} matches "
            "no open_clip resize_mode (shortest or squash)"
        )
    sizes = {size.get("shortest_edge", size.get("height")), size.get("width", image_size)}
    if mode == "shortest":
        crop = pp.get("crop_size", {"height": image_size, "width": image_size})
        sizes |= {crop.get("height"), crop.get("width")} if isinstance(crop, dict) else {crop}
    if sizes != {image_size}:
        raise NotRepresentableError(
            f"{path}: resize/crop sizes {sorted(map(str, sizes))} differ from the model's "
            f"image_size {image_size} (our transform resizes to the model's input size)"
        )
    return {
        "mean": list(pp.get("image_mean", OPENAI_MEAN)),
        "std": list(pp.get("image_std", OPENAI_STD)),
        "interpolation": interp,
        "resize_mode": mode,
    }


SIGLIP_TIMM_BASE = "vit_base_patch16_siglip_224"  # timm's SigLIP ViT: no class token, MAP pooling, LayerNorm eps 1e-6
_TIMM_ACT = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


def siglip_vision_cfg(vc: Mapping[str, Any]) -> dict[str, Any]:
    """The preset vision_cfg of a timm ViT that computes exactly what an HF SiglipVisionConfig computes.

    A registered timm SigLIP model of the same structure is named as it is (open_clip can then build it too);
    otherwise (Google's checkpoints use tanh-GELU, timm's registrations exact GELU; shrunk or new shapes) timm's
    SigLIP ViT is built with the config's own shape and activation through ``timm_model_kwargs``.
    """
    image_size = int(vc["image_size"])
    base = {"image_size": image_size, "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"}
    if not vc.get("vision_use_head", True):
        raise NotRepresentableError(
            "SigLIP vision_use_head=false (no attention-pooling head) is not importable; "
            "valid: a SiglipVisionModel with its MAP head"
        )
    eps = float(vc.get("layer_norm_eps", 1e-6))
    if not math.isclose(eps, 1e-6):
        raise NotRepresentableError(f"SigLIP vision layer_norm_eps={eps}: timm's SigLIP ViT uses 1e-6; valid: 1e-6")
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _TIMM_ACT:
        raise NotRepresentableError(f"SigLIP vision hidden_act={act!r}; valid: {', '.join(_TIMM_ACT)}")
    if act == "gelu":
        try:
            return {**base, "timm_model_name": _siglip_timm_name(vc)}
        except NotRepresentableError:
            pass
    width = int(vc["hidden_size"])
    kwargs = {
        "img_size": image_size,
        "patch_size": int(vc["patch_size"]),
        "embed_dim": width,
        "depth": int(vc["num_hidden_layers"]),
        "num_heads": int(vc["num_attention_heads"]),
        "mlp_ratio": _mlp_ratio(width, int(vc["intermediate_size"])),
        "act_layer": _TIMM_ACT[act],
    }
    if int(vc.get("num_channels", 3)) != 3:
        kwargs["in_chans"] = int(vc["num_channels"])
    return {**base, "timm_model_name": SIGLIP_TIMM_BASE, "timm_model_kwargs": kwargs}


def _hf_tokenizer_check(folder: Path, vocab_size: int) -> None:
    """Refuse a folder whose own tokenizer transformers cannot load, or whose ids exceed the embedding table."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - any loading failure means: no usable tokenizer
        raise NotRepresentableError(
            f"{folder}: text vocab_size {vocab_size} is not open_clip's BPE and transformers cannot load the folder's "
            f"tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); add its tokenizer files "
            "(sentencepiece is needed for SigLIP's) or import the vision tower alone (--vision-only true "
            "--preset NAME)"
        ) from None
    if len(tok) > vocab_size:
        raise NotRepresentableError(
            f"{folder}: the tokenizer has {len(tok)} tokens but the text embedding table {vocab_size} rows"
        )


def _siglip_timm_name(vc: Mapping[str, Any]) -> str:
    """The registered timm SigLIP ViT whose structure matches an HF SiglipVisionConfig exactly (checked on meta)."""
    import timm

    patch, size = int(vc["patch_size"]), int(vc["image_size"])
    want = _siglip_vision_signature(vc)
    candidates = [n for n in timm.list_models(f"vit_*patch{patch}_siglip_{size}*") if "gap" not in n]
    for name in candidates:
        with torch.device("meta"):
            trunk = timm.create_model(name, pretrained=False, num_classes=0, global_pool="map")
        try:
            got = _siglip_vision_signature(towers.siglip_trunk_config(trunk))
        except NotRepresentableError:
            continue
        if got == want:
            return name
    raise NotRepresentableError(
        f"no timm SigLIP ViT matches this vision config ({want}); candidates tried: {', '.join(candidates) or 'none'}"
    )


def _siglip_vision_signature(vc: Mapping[str, Any]) -> tuple:
    return tuple(
        vc.get(k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
        )
    )


def preset_from_hf(
    folder: str | Path, text_preset: ModelPreset | None = None, vision_only: bool = False
) -> ModelPreset:
    """A model preset with exactly the structure of an HF CLIP/SigLIP folder.

    A vision-only folder (or ``vision_only``) takes its text tower from ``text_preset`` (required then).
    """
    import open_clip  # noqa: F401  (timm_model registration side effects)

    folder = Path(folder)
    cfg = read_hf_config(folder)
    mt = cfg["model_type"]
    vc = cfg if mt in VISION_ONLY else cfg["vision_config"]
    tc = None if mt in VISION_ONLY or vision_only else cfg["text_config"]
    if tc is None and text_preset is None:
        raise ConfigError(f"{folder} holds only a vision tower; pass --preset NAME for the text tower")
    v_norm, v_act, v_quick = _norm_act(vc, "vision")
    image_size = int(vc["image_size"])
    preprocess = _preprocess_from_hf(folder, image_size)
    if mt in ("clip", "clip_vision_model"):
        width = int(vc["hidden_size"])
        vision_cfg: dict[str, Any] = {
            "image_size": image_size,
            "patch_size": int(vc["patch_size"]),
            "width": width,
            "layers": int(vc["num_hidden_layers"]),
            "head_width": width // int(vc["num_attention_heads"]),
            "mlp_ratio": _mlp_ratio(width, int(vc["intermediate_size"])),
        }
        embed_dim = int(cfg.get("projection_dim") or vc.get("projection_dim"))
    else:
        vision_cfg = siglip_vision_cfg(vc)
        embed_dim = int(vc["hidden_size"])
        v_quick, v_act, v_norm = False, None, {}  # the timm trunk carries its own activation and eps
    if v_norm:
        vision_cfg["norm_kwargs"] = v_norm
    if v_act:
        vision_cfg["act_kwargs"] = v_act
    tokenizer = None
    if tc is None:
        text_cfg = dict(text_preset.text_cfg)
        custom_text, t_quick = text_preset.custom_text, text_preset.quick_gelu
        tokenizer = text_preset.tokenizer
    else:
        t_norm, t_act, t_quick = _norm_act(tc, "text")
        width = int(tc["hidden_size"])
        text_cfg = {
            "context_length": int(tc["max_position_embeddings"]),
            "vocab_size": int(tc["vocab_size"]),
            "width": width,
            "heads": int(tc["num_attention_heads"]),
            "layers": int(tc["num_hidden_layers"]),
            "mlp_ratio": _mlp_ratio(width, int(tc["intermediate_size"])),
        }
        if t_norm:
            text_cfg["norm_kwargs"] = t_norm
        if t_act:
            text_cfg["act_kwargs"] = t_act
        custom_text = mt == "siglip"
        if custom_text:
            if text_cfg["vocab_size"] == BPE_VOCAB_SIZE + 1:  # our own BPE export: open_clip's tokenizer
                text_cfg.update(vocab_size=BPE_VOCAB_SIZE)
            else:  # the checkpoint's own tokenizer (SentencePiece, Gemma, ...), through transformers
                _hf_tokenizer_check(folder, text_cfg["vocab_size"])
                tokenizer = {"hf": str(folder.resolve())}
            text_cfg.update(no_causal_mask=True, proj_bias=True, pool_type="last")
            if int(tc.get("projection_size", width)) != embed_dim:
                raise NotRepresentableError(
                    f"SigLIP text projection_size {tc.get('projection_size')} != vision width {embed_dim}"
                )
        elif text_cfg["vocab_size"] != BPE_VOCAB_SIZE:
            raise NotRepresentableError(
                f"CLIP text vocab_size {text_cfg['vocab_size']} (the open_clip BPE tokenizer "
                f"has {BPE_VOCAB_SIZE}); import the vision tower alone (--vision-only true)"
            )
    if mt in ("clip", "clip_vision_model") and tc is not None and v_quick != t_quick:
        raise NotRepresentableError("CLIP towers with different activations (open_clip has one quick_gelu flag)")
    quick = v_quick if mt.startswith("clip") else t_quick
    if tc is None and mt.startswith("clip") and v_quick != text_preset.quick_gelu:
        log.warning(
            "the text tower of preset %r is built with %s to match the image tower (open_clip has one "
            "quick_gelu flag for both); it is freshly initialised",
            text_preset.name,
            "QuickGELU" if v_quick else "GELU",
        )
    return ModelPreset(
        name=folder.name,
        embed_dim=embed_dim,
        vision_cfg=vision_cfg,
        text_cfg=text_cfg,
        custom_text=custom_text,
        quick_gelu=quick,
        preprocess=preprocess,
        tokenizer=tokenizer,
    )


def load_hf_weights(model: DualTower | nn.Module, folder: str | Path, vision_only: bool = False) -> dict[str, Any]:
    """Load an HF CLIP/SigLIP folder's weights into ``model`` (same structure), through the same key maps as export.

    Returns a summary (what was loaded). With ``vision_only``, only the image tower is replaced.
    """
    clip = _clip_module(model)
    folder = Path(folder)
    cfg = read_hf_config(folder)
    hf_state = read_hf_state(folder)
    family = towers.tower_family(clip)
    hf_family = "clip" if cfg["model_type"].startswith("clip") else "siglip"
    if hf_family != family:
        raise ConfigError(
            f"{folder} holds a {hf_family.upper()} model but the target preset has a {family} vision tower"
        )
    if vision_only or cfg["model_type"] in VISION_ONLY:
        keep = ("vision_model.", "visual_projection.")
        rules = vision_rules(clip)
        ours = km.hf_to_ours({k: v for k, v in hf_state.items() if k.startswith(keep)}, rules, what=f"{folder}")
        target = {k: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    else:
        rules = full_rules(model)
        hf_state = dict(hf_state)
        has_bias = getattr(clip, "logit_bias", None) is not None
        if family == "siglip" and not has_bias:
            hf_state.pop("logit_bias", None)
        ours = km.hf_to_ours(hf_state, rules, what=f"{folder}")
        if family == "clip" and has_bias:
            b = cfg.get("logit_bias")
            if b is None:
                log.warning("%s has no logit bias; keeping the initial b=%.3f", folder, clip.logit_bias.item())
            ours["logit_bias"] = clip.logit_bias.detach().clone() if b is None else torch.tensor(float(b))
        target = clip.state_dict()
    bad = [k for k in target if k in ours and tuple(ours[k].shape) != tuple(target[k].shape)]
    if bad or set(ours) != set(target):
        detail = "; ".join(f"{k}: {tuple(ours[k].shape)} vs {tuple(target[k].shape)}" for k in bad[:5])
        raise ConfigError(
            f"{folder} does not match the target model: missing {sorted(set(target) - set(ours))[:5]}, "
            f"unexpected {sorted(set(ours) - set(target))[:5]}, shapes {detail}"
        )
    with torch.no_grad():
        for k, v in ours.items():
            target[k].copy_(v.to(target[k].dtype))
    return {"tensors": len(ours), "family": family, "vision_only": vision_only or cfg["model_type"] in VISION_ONLY}


def import_hf(
    folder: str | Path, preset: ModelPreset | str | None = None, loss: str | None = None, vision_only: bool = False
) -> tuple[DualTower, LossConfig]:
    """Build our model from a local HF CLIP/SigLIP folder (for fine-tuning here).

    Without ``preset`` the structure is derived from the folder. With one, a whole-model import must match it; for a
    vision-only folder or with ``vision_only``, the image tower is derived from the folder (activation included, e.g.
    Google SigLIP's tanh-GELU) and the preset supplies only the text tower. ``loss`` defaults to the folder's
    family (clip for CLIPModel, siglip for SiglipModel) and decides whether the model has a logit bias.
    """
    from vlp.model import load_preset

    folder = Path(folder)
    cfg = read_hf_config(folder)
    given = load_preset(preset) if isinstance(preset, str) else preset
    if given is not None and (vision_only or cfg["model_type"] in VISION_ONLY):
        use = preset_from_hf(folder, text_preset=given, vision_only=True)
    else:
        use = given if given is not None else preset_from_hf(folder)
    if loss is None:
        loss = "siglip" if cfg["model_type"].startswith("siglip") else "clip"
    if loss not in ("clip", "siglip"):
        raise ConfigError(f"loss {loss!r}; valid: clip, siglip")
    loss_cfg = LossConfig(name=loss)
    model = build_model(use, loss_cfg)
    model.eval()
    vision_only = vision_only or cfg["model_type"] in VISION_ONLY
    check_structure(model, cfg, vision_only, what=f"preset {use.name!r} vs {folder}")
    load_hf_weights(model, folder, vision_only=vision_only)
    return model, loss_cfg


_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)
_TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
)
_SAME_ACT = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}


def check_structure(model: DualTower, hf_cfg: Mapping[str, Any], vision_only: bool, what: str) -> None:
    """Refuse to load a folder into a model that computes differently (activation, eps, sizes), not only one whose
    tensor shapes differ: the config our export would write for ``model`` must agree with the folder's."""
    ours_vision = hf_vision_config(model).to_dict()
    mt = hf_cfg["model_type"]
    pairs = [("vision", ours_vision, hf_cfg if mt in VISION_ONLY else hf_cfg["vision_config"], _VISION_FIELDS)]
    if not vision_only:
        pairs.append(("text", hf_full_config(model).text_config.to_dict(), hf_cfg["text_config"], _TEXT_FIELDS))
    bad = []
    for tower, ours, theirs, fields in pairs:
        for f in fields:
            a, b = ours.get(f), theirs.get(f)
            if f == "hidden_act":
                a, b = _SAME_ACT.get(a, a), _SAME_ACT.get(b, b)
            if f == "layer_norm_eps" and a is not None and b is not None and math.isclose(a, b):
                continue
            if a != b:
                bad.append(f"{tower} {f}: ours {a!r}, folder {b!r}")
    if bad:
        raise ConfigError(f"{what}: different structure ({'; '.join(bad)})")


def save_imported(
    model: DualTower,
    loss: LossConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    source: str | Path | None = None,
    source_format: str = "transformers",
) -> Path:
    """A run directory for an imported model: preset.yaml, checkpoint.pt ({model, config}) and config.yaml, so that
    ``scripts/pretrain.py --config DIR/config.yaml`` fine-tunes it and ``load_trained_model(DIR)`` reloads it."""
    import yaml

    from vlp.checkpointing import atomic_save
    from vlp.config import ModelConfig, PretrainConfig, to_dict

    out = prepare_output_dir(out_dir, overwrite).resolve()
    preset = model.preset
    preset_data = {
        "embed_dim": preset.embed_dim,
        "custom_text": preset.custom_text,
        "quick_gelu": preset.quick_gelu,
        "vision_cfg": preset.vision_cfg,
        "text_cfg": preset.text_cfg,
        "preprocess": preset.preprocess,
    }
    if preset.tokenizer:  # the checkpoint's own tokenizer travels with the run
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(preset.tokenizer["hf"]).save_pretrained(str(out / "tokenizer"))
        preset_data["tokenizer"] = {**preset.tokenizer, "hf": "tokenizer"}
    (out / "preset.yaml").write_text(yaml.safe_dump(preset_data, sort_keys=False))
    model_cfg = ModelConfig(name=str(out / "preset.yaml"), pretrained=str(out / "checkpoint.pt"))
    loss_data = {"name": loss.name}
    if loss.init_logit_scale is not None:
        loss_data["init_logit_scale"] = loss.init_logit_scale
    cfg = PretrainConfig(model=model_cfg, loss=loss)
    atomic_save({"model": model.state_dict(), "config": to_dict(cfg)}, out / "checkpoint.pt")
    if source is not None:  # what the model cards of later exports name as base_model
        (out / "source.json").write_text(json.dumps({"source": str(source), "format": source_format}) + "\n")
    (out / "config.yaml").write_text(
        yaml.safe_dump(
            {"model": {"name": model_cfg.name, "pretrained": model_cfg.pretrained}, "loss": loss_data}, sort_keys=False
        )
    )
    return out
