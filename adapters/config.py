"""Typed configuration of the LLaVA-style adapter stage (`scripts/train_adapter.py`).

Defaults are LLaVA's stage-1 "feature alignment" recipe (lr 1e-3, no weight decay, 3% warmup then cosine, an
``mlp2x_gelu`` projector on the penultimate layer's patch features). With no tower and no LLM given, the run uses
the embedded default: a randomly initialised ``tiny`` tower of this project, a tiny randomly initialised Llama
with a tokenizer trained on the synthetic captions, and the synthetic shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlp.config import CheckpointConfig, ConfigError, DataConfig, OptimConfig, TrainConfig


@dataclass
class VisionTowerConfig:
    """Which frozen vision tower supplies the image features, and which of its hidden states."""

    tower: str | None = None
    """A pretrain run directory or checkpoint of this project, or a local Hugging Face folder holding a
    CLIPVisionModel / SiglipVisionModel (or a full CLIPModel / SiglipModel). None: a randomly initialised tower
    of ``preset`` (the embedded default)."""
    preset: str = "tiny"
    """Tower preset for the random tower used when ``tower`` is None."""
    feature_layer: int = -2
    """Index into the hidden states in Hugging Face's convention: 0 is the embeddings (after CLIP's pre-norm),
    i is the output of block i, -1 the last block, -2 (default) the penultimate one."""
    select: Literal["patch", "cls_patch", "full"] = "patch"
    """patch: drop the class token; cls_patch: keep it; full: every position (towers without a class token)."""


@dataclass
class LLMConfig:
    """The frozen causal language model and how captions are laid out for it."""

    path: str | None = None
    """Local folder with a Hugging Face causal LM and its tokenizer (AutoModelForCausalLM / AutoTokenizer).
    None: a tiny randomly initialised Llama built locally (the embedded default)."""
    image_token: str = "<image>"
    """Placeholder for the image; added to the tokenizer (and the embedding table) when missing."""
    prompt: str = "<image>\n"
    """Text before the caption; must contain ``image_token`` exactly once. Only the caption and the end token
    that follows it are learnt."""
    max_length: int = 512
    """Sequences (image positions included) are truncated to this many tokens, cutting the caption's end."""
    grad_checkpointing: bool = False
    """Recompute the LLM's activations in the backward pass (less memory, more compute)."""
    tiny_dir: str | None = None
    """Where the embedded tiny Llama is built (default: ~/.cache/vlp/tiny_llama)."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"llm.max_length must be >= 2, got {self.max_length}")
        if not self.image_token:
            raise ConfigError("llm.image_token must not be empty")
        if self.prompt.count(self.image_token) != 1:
            raise ConfigError(
                f"llm.prompt must contain llm.image_token {self.image_token!r} exactly once, got {self.prompt!r}"
            )


@dataclass
class ProjectorConfig:
    """The trained part: vision width -> LLM width."""

    type: str = "mlp2x_gelu"
    """linear, or mlpNx_gelu (Linear, then N-1 x [GELU, Linear])."""
    init: str | None = None
    """An mm_projector.safetensors (or a run directory holding one) to start from."""


@dataclass
class AdapterDataConfig(DataConfig):
    """Image-caption shards (the common data section, with the adapter's defaults and its held-out loss size)."""

    synthetic_train_samples: int = 40000
    eval_samples: int = 128
    """How many held-out pairs (the first ones, in order) the evaluation loss averages over; 0 disables it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_samples < 0:
            raise ConfigError(f"data.eval_samples must be >= 0, got {self.eval_samples}")


@dataclass
class AdapterOptimConfig(OptimConfig):
    """AdamW on the projector, linear warmup then cosine (LLaVA stage 1: lr 1e-3, no weight decay, 3% warmup)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float | None = 0.03
    """Fraction of the steps spent warming up (rounded up to whole steps); None: optim.warmup_steps."""


@dataclass
class AdapterTrainConfig(TrainConfig):
    """Run length, batch and bookkeeping (the common train section with the adapter's defaults)."""

    steps: int = 300
    """Optimiser steps; 0 trains nothing (with projector.init and export.format llava: export only)."""
    batch_size: int = 32
    """Per-process batch size."""
    eval_every: int = 100
    """Held-out caption loss every this many steps (and always before the first and after the last)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"train.steps must be >= 0, got {self.steps}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if self.steps:
            super().__post_init__()


@dataclass
class AdapterExportConfig:
    """What is written besides the projector checkpoint."""

    format: Literal["projector", "llava"] = "projector"
    """projector: mm_projector.safetensors + mm_projector.json only. llava: also a folder that
    transformers.LlavaForConditionalGeneration.from_pretrained loads (tower, projector, LLM, processor)."""
    dir: str | None = None
    """Where the llava folder goes (default: <output_dir>/llava)."""


@dataclass
class AdapterConfig:
    """Train a projector from a frozen vision tower into a frozen causal LLM (LLaVA stage 1)."""

    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    data: AdapterDataConfig = field(default_factory=AdapterDataConfig)
    optim: AdapterOptimConfig = field(default_factory=AdapterOptimConfig)
    train: AdapterTrainConfig = field(default_factory=AdapterTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints of the projector and its optimiser (the frozen tower and LLM are rebuilt from this config)."""
    export: AdapterExportConfig = field(default_factory=AdapterExportConfig)
    objective: str = "llava-projector"
    """The registered objective this config trains (adapters/objective.py)."""
    output_dir: str | None = None
    """Run directory; default runs/<time>-llava-projector."""

    def __post_init__(self) -> None:
        from adapters.projector import check_llava_projector, projector_depth

        projector_depth(self.projector.type)  # an unknown type is an error when the config is read
        if self.export.format == "llava":
            check_llava_projector(self.projector.type)


ADAPTER_ALIASES: dict[str, str] = {
    "tower": "vision.tower",
    "feature-layer": "vision.feature_layer",
    "select": "vision.select",
    "llm": "llm.path",
    "max-length": "llm.max_length",
    "projector": "projector.type",
    "format": "export.format",
    "steps": "train.steps",
    "batch-size": "train.batch_size",
    "seed": "train.seed",
    "precision": "train.precision",
    "lr": "optim.lr",
    "output-dir": "output_dir",
    "train-shards": "data.train_shards",
    "eval-shards": "data.eval_shards",
    "workers": "data.workers",
    "deepspeed": "train.deepspeed",
    "resume": "checkpoint.resume",
    "checkpoint-every": "checkpoint.every",
    "keep-checkpoints": "checkpoint.keep",
    "eval-every": "train.eval_every",
}
