"""Frozen vision towers as sources of per-position image features for the projector.

Three kinds of tower give the same interface: an open_clip ``VisionTransformer`` (the CLIP-style presets of this
project), a timm trunk (the SigLIP presets) and a Hugging Face ``CLIPVisionModel`` / ``SiglipVisionModel``.
Hidden states are indexed as in transformers' ``hidden_states``: index 0 is the embeddings output (after CLIP's
pre-norm), index i the output of block i, so ``feature_layer=-2`` is the penultimate block in every backend and
in the exported ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.config import ConfigError

log = logging.getLogger(__name__)

SELECT_TO_HF = {"patch": "default", "cls_patch": "full", "full": "full"}
"""Our feature selection -> LlavaConfig.vision_feature_select_strategy."""


class FrozenVisionTower(nn.Module):
    """A frozen tower (eval mode, no gradients) returning the selected hidden states of one layer.

    Subclasses provide ``_embed`` (hidden state 0) and ``_blocks`` (the transformer blocks), plus the facts the
    adapter and the export need: width, number of patches, whether there is a class token, and the image
    transform matching the tower.
    """

    hidden_size: int
    num_patches: int
    num_prefix_tokens: int

    def __init__(self, feature_layer: int = -2, select: str = "patch") -> None:
        super().__init__()
        self.feature_layer = feature_layer
        self.select = select

    # -- subclass API -------------------------------------------------------------------------------------------
    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x)

    @property
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> [3, H, W] pixel tensor, as the tower expects."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Where the tower came from (recorded in the projector's config)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------------
    def freeze(self) -> FrozenVisionTower:
        self.requires_grad_(False)
        self.eval()
        self.check_selection()
        return self

    def train(self, mode: bool = True) -> FrozenVisionTower:  # the tower always stays in eval mode
        return super().train(False)

    @property
    def num_layers(self) -> int:
        return len(self._blocks())

    @property
    def has_cls_token(self) -> bool:
        return self.num_prefix_tokens == 1

    def resolved_layer(self) -> int:
        """``feature_layer`` as a non-negative index into the num_layers + 1 hidden states."""
        n = self.num_layers + 1
        if not -n <= self.feature_layer < n:
            raise ConfigError(
                f"vision.feature_layer={self.feature_layer} is out of range for a tower with "
                f"{self.num_layers} blocks; valid: {-n}..{n - 1} (0 = embeddings, -1 = last block)"
            )
        return self.feature_layer % n

    def check_selection(self) -> None:
        if self.select not in SELECT_TO_HF:
            raise ConfigError(f"vision.select={self.select!r} is not valid; valid: {', '.join(SELECT_TO_HF)}")
        if self.num_prefix_tokens > 1:
            raise ConfigError(
                f"towers with {self.num_prefix_tokens} prefix tokens (class + register tokens) are "
                "not supported; use a tower with at most a class token"
            )
        if self.select in ("patch", "cls_patch") and not self.has_cls_token:
            raise ConfigError(
                f"vision.select={self.select} needs a class token but this tower has none; use vision.select=full"
            )
        self.resolved_layer()

    @property
    def num_positions(self) -> int:
        """Image feature positions per image after selection (the image token is expanded to this many)."""
        return self.num_patches + (self.num_prefix_tokens if self.select != "patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Hidden states 0..``upto`` (default: all), each [B, T, D] with T counting the prefix tokens."""
        blocks = self._blocks()
        upto = len(blocks) if upto is None else upto
        x = self._embed(pixel_values.to(self.dtype))
        states = [x]
        for block in blocks[:upto]:
            x = self._run_block(block, x)
            states.append(x)
        return states

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selected features of ``feature_layer``: [B, num_positions, hidden_size], without gradient."""
        layer = self.resolved_layer()
        x = self.hidden_states(pixel_values, upto=layer)[layer]
        if self.select == "patch":
            x = x[:, self.num_prefix_tokens :]
        return x


class OpenClipTower(FrozenVisionTower):
    """open_clip's VisionTransformer (CLIP-style presets): hidden state 0 is ln_pre(patch + class + position)."""

    def __init__(
        self, visual: nn.Module, preset, source: dict[str, Any], feature_layer: int = -2, select: str = "patch"
    ) -> None:
        super().__init__(feature_layer, select)
        self.visual = visual
        self.preset = preset
        self.source = source
        self.hidden_size = int(visual.conv1.out_channels)
        grid = visual.grid_size
        self.num_patches = int(grid[0] * grid[1])
        self.num_prefix_tokens = 1
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            log.debug("tower has attention pooling; features come from the blocks before it")

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(pixel_values)

    def _blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks)

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.visual.transformer.batch_first:
            return block(x.transpose(0, 1)).transpose(0, 1)
        return block(x)

    @property
    def image_transform(self):
        from vlp.model import build_transforms

        return build_transforms(self.preset, is_train=False)

    def describe(self) -> dict[str, Any]:
        return dict(self.source)


