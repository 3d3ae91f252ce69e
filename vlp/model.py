"""Build the dual-tower image/text model from a model preset.

Towers come from open_clip (its ViT and text transformer, or a timm trunk such as SigLIP's MAP-pooled ViT); this
module only reads presets, builds them, and exposes what the rest of the stack needs: normalised image/text
embeddings, the image tower's pooled backbone features (before the contrastive projection), and the learnable
temperature ``logit_scale`` and bias ``logit_bias``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn

from vlp import towers as _towers  # noqa: F401 - registers the project's timm towers
from vlp.config import ConfigError, LossConfig
from vlp.presets import ModelPreset, available_presets, configs_dir, load_preset  # noqa: F401 - re-exported


class DualTower(nn.Module):
    """Image and text towers with a learnable temperature (and bias for sigmoid losses).

    ``forward(images, tokens)`` returns L2-normalised image and text embeddings plus ``logit_scale`` (t, the log
    temperature) and ``logit_bias`` (b, or None), so that data-parallel wrappers see every parameter used.
    """

    def __init__(self, clip: nn.Module, preset: ModelPreset) -> None:
        super().__init__()
        self.clip = clip
        self.preset = preset

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return self.clip.logit_bias

    def image_backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features before the contrastive projection (used by SSL heads and adapters)."""
        visual = self.visual
        if isinstance(visual, VisionTransformer):
            x = visual.transformer(visual._embeds(images))
            pooled, _ = visual._pool(x)
            return pooled
        if isinstance(visual, open_clip.timm_model.TimmModel):
            return visual.trunk(images)
        raise TypeError(f"unsupported vision tower {type(visual).__name__}")

    def project_image(self, backbone_features: torch.Tensor) -> torch.Tensor:
        """Apply the image tower's contrastive projection to pooled backbone features."""
        visual = self.visual
        if isinstance(visual, VisionTransformer):
            return backbone_features @ visual.proj if visual.proj is not None else backbone_features
        return visual.head(backbone_features)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.clip.encode_image(images)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.clip.encode_text(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return (self.encode_image(images), self.encode_text(tokens), self.clip.logit_scale, self.clip.logit_bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def set_patch_dropout(self, prob: float) -> None:
        """Drop the fraction ``prob`` of image patch tokens, at random per image, in training mode (FLIP); in eval
        mode every patch is kept, so evaluation and exported weights are unaffected (the module has no weights).

        This is open_clip's own PatchDropout slot of its VisionTransformer (the class token is always kept). timm
        image towers have no such slot here and are refused with a ConfigError.
        """
        visual = self.visual
        if not isinstance(visual, VisionTransformer):
            if prob == 0:
                return
            raise ConfigError(
                f"model.patch_dropout={prob} needs an open_clip ViT image tower, but preset "
                f"{self.preset.name!r} has a timm tower ({type(visual).__name__}); use 0 or a ViT preset"
            )
        visual.patch_dropout = PatchDropout(prob) if prob > 0 else nn.Identity()

    def tower_trunks(self) -> tuple[nn.Module, nn.Module]:
        """The modules holding nearly all of each tower's compute: the image trunk (open_clip ViT blocks or the
        timm model) and the text transformer's blocks. Both the contrastive path (encode_image) and the SSL path
        (image_backbone_features) run through them."""
        visual = self.visual
        image = visual.transformer if isinstance(visual, VisionTransformer) else visual.trunk
        text = self.clip.text.transformer if hasattr(self.clip, "text") else self.clip.transformer
        return image, text

    def compile_towers(self, **compile_kwargs) -> None:
        """torch.compile both tower trunks in place (``nn.Module.compile``): parameter names and state dicts stay
        as they are, so checkpoints, exports and DeepSpeed see the same model.

        Static shapes by default: open_clip's image and text towers share one ``Transformer.forward``, so their
        different sequence lengths (and patch dropout's shorter one) would otherwise make dynamo fall back to a
        dynamic-shape graph, measured 2-4x slower than eager on a CPU; each shape gets its own graph instead.
        """
        compile_kwargs.setdefault("dynamic", False)
        for trunk in self.tower_trunks():
            trunk.compile(**compile_kwargs)


def build_open_clip_model(preset: ModelPreset, init_logit_scale: float, init_logit_bias: float | None) -> nn.Module:
    """Instantiate open_clip's CLIP or CustomTextCLIP for a preset (random init).

    ``vision_cfg.timm_model_kwargs`` (not an open_clip option) are extra ``timm.create_model`` arguments for a timm
    image tower, e.g. ``{act_layer: gelu_tanh, embed_dim: 1152, ...}`` for an imported SigLIP whose activation or
    shape no registered timm model has: the tower is open_clip's TimmModel around a trunk built with them.
    """
    cls = open_clip.CustomTextCLIP if preset.custom_text else open_clip.CLIP
    vision_cfg = copy.deepcopy(preset.vision_cfg)
    timm_kwargs = vision_cfg.pop("timm_model_kwargs", None)
    clip = cls(
        embed_dim=preset.embed_dim,
        vision_cfg=_PLACEHOLDER_VISION if timm_kwargs else vision_cfg,  # cheap: replaced right below
        text_cfg=copy.deepcopy(preset.text_cfg),
        quick_gelu=preset.quick_gelu,
        init_logit_scale=init_logit_scale,
        init_logit_bias=init_logit_bias,
    )
    if timm_kwargs:
        clip.visual = build_timm_tower(preset.embed_dim, vision_cfg, timm_kwargs)
    return clip


_PLACEHOLDER_VISION = {"image_size": 8, "patch_size": 8, "width": 8, "head_width": 8, "layers": 1}


def build_timm_tower(embed_dim: int, vision_cfg: dict, timm_kwargs: dict) -> nn.Module:
    """open_clip's TimmModel for ``vision_cfg`` (as open_clip builds it) whose trunk is built by timm with the extra
    ``timm_kwargs``; the default trunk is only ever built on the meta device."""
    import timm
    from open_clip.timm_model import TimmModel

    name, pool = vision_cfg["timm_model_name"], vision_cfg.get("timm_pool", "avg")
    proj = vision_cfg.get("timm_proj", "linear")
    drop_path, patch_drop = vision_cfg.get("timm_drop_path"), vision_cfg.get("patch_dropout", 0.0)
    with torch.device("meta"):
        visual = TimmModel(
            name,
            embed_dim,
            image_size=vision_cfg.get("image_size", 224),
            pool=pool,
            proj=proj,
            proj_bias=vision_cfg.get("timm_proj_bias", False),
            drop=vision_cfg.get("timm_drop", 0.0),
            drop_path=drop_path,
            patch_drop=patch_drop if patch_drop > 0 else None,
            pretrained=False,
        )
    kwargs = dict(timm_kwargs)
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if patch_drop > 0:
        kwargs["patch_drop_rate"] = patch_drop
    if pool in ("abs_attn", "rot_attn"):
        raise ValueError(
            f"vision_cfg.timm_model_kwargs with timm_pool={pool!r} is not supported; valid: avg, token, map, ''"
        )
    if proj in ("linear", "mlp"):
        trunk = timm.create_model(name, pretrained=False, **kwargs)
        trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    else:
        trunk = timm.create_model(
            name, pretrained=False, num_classes=0 if proj == "none" else embed_dim, global_pool=pool, **kwargs
        )
    visual.trunk = trunk
    visual.timm_model_kwargs = dict(timm_kwargs)  # what open_clip's TimmModel cannot pass (read by vlp.export)
    if proj in ("linear", "mlp") and trunk.num_features != _head_in_features(visual.head):
        # the kwargs changed the trunk's width (a narrower ResNet, say): open_clip sized the head for the default one
        visual.head = _open_clip_head(trunk.num_features, embed_dim, proj, vision_cfg)
    if any(True for _ in visual.head.parameters()):  # the projection after the trunk: materialise and initialise
        device = next(trunk.parameters()).device
        visual.head.to_empty(device=device)
        for m in visual.head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return visual


def _head_in_features(head: nn.Sequential) -> int:
    first = head.proj if hasattr(head, "proj") else head.mlp.fc1
    return first.in_features


def _open_clip_head(in_features: int, embed_dim: int, proj: str, vision_cfg: dict) -> nn.Sequential:
    """open_clip TimmModel's projection head (same module names, so state dicts match open_clip's) for a trunk with
    ``in_features`` pooled features."""
    from timm.layers import Mlp

    bias, drop = vision_cfg.get("timm_proj_bias", False), vision_cfg.get("timm_drop", 0.0)
    if proj == "linear":
        return nn.Sequential(OrderedDict(drop=nn.Dropout(drop), proj=nn.Linear(in_features, embed_dim, bias=bias)))
    return nn.Sequential(OrderedDict(mlp=Mlp(in_features, 2 * embed_dim, embed_dim, drop=(drop, 0), bias=(True, bias))))


def build_model(preset: ModelPreset | str, loss: LossConfig | None = None) -> DualTower:
    """The dual tower for ``preset`` with temperature/bias initialised for ``loss`` (default: siglip)."""
    if isinstance(preset, str):
        preset = load_preset(preset)
    loss = loss or LossConfig()
    clip = build_open_clip_model(preset, loss.resolved_init_logit_scale, loss.resolved_init_logit_bias)
    return DualTower(clip, preset)


class HFTextTokenizer:
    """A transformers tokenizer called as the checkpoint's own processor calls it: padded to the context length
    (``padding="max_length"``, truncated), returning the ``[N, context_length]`` ids open_clip tokenizers return.

    Used for imported text towers whose vocabulary is not open_clip's BPE (SigLIP's SentencePiece, SigLIP 2's Gemma).
    """

    def __init__(self, folder: str, context_length: int) -> None:
        from transformers import AutoTokenizer

        self.folder = folder
        self.context_length = context_length
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            texts,
            padding="max_length",
            max_length=context_length or self.context_length,
            truncation=True,
            return_tensors="pt",
        )["input_ids"]


def build_tokenizer(preset: ModelPreset):
    """open_clip's BPE tokenizer (its vocabulary ships with the package), at the preset's context length; or the
    preset's own transformers tokenizer (``tokenizer: {hf: FOLDER}``), through open_clip's HFTokenizer for an
    imported open_clip model (``tokenizer: {hf: FOLDER, open_clip: {...}}``)."""
    if preset.tokenizer and "open_clip" in preset.tokenizer:
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(
            preset.tokenizer["hf"], context_length=preset.context_length, **preset.tokenizer["open_clip"]
        )
    if preset.tokenizer:
        return HFTextTokenizer(preset.tokenizer["hf"], preset.context_length)
    return SimpleTokenizer(context_length=preset.context_length)


def build_transforms(preset: ModelPreset, is_train: bool):
    """open_clip image transform matching the preset (size, resize mode, interpolation, mean/std)."""
    pp = preset.preprocess
    return open_clip.image_transform(
        preset.image_size,
        is_train=is_train,
        mean=pp.get("mean"),
        std=pp.get("std"),
        resize_mode=pp.get("resize_mode"),
        interpolation=pp.get("interpolation"),
    )
