"""The LLaVA projector as a registered objective (``llava-projector``): a frozen vision tower, a frozen causal LLM
and the trained projector between them, run by the one training engine (vlp.train.trainer).

``scripts/train_adapter.py`` trains it with :class:`adapters.config.AdapterConfig` (LLaVA stage-1 defaults). Per
step the objective turns image-caption samples into caption-token batches (:class:`adapters.data.CaptionCollator`)
and returns the global-batch mean caption cross-entropy; it evaluates the held-out caption loss before the first
step, every ``train.eval_every`` steps and at the end, and exports the projector (``mm_projector.safetensors``)
and, with ``--format llava``, a folder transformers' LlavaForConditionalGeneration loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vlp.config import ConfigError
from vlp.objectives.registry import register_objective

log = logging.getLogger(__name__)


def compute_dtype(precision: str):
    """(accelerate mixed_precision, dtype of the frozen parts): bf16 on GPU and fp32 on CPU for ``auto``."""
    from vlp.precision import resolve_precision

    return resolve_precision(precision)


@dataclass
class AdapterParts:
    """Everything a run or a test needs, built from one config."""

    model: Any  # adapters.model.LlavaAdapter
    tower: Any  # adapters.vision.FrozenVisionTower
    llm: Any  # adapters.llm.LoadedLLM
    collator: Any  # adapters.data.CaptionCollator


def build_adapter(cfg: Any, frozen_dtype: Any = None) -> AdapterParts:
    """Tower + projector + LLM + collator as configured (the projector from ``projector.init`` when given)."""
    import torch

    from adapters.data import CaptionCollator
    from adapters.export import load_projector_state
    from adapters.llm import ensure_tiny_llm, load_llm
    from adapters.model import LlavaAdapter
    from adapters.projector import build_projector
    from adapters.vision import load_vision_tower
    from vlp.distributed import barrier, world_info

    frozen_dtype = frozen_dtype or torch.float32
    llm_path = cfg.llm.path
    if llm_path is None:  # the embedded tiny Llama, built once by the main process
        if world_info().is_main:
            llm_path = ensure_tiny_llm(cfg.llm.tiny_dir, seed=0)
        barrier()
        llm_path = llm_path or ensure_tiny_llm(cfg.llm.tiny_dir, seed=0)
    llm = load_llm(llm_path, cfg.llm.image_token, dtype=frozen_dtype, grad_checkpointing=cfg.llm.grad_checkpointing)
    tower = load_vision_tower(
        cfg.vision.tower, cfg.vision.preset, cfg.vision.feature_layer, cfg.vision.select, seed=cfg.train.seed
    )
    tower.to(frozen_dtype)
    text_hidden = int(llm.model.config.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        projector = build_projector(cfg.projector.type, tower.hidden_size, text_hidden)
    if cfg.projector.init:
        state, meta = load_projector_state(cfg.projector.init)
        if meta.get("projector_type", cfg.projector.type) != cfg.projector.type:
            raise ConfigError(
                f"projector.init {cfg.projector.init} holds a {meta['projector_type']} projector but "
                f"projector.type is {cfg.projector.type}"
            )
        try:
            projector.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(
                f"projector.init {cfg.projector.init} does not fit a {cfg.projector.type} projector "
                f"from width {tower.hidden_size} to {text_hidden}: {e}"
            ) from e
    model = LlavaAdapter(
        tower,
        projector,
        llm.model,
        llm.image_token_id,
        cfg.projector.type,
        llm_checkpointing=cfg.llm.grad_checkpointing,
    )
    collator = CaptionCollator(
        llm.tokenizer, cfg.llm.image_token, llm.image_token_id, tower.num_positions, cfg.llm.prompt, cfg.llm.max_length
    )
    return AdapterParts(model, tower, llm, collator)


def projector_meta(cfg: Any, parts: AdapterParts, step: int) -> dict[str, Any]:
    """What mm_projector.json records: enough to rebuild the adapter around the weights."""
    from adapters.vision import SELECT_TO_HF

    tower = parts.tower
    return {
        "projector_type": cfg.projector.type,
        "in_features": tower.hidden_size,
        "out_features": int(parts.llm.model.config.hidden_size),
        "vision_tower": tower.describe(),
        "vision_feature_layer": tower.feature_layer,
        "vision_feature_select": tower.select,
        "vision_feature_select_strategy": SELECT_TO_HF[tower.select],
        "num_image_tokens": tower.num_positions,
        "llm": parts.llm.path,
        "image_token": parts.llm.image_token,
        "image_token_id": parts.llm.image_token_id,
        "prompt": cfg.llm.prompt,
        "max_length": cfg.llm.max_length,
        "step": step,
    }


def check(cfg: Any) -> None:
    """Refuse, before a run starts, what this objective cannot do with ``cfg``."""
    from adapters.projector import check_llava_projector

    if not hasattr(cfg, "projector"):
        raise ConfigError(
            "objective llava-projector trains from scripts/train_adapter.py (its config holds the "
            "vision tower, LLM and projector sections)"
        )
    if cfg.export.format == "llava":  # a projector HF cannot hold is refused before anything is built
        check_llava_projector(cfg.projector.type)


@register_objective(
    "llava-projector",
    "adapter",
    check=check,
    description="LLaVA stage 1: a projector from a frozen vision tower into a frozen LLM, trained on "
    "the caption loss (scripts/train_adapter.py).",
)
def build(cfg: Any, world: Any, parts: AdapterParts | None = None):
    """The adapter objective of an :class:`adapters.config.AdapterConfig` (``parts``: already built ones)."""
    from adapters.caption_objective import AdapterObjective

    check(cfg)
    if parts is None:
        parts = build_adapter(cfg, compute_dtype(cfg.train.precision)[1])
    return AdapterObjective(cfg, parts)


__all__ = ["AdapterParts", "build", "build_adapter", "compute_dtype", "projector_meta"]