class TimmTower(FrozenVisionTower):
    """A timm ViT trunk (the SigLIP presets): hidden state 0 is norm_pre(patch + position [+ class])."""

    def __init__(
        self, visual: nn.Module, preset, source: dict[str, Any], feature_layer: int = -2, select: str = "patch"
    ) -> None:
        super().__init__(feature_layer, select)
        self.visual = visual
        self.preset = preset
        self.source = source
        self.hidden_size = int(self.trunk.embed_dim)
        self.num_patches = int(self.trunk.patch_embed.num_patches)
        self.num_prefix_tokens = int(self.trunk.num_prefix_tokens)

    @property
    def trunk(self) -> nn.Module:
        return self.visual.trunk

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(pixel_values))))

    def _blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    @property
    def image_transform(self):
        from vlp.model import build_transforms

        return build_transforms(self.preset, is_train=False)

    def describe(self) -> dict[str, Any]:
        return dict(self.source)


class HFTower(FrozenVisionTower):
    """A transformers CLIPVisionModel / SiglipVisionModel; hidden states exactly as its ``hidden_states``."""

    def __init__(
        self, model: nn.Module, image_processor, source: dict[str, Any], feature_layer: int = -2, select: str = "patch"
    ) -> None:
        super().__init__(feature_layer, select)
        self.model = model
        self.image_processor = image_processor
        self.source = source
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.num_prefix_tokens = 1 if cfg.model_type == "clip_vision_model" else 0
        self._n_layers = int(cfg.num_hidden_layers)

    @property
    def num_layers(self) -> int:
        return self._n_layers

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True)
        return list(out.hidden_states)

    @property
    def image_transform(self):
        proc = self.image_processor

        def transform(image) -> torch.Tensor:
            return proc(images=image, return_tensors="pt")["pixel_values"][0]

        return transform

    def describe(self) -> dict[str, Any]:
        return dict(self.source)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

HF_VISION_TYPES = ("clip_vision_model", "siglip_vision_model", "clip", "siglip")


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def tower_from_dual_tower(model, preset, source: dict[str, Any], feature_layer: int, select: str) -> FrozenVisionTower:
    """Wrap the image tower of a :class:`vlp.model.DualTower`."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if isinstance(visual, VisionTransformer):
        return OpenClipTower(visual, preset, source, feature_layer, select)
    if isinstance(visual, open_clip.timm_model.TimmModel):
        return TimmTower(visual, preset, source, feature_layer, select)
    raise ConfigError(f"unsupported vision tower {type(visual).__name__} in {source}")


def load_hf_vision_model(path: str | Path):
    """(vision model, image processor) from a local Hugging Face folder (vision-only or full CLIP/SigLIP)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in HF_VISION_TYPES:
        raise ConfigError(
            f"{path}: model_type {cfg.model_type!r} is not a supported vision tower; valid: "
            f"{', '.join(HF_VISION_TYPES)}"
        )
    if "CLIPVisionModelWithProjection" in (getattr(cfg, "architectures", None) or []):
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(path).vision_model  # the projection is not used
    else:
        model = AutoModel.from_pretrained(path)
    if cfg.model_type in ("clip", "siglip"):
        model = model.vision_model
    if (path / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(path)
    else:
        processor = default_image_processor(model.config)
        log.warning("%s has no preprocessor_config.json; using %s defaults", path, type(processor).__name__)
    return model, processor


def default_image_processor(vision_config, mean=None, std=None, resize_mode: str | None = None):
    """A CLIP (shortest-side resize + centre crop) or SigLIP (squash) image processor for a vision config."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor
    from transformers.image_utils import PILImageResampling

    size = int(vision_config.image_size)
    siglip = vision_config.model_type.startswith("siglip")
    mean = list(mean) if mean is not None else ([0.5] * 3 if siglip else [0.48145466, 0.4578275, 0.40821073])
    std = list(std) if std is not None else ([0.5] * 3 if siglip else [0.26862954, 0.26130258, 0.27577711])
    squash = resize_mode == "squash" if resize_mode else siglip
    if squash:
        return SiglipImageProcessor(
            size={"height": size, "width": size},
            resample=PILImageResampling.BICUBIC,
            image_mean=mean,
            image_std=std,
            do_convert_rgb=True,
        )
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def load_vision_tower(
    tower: str | None, preset: str = "tiny", feature_layer: int = -2, select: str = "patch", seed: int = 0
) -> FrozenVisionTower:
    """The frozen tower named by ``tower`` (see :class:`adapters.config.VisionTowerConfig`)."""
    from vlp.model import build_model, load_preset

    if tower is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            p = load_preset(preset)
            model = build_model(p)
        source = {"kind": "random", "preset": p.name, "seed": seed}
        return tower_from_dual_tower(model, p, source, feature_layer, select).freeze()
    path = Path(tower)
    if _is_hf_folder(path):
        model, processor = load_hf_vision_model(path)
        return HFTower(model, processor, {"kind": "hf", "path": str(path)}, feature_layer, select).freeze()
    if path.exists():
        from vlp.checkpointing import load_trained_model

        model, cfg = load_trained_model(path)
        source = {"kind": "vlp", "path": str(path), "preset": model.preset.name}  # the run's saved preset
        return tower_from_dual_tower(model, model.preset, source, feature_layer, select).freeze()
    raise ConfigError(
        f"vision.tower {tower!r} does not exist; pass a pretrain run directory or checkpoint of "
        "this project, or a local Hugging Face folder with a CLIP/SigLIP vision model "
        "(or leave it unset for a random tiny tower)"
    )
