"""Typed configuration for every entry point: dataclasses, YAML loading, command-line overrides.

A config is a tree of dataclasses. Values come, in increasing priority, from the dataclass defaults, YAML files
(``--config x.yaml``) and command-line flags (generated from these classes by :mod:`vlp.cli`). Every field is
reachable as ``--section.field`` (dashes and underscores are interchangeable), its docstring is its ``--help``,
and the common ones have short aliases (``--loss siglip`` sets ``loss.name``). Unknown keys and bad values raise
:class:`ConfigError` naming the key and listing what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in a config file or on the command line."""


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which tower preset to build and how."""

    name: str = "tiny-resnet-hr"
    """Preset name (a file in configs/models/) or a path to a preset YAML file. The default is the CPU demo's."""
    pretrained: str | None = None
    """Local path to weights to initialise from (a checkpoint of this project)."""
    grad_checkpointing: bool = False
    """Recompute both towers' transformer blocks in backward instead of storing their activations."""
    lock_image: bool = False
    """Freeze the image tower (LiT-style runs); see lock_image_unlocked_groups."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: keep the last N layer groups of the image tower trainable (open_clip's grouping: the
    final block + norm count as one group, the projection as another)."""
    lock_text: bool = False
    """Freeze the text tower; see lock_text_unlocked_layers."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: keep the last N layers of the text tower trainable (open_clip's grouping)."""
    patch_dropout: float = 0.0
    """FLIP-style patch dropout (Li et al., 2023): the fraction P of image patch tokens dropped at random before the
    ViT blocks in training (none at evaluation), which cuts the image tower's cost by about P. open_clip ViT image
    towers only (not timm towers). 0 turns it off."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(
                f"model.patch_dropout must be in [0, 1) (the fraction of patches dropped), got {self.patch_dropout}"
            )
        if self.lock_image_unlocked_groups < 0 or self.lock_text_unlocked_layers < 0:
            raise ConfigError(
                "model.lock_image_unlocked_groups and model.lock_text_unlocked_layers must be >= 0, got "
                f"{self.lock_image_unlocked_groups} and {self.lock_text_unlocked_layers}"
            )


#: image-text loss name -> defaults of LossConfig's None fields; filled when the clip/siglip objectives register
LOSS_DEFAULTS: dict[str, dict[str, float | str | None]] = {}

#: the loss section's learning-rate multipliers of single parameters (LossConfig.resolved_*_lr_scale)
LR_SCALE_FIELDS = ("bias_lr_scale", "temperature_lr_scale")


@dataclass
class LossConfig:
    """The image-text loss (the registered image-text objectives: clip, siglip) and how it is computed."""

    name: str = "siglip"
    """Image-text loss: clip (softmax) or siglip (sigmoid); any registered image-text objective."""
    impl: Literal["naive", "chunked"] = "chunked"
    """chunked (default) tiles the logits and never holds the B x B matrix, forward or backward, on any rank; naive
    materialises it (the reference, and for debugging). Both give the same loss and gradients."""
    chunk_size: int = 1024
    """Tile edge for the chunked implementation. 1024 was measured (docs/benchmarks.md, "Losses: memory and time";
    B=16384, D=512, CPU) to be the fastest tile for siglip and within run-to-run noise (8%) of the fastest for
    clip: smaller tiles add per-tile overhead (128: 1.5x the time), larger ones add memory (4096: up to 2.4x the
    extra peak) without a clear gain."""
    init_logit_scale: float | Literal["auto"] | None = None
    """Initial log temperature log t; default log(1/0.07) for clip, auto for siglip: t = ln(B - 1) for the global
    batch B (at least 1; the auto bias with its sign flipped), so that a pair whose embeddings coincide (cosine 1)
    starts at probability 1/2 and an unrelated pair (cosine 0) at 1/B; resolved when training starts like the bias
    (the SigLIP paper's t = 10 with b = -10 is this prior at B of about 22,000; docs/training.md has the
    measurements)."""
    init_logit_bias: float | Literal["auto"] | None = None
    """Initial bias b (siglip only); default auto: -ln(B - 1) for the global batch B (batch size x accumulation
    steps x processes), the bias at which a pair's initial probability sigmoid(b) is 1/B, the fraction of positive
    pairs among the B x B of a batch; resolved when training starts (config.yaml records the number). A number
    fixes it (the SigLIP paper's -10 suits batches of ~22,000; docs/training.md has the measurements)."""
    max_logit_scale: float | None = None
    """Upper clamp on t; default log(100) for clip, none for siglip."""
    centre_init: Literal["off", "image", "text", "both"] | None = None
    """Centre towers' outputs on the first training batch before the first step (vlp.centre_init: a tower's last
    linear map loses the batch's mean output direction, so a randomly initialised tower's embeddings no longer
    crowd into one cone): both (siglip's default), image, text, or off (clip's default: its softmax ignores the
    common shift that crowding causes). Never applied to weights loaded with --model.pretrained, to a locked tower,
    or on resume; docs/training.md has the measurements."""
    bias_lr_scale: float | None = None
    """Learning-rate multiplier of the bias b (siglip only; default 25 for siglip). AdamW moves a scalar by about
    the learning rate per step, so at lr 2e-3 b cannot travel the 2-3 units between its batch prior and where
    training takes it within a few hundred steps; the towers then build the missing bias out of embeddings
    (image and text means anti-aligned, positive pairs' cosines held down). With 25x, b follows (docs/training.md
    has the measurements); 1 trains b like every other parameter (and resumes checkpoints written before this
    option). With a pretrained b it only follows its optimum sooner."""

    temperature_lr_scale: float | None = None
    """Learning-rate multiplier of the log temperature log t (default 25 for siglip, 1 for clip). SigLIP starts t
    at the batch prior ln(B - 1) (4-6 at one machine's batches) and training takes it to 10-15 within a few hundred
    steps; at 1 x lr AdamW lets log t travel about the learning rate per step (t ended at 6.1 from 5.5 at batch
    256), so the logits stay flat (docs/training.md has the measurements). CLIP starts at 1/0.07 and moves little.
    With a pretrained t it only follows its optimum sooner; 1 trains t like every other parameter (and resumes
    checkpoints written before this option)."""

    def __post_init__(self) -> None:
        if isinstance(self.centre_init, bool):  # YAML's true / false
            self.centre_init = "both" if self.centre_init else "off"
        if self.centre_init is not None and self.centre_init not in CENTRE_TOWERS:
            raise ConfigError(
                f"loss.centre_init: invalid value {self.centre_init!r}; valid: {', '.join(CENTRE_TOWERS)}"
            )
        if self.chunk_size < 1:
            raise ConfigError(f"loss.chunk_size must be >= 1, got {self.chunk_size}")
        if self.name not in LOSS_DEFAULTS:
            import vlp.objectives  # noqa: F401 - registers the built-in losses' defaults (no torch)
        if self.name not in LOSS_DEFAULTS:
            raise ConfigError(f"loss.name: invalid value {self.name!r}; valid: {', '.join(sorted(LOSS_DEFAULTS))}")
        for key in LR_SCALE_FIELDS:
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"loss.{key} must be a finite number > 0, got {value}")
        if self.bias_lr_scale is not None and self._default("init_logit_bias") is None:
            raise ConfigError(f"loss.bias_lr_scale: {self.name} has no bias; leave it unset")
        if self.init_logit_scale == "auto" and self._default("init_logit_bias") is None:
            raise ConfigError(
                f"loss.init_logit_scale=auto is the sigmoid loss's batch prior (paired with its bias); {self.name} has "
                "no bias: give a number or leave the default"
            )

    def _default(self, key: str) -> float | str | None:
        if self.name not in LOSS_DEFAULTS:
            import vlp.objectives  # noqa: F401 - registers the built-in losses' defaults (no torch)
        if self.name not in LOSS_DEFAULTS:
            raise ConfigError(f"loss.name: invalid value {self.name!r}; valid: {', '.join(sorted(LOSS_DEFAULTS))}")
        return LOSS_DEFAULTS[self.name].get(key)

    @property
    def resolved_init_logit_scale(self) -> float:
        """The initial log temperature a model is built with. Training resolves ``auto`` first
        (:meth:`resolve_auto`); a model built outside training with the default (e.g. to load weights into) starts at
        :data:`UNRESOLVED_AUTO_SCALE`, and an explicit ``auto`` there is an error."""
        if self.init_logit_scale == "auto":
            raise ConfigError(
                "loss.init_logit_scale=auto is resolved from the global batch when training starts "
                "(LossConfig.resolve_auto); give a number to build a model outside training"
            )
        v = self.init_logit_scale if self.init_logit_scale is not None else self._default("init_logit_scale")
        assert v is not None
        return UNRESOLVED_AUTO_SCALE if v == "auto" else float(v)

    @property
    def scale_is_auto(self) -> bool:
        """Whether the initial temperature still has to be resolved from the global batch (``auto``, given or
        default)."""
        value = self.init_logit_scale if self.init_logit_scale is not None else self._default("init_logit_scale")
        return value == "auto"

    @property
    def bias_is_auto(self) -> bool:
        """Whether the initial bias still has to be resolved from the global batch (``auto``, given or default)."""
        value = self.init_logit_bias if self.init_logit_bias is not None else self._default("init_logit_bias")
        return value == "auto"

    @property
    def resolved_init_logit_bias(self) -> float | None:
        """The initial bias a model is built with. Training resolves ``auto`` first (:meth:`resolve_auto_bias`);
        a model built outside training with the default (e.g. to load weights into) starts at
        :data:`UNRESOLVED_AUTO_BIAS`, and an explicit ``auto`` there is an error."""
        default = self._default("init_logit_bias")
        if default is None:  # a loss without a bias
            return None
        if self.init_logit_bias == "auto":
            raise ConfigError(
                "loss.init_logit_bias=auto is resolved from the global batch when training starts "
                "(LossConfig.resolve_auto_bias); give a number to build a model outside training"
            )
        if self.init_logit_bias is not None:
            return float(self.init_logit_bias)
        return UNRESOLVED_AUTO_BIAS if default == "auto" else float(default)

    def resolve_auto(self, global_batch: int) -> None:
        """Replace ``auto`` (given, or the loss's default) by the batch priors of ``global_batch``: the bias by
        :func:`batch_prior_logit_bias`, the temperature by :func:`batch_prior_logit_scale`."""
        if self.bias_is_auto:
            self.init_logit_bias = batch_prior_logit_bias(global_batch)
        if self.scale_is_auto:
            self.init_logit_scale = batch_prior_logit_scale(global_batch)

    @property
    def resolved_centre_towers(self) -> tuple[str, ...]:
        """The towers a fresh run centres on its first batch (``centre_init``, or the loss's default)."""
        value = self.centre_init if self.centre_init is not None else self._default("centre_init")
        return CENTRE_TOWERS[value or "off"]

    def resolved_lr_scale(self, key: str) -> float:
        """A learning-rate multiplier (``key`` of :data:`LR_SCALE_FIELDS`): as given, or the loss's default, or 1."""
        value = getattr(self, key)
        value = self._default(key) if value is None else value
        return 1.0 if value is None else float(value)

    @property
    def resolved_bias_lr_scale(self) -> float:
        """The bias's learning-rate multiplier (``bias_lr_scale``, or the loss's default, or 1)."""
        return self.resolved_lr_scale("bias_lr_scale")

    @property
    def resolved_temperature_lr_scale(self) -> float:
        """The log temperature's learning-rate multiplier (``temperature_lr_scale``, or the loss's default, or 1)."""
        return self.resolved_lr_scale("temperature_lr_scale")

    def resolve_lr_scales(self) -> None:
        """Replace the unset learning-rate multipliers by the loss's defaults, so that config.yaml records the
        multipliers a run trained at (the bias's only for a loss with a bias)."""
        for key in LR_SCALE_FIELDS:
            if getattr(self, key) is None and (key != "bias_lr_scale" or self._default("init_logit_bias") is not None):
                setattr(self, key, self.resolved_lr_scale(key))

    @property
    def resolved_max_logit_scale(self) -> float | None:
        return self.max_logit_scale if self.max_logit_scale is not None else self._default("max_logit_scale")


CENTRE_TOWERS: dict[str, tuple[str, ...]] = {
    "off": (),
    "image": ("image",),
    "text": ("text",),
    "both": ("image", "text"),
}
"""``loss.centre_init`` values and the towers each centres."""

UNRESOLVED_AUTO_BIAS = -10.0
"""The bias of a SigLIP model built outside training with the default ``auto`` (the SigLIP paper's value): such a
model is built to load weights into, and a training run replaces ``auto`` by the batch prior before building."""


UNRESOLVED_AUTO_SCALE = math.log(10.0)
"""The log temperature of a SigLIP model built outside training with the default ``auto`` (the SigLIP paper's t = 10),
replaced by :func:`batch_prior_logit_scale` in a training run."""


def batch_prior_logit_scale(global_batch: int) -> float:
    """log t for t = max(1, ln(B - 1)): the SigLIP temperature at which, with the bias -ln(B - 1) of
    :func:`batch_prior_logit_bias`, a pair of identical embeddings (cosine 1) starts at probability 1/2 and an
    unrelated one (cosine 0) at 1/B (t = 10 assumes B of about 22,000). A smaller t keeps the logits of a randomly
    initialised pair of towers, whose embeddings crowd into narrow cones, from moving all together on the first
    steps (docs/training.md); t is kept at 1 or more below B = 4."""
    if global_batch < 2:
        raise ConfigError(f"loss.init_logit_scale=auto needs a global batch of at least 2, got {global_batch}")
    return math.log(max(1.0, math.log(global_batch - 1)))


def batch_prior_logit_bias(global_batch: int) -> float:
    """-ln(B - 1): the SigLIP bias at which a pair's initial probability sigmoid(b) (cosine 0) equals 1/B, the
    fraction of positive pairs among the B x B pairs of a global batch of B (b = -10 assumes B of about 22,000)."""
    if global_batch < 2:
        raise ConfigError(f"loss.init_logit_bias=auto needs a global batch of at least 2, got {global_batch}")
    return -math.log(global_batch - 1)


@dataclass
class DataConfig:
    """Where training and evaluation samples come from."""

    train_shards: str | None = None
    """WebDataset shard spec (brace patterns allowed, '::' separates sources). None: the embedded synthetic set."""
    eval_shards: str | None = None
    """Held-out shards for zero-shot evaluation; None with synthetic data: its held-out split."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """epoch: every sample once per epoch, split exactly over ranks x workers; resampled: shards drawn with
    replacement, infinite (see docs/data.md)."""
    source_weights: list[float] | None = None
    """One weight per '::'-separated source: per-sample upsampling factors (epoch mode: whole numbers)."""
    train_num_samples: int | None = None
    """Samples per epoch; None: read from the shards' metadata (in epoch mode it must agree with it)."""
    train_metadata: str | None = None
    """Explicit shard metadata file(s) ('::'-separated): sizes.json or *.meta.json; default: found beside the shards."""
    epochs: float | None = None
    """Train for this many passes over the data instead of train.steps (ceil(epochs x samples / global batch))."""
    synthetic: Literal["shapes", "textures", "silhouettes"] = "shapes"
    """Which embedded synthetic set to train and evaluate on when no shards are given: shapes (the demo: flat-coloured
    shapes, template captions), textures (textured objects, tag-list captions) or silhouettes (the shapes as grey
    silhouettes on plain grey: the self-supervised demos' set); see docs/data.md."""
    synthetic_dir: str | None = None
    """Cache directory for the embedded synthetic shards (default: ~/.cache/vlp/synthetic)."""
    synthetic_train_samples: int = 20000
    """Training samples the embedded synthetic set is drawn with (the first run writes them as shards)."""
    synthetic_eval_samples: int = 1000
    """Held-out samples of the embedded synthetic set."""
    caption_key: str = "txt"
    """Where the caption lives: 'txt', or 'json:FIELD' for a field of the json member."""
    workers: int = 2
    """DataLoader processes per training process decoding and augmenting samples (0: in the training process)."""
    shuffle_buffer: int = 1000
    """Samples per shuffle window (each reader permutes consecutive windows of this many samples)."""
    max_consecutive_failures: int = 1000
    """Stop with an error after this many bad samples/shards in a row (instead of spinning on unusable data)."""
    loader_timeout_s: float = 600.0
    """Fail instead of hanging when a DataLoader worker delivers nothing for this long (0: wait forever)."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.max_consecutive_failures < 1:
            raise ConfigError(f"data.max_consecutive_failures must be >= 1, got {self.max_consecutive_failures}")
        if self.train_num_samples is not None and self.train_num_samples < 1:
            raise ConfigError(f"data.train_num_samples must be >= 1, got {self.train_num_samples}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"data.epochs must be > 0, got {self.epochs}")
        if self.loader_timeout_s < 0:
            raise ConfigError(f"data.loader_timeout_s must be >= 0, got {self.loader_timeout_s}")
        if self.source_weights is not None and any(not w > 0 for w in self.source_weights):
            raise ConfigError(f"data.source_weights must all be > 0, got {self.source_weights}")


#: the learning rate of objectives that name none of their own (ObjectiveSpec.default_lr)
DEFAULT_LR = 2e-3


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float | None = None
    """Peak learning rate; default: the objective's (3e-3 for siglip, 2e-3 for clip and the SSL objectives),
    resolved when training starts (config.yaml records the number). The defaults suit the CPU demo (tiny-resnet-hr,
    batches 64-256, 64,000 pairs): SigLIP's logits move at t x the embeddings' speed and its t starts 2.6-3.5 x
    below CLIP's, so it takes a higher rate (docs/training.md has the measurements); set it for your model and batch
    (open_clip_train's default is 5e-4)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the weight matrices; 1-D parameters (biases, norms), the temperature, the bias and
    positional embeddings get none."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    """Linear warmup (from lr / warmup_steps up to lr) over this many steps, then cosine decay to min_lr_ratio x lr
    (see warmup_ratio)."""
    warmup_ratio: float | None = None
    """Warm up for this fraction of the run's steps (rounded up) instead of warmup_steps (LLaVA's recipes: 0.03)."""
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    fused: bool | None = None
    """AdamW's fused kernel (one pass over every parameter; about 3.5x faster than the multi-tensor path on a CPU,
    where the optimiser step of the tiny presets is otherwise ~18% of a step). None: on wherever every trainable
    parameter is a floating-point tensor on a CPU or CUDA device."""

    def __post_init__(self) -> None:
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    @property
    def resolved_lr(self) -> float:
        """The peak learning rate (``lr``, or :data:`DEFAULT_LR` where no objective has resolved it)."""
        return DEFAULT_LR if self.lr is None else self.lr

    def resolved_warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``."""
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * total_steps)
        return self.warmup_steps


#: accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS), listed here so that a name is checked before
#: torch is imported; vlp.train.metrics checks again against the installed accelerate
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class TrainConfig:
    """Run length, batch and bookkeeping."""

    steps: int = 1000
    """Optimiser steps to train (see data.epochs for a length in passes over the data)."""
    batch_size: int = 64
    """Per-process batch size."""
    seed: int = 0
    """Seeds model initialisation, data order and augmentations: the same seed gives the same loss curve on the same
    machine."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    log_every: int = 10
    """Show loss and samples/s on the progress bar (and data fault counts in the metrics) every N steps (0: at the
    first and last step only); the metrics get a record every step."""
    save_first_batch: bool = False
    """Save each rank's first batch next to the outputs (to check multi-process runs against one process)."""
    accum_steps: int = 1
    """Micro-batches of batch_size per optimiser step on each process (global batch = batch_size x accum_steps x
    processes)."""
    accumulation: Literal["gradcache", "plain"] = "gradcache"
    """How micro-batches are accumulated: gradcache is exact for contrastive losses (every sample of the
    accumulated batch is a negative for every other); plain sums k independent micro-batch losses."""
    deepspeed: str | None = None
    """DeepSpeed config: a JSON path or a name in configs/deepspeed/ (zero0, zero1, zero2, zero3, zero3_offload).
    Not needed under `accelerate launch --config_file configs/accelerate/zero2.yaml`, which sets it."""
    max_nonfinite_steps: int = 10
    """Stop the run (with a checkpoint of the last good state) after this many consecutive steps skipped for a
    non-finite loss or gradient."""
    global_stream: bool = False
    """Verification mode: every process reads the same seeded stream of global batches and trains on its
    rank's slice, so each step's global batch is identical for any number of processes and micro-batches."""
    report_to: str = "tensorboard"
    """Where metrics go besides metrics.jsonl, through accelerate's trackers: tensorboard (offline, in the run
    directory), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; comma-separated for several, or
    none."""
    compile: bool = False
    """torch.compile the towers' transformer blocks (image trunk and text transformer) before training. The first
    steps are slower while the kernels compile; needs a C++ compiler on CPU."""

    def __post_init__(self) -> None:
        bad = [t for t in self.report_to.split(",") if t.strip() not in TRACKERS]
        if bad:
            raise ConfigError(
                f"train.report_to: unknown tracker {bad[0].strip()!r}; valid: {', '.join(TRACKERS)} "
                "(comma-separated for several)"
            )
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.accum_steps < 1:
            raise ConfigError(f"train.accum_steps must be >= 1, got {self.accum_steps}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")


@dataclass
class CheckpointConfig:
    """Periodic checkpoints (ZeRO-sharded under DeepSpeed), resuming, and the consolidated model export."""

    every: int = 0
    """Save a checkpoint every N steps (0: only at the end of the run)."""
    keep: int = 3
    """Keep the newest N checkpoints (the one `latest` points to is never deleted)."""
    resume: str | None = None
    """'latest' (the run directory's newest complete checkpoint; a fresh start when there is none) or the path
    of a checkpoint directory or run directory."""
    export: bool = True
    """Write model.safetensors (consolidated fp32 DualTower weights) beside config.yaml at the end."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: only at the end), got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class ZeroShotDataConfig:
    """A labelled image set for zero-shot classification: one image folder, WebDataset shards or HF dataset."""

    image_folder: str | None = None
    """A folder with one sub-folder of images per class."""
    wds_shards: str | None = None
    """WebDataset shards whose samples carry a class label (see label_key); needs classnames."""
    hf_dataset: str | None = None
    """A Hugging Face dataset: a save_to_disk folder, or anything datasets.load_dataset reads."""
    hf_split: str | None = None
    """Split of a HF DatasetDict (default: its only split)."""
    image_key: str = "image"
    """Image column of the HF dataset."""
    label_key: str | None = None
    """Class label: WebDataset 'cls' (default) or 'json:FIELD'; HF ClassLabel column (default 'label')."""
    classnames: str | None = None
    """'imagenet' or a .txt/.json file; default: folder names / ClassLabel names (required for WebDataset)."""
    templates: str = "openai"
    """Prompt templates: 'openai' (80), 'simple' (7) or a .txt/.json file, one '{}' per template."""
    name: str | None = None
    """Task name in results and logs; default: the folder, shard folder or dataset name."""

    def __post_init__(self) -> None:
        given = [k for k in ("image_folder", "wds_shards", "hf_dataset") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"give one labelled image source, not {' and '.join(given)}")

    @property
    def enabled(self) -> bool:
        return bool(self.image_folder or self.wds_shards or self.hf_dataset)


@dataclass
class EvalConfig:
    """Evaluation during and at the end of training."""

    zeroshot: bool = True
    """Zero-shot classification of the held-out images (each class family of the synthetic set, with prompt
    ensembles) at the end of training and every eval.every steps."""
    batch_size: int = 256
    """Images per forward pass during evaluation."""
    every: int = 0
    """Run held-out zero-shot classification and retrieval every N steps (0: only at the end)."""
    retrieval: bool = True
    """Measure image-text retrieval recall on the held-out shards' captions (data.caption_key)."""
    workers: int = 0
    """Loader processes decoding held-out images during training evaluation."""
    classification: ZeroShotDataConfig = field(default_factory=ZeroShotDataConfig)
    """A labelled image set to evaluate alongside the held-out shards."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0 turns periodic evaluation off), got {self.every}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PretrainConfig:
    """Pretrain a CLIP/SigLIP dual tower (or a self-supervised image objective) on WebDataset shards or the embedded
    synthetic set: `accelerate launch scripts/pretrain.py --loss siglip`. Everything below is a flag."""

    objective: str = "contrastive"
    """What to train: contrastive (the image-text loss --loss names), or any registered objective: clip, siglip,
    simclr, moco, byol, dino (see vlp/objectives/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    aux_ssl: str | None = None
    """Add a self-supervised image term (simclr, moco, byol or dino) to the contrastive loss, as SLIP does."""
    aux_ssl_weight: float = 1.0
    """Weight of the auxiliary SSL term in the total loss."""
    output_dir: str | None = None
    """Run directory; default runs/<time>-<loss>, or runs/<time>-<objective> for a standalone SSL run."""

    @property
    def image_text_loss(self) -> str | None:
        """The image-text loss this run trains (clip, siglip), or None for an objective without one."""
        if self.objective == "contrastive" or self.objective == self.loss.name:
            return self.loss.name
        return self.loss.name if self.objective in LOSS_DEFAULTS else None


PRETRAIN_ALIASES: dict[str, str] = {
    "loss": "loss.name",
    "objective": "objective",
    "model": "model.name",
    "batch-size": "train.batch_size",
    "steps": "train.steps",
    "seed": "train.seed",
    "precision": "train.precision",
    "lr": "optim.lr",
    "warmup-steps": "optim.warmup_steps",
    "output-dir": "output_dir",
    "accum-steps": "train.accum_steps",
    "deepspeed": "train.deepspeed",
    "report-to": "train.report_to",
    "resume": "checkpoint.resume",
    "checkpoint-every": "checkpoint.every",
    "keep-checkpoints": "checkpoint.keep",
    "grad-checkpointing": "model.grad_checkpointing",
    "lock-image": "model.lock_image",
    "lock-text": "model.lock_text",
    "train-shards": "data.train_shards",
    "eval-shards": "data.eval_shards",
    "train-num-samples": "data.train_num_samples",
    "workers": "data.workers",
    "eval-every": "eval.every",
    "aux-ssl": "aux_ssl",
    "aux-ssl-weight": "aux_ssl_weight",
}


@dataclass
class ZeroShotEvalConfig:
    """Zero-shot classification and retrieval of a vlp checkpoint or an open_clip model (scripts/eval_zeroshot.py)."""

    checkpoint: str | None = None
    """A vlp run directory or checkpoint (.pt, or a consolidated .safetensors beside config.yaml)."""
    open_clip_model: str | None = None
    """An open_clip model name (or local-dir:PATH) to evaluate instead of a vlp checkpoint."""
    pretrained: str | None = None
    """Weights for --open-clip-model: a local file (or a tag open_clip knows)."""
    data: ZeroShotDataConfig = field(default_factory=ZeroShotDataConfig)
    retrieval_shards: str | None = None
    """Image-caption WebDataset shards for retrieval recall."""
    caption_key: str = "txt"
    """Captions of retrieval_shards: 'txt' or 'json:FIELD' (a string or a list of captions)."""
    heldout: bool | None = None
    """Evaluate the run's held-out data exactly as training does; default: when no other data is given."""
    output_dir: str | None = None
    """Where results.json and the plots go; default <run dir>/eval-zeroshot, else ./eval-zeroshot."""
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:N."""
    plots: bool = True
    num_examples: int = 16
    """Images in the example grid (with their top predictions)."""

    def __post_init__(self) -> None:
        if bool(self.checkpoint) == bool(self.open_clip_model):
            raise ConfigError(
                "give exactly one model: --checkpoint RUN_DIR_OR_FILE or --open-clip-model NAME [--pretrained PATH]"
            )
        if self.pretrained and not self.open_clip_model:
            raise ConfigError("--pretrained goes with --open-clip-model (a vlp --checkpoint holds its own weights)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0 or self.num_examples < 0:
            raise ConfigError("workers and num_examples must be >= 0")


ZEROSHOT_ALIASES: dict[str, str] = {
    "image-folder": "data.image_folder",
    "wds-shards": "data.wds_shards",
    "hf-dataset": "data.hf_dataset",
    "hf-split": "data.hf_split",
    "image-key": "data.image_key",
    "label-key": "data.label_key",
    "classnames": "data.classnames",
    "templates": "data.templates",
    "task-name": "data.name",
}


@dataclass
class ExportConfig:
    """Export a trained run to transformers / open_clip, or import a local transformers CLIP/SigLIP folder."""

    checkpoint: str | None = None
    """Run directory or checkpoint file (for import-hf: the transformers model folder)."""
    output: str | None = None
    """Folder to write (must be empty or absent unless --overwrite)."""
    format: Literal["hf-vision", "hf-full", "open_clip", "import-hf", "import-open_clip"] = "hf-full"
    """hf-vision: image tower (CLIPVisionModelWithProjection / SiglipVisionModel); hf-full: CLIPModel / SiglipModel
    with tokenizer and processor; open_clip: open_clip local-dir folder; import-hf: transformers folder -> vlp run;
    import-open_clip: open_clip checkpoint (local-dir folder, or weights file with --model-config) -> vlp run."""
    overwrite: bool = False
    preset: str | None = None
    """import-hf: preset to check the folder against (required for a vision-only folder: it gives the text tower)."""
    loss: Literal["clip", "siglip"] | None = None
    """import-hf: the loss to fine-tune with (default: clip for CLIPModel, siglip for SiglipModel)."""
    vision_only: bool = False
    """import-hf: take only the image tower from the folder (e.g. a SigLIP checkpoint with a SentencePiece text
    tower); the text tower is the preset's, freshly initialised."""
    model_config: str | None = None
    """import-open_clip with a weights file: its model config (a JSON file or an open_clip model name, e.g.
    ViT-B-32)."""


@dataclass
class MakeShardsConfig:
    """Convert an image folder, a CSV/JSONL file or a Hugging Face dataset into WebDataset tar shards."""

    input: str = ""
    """Image folder, .csv/.tsv/.jsonl file, Hugging Face dataset folder; with --index: a shard spec (braces ok)."""
    output_dir: str = ""
    """Where shards go (with --index: where the metadata goes; default the shards' folder)."""
    input_type: Literal["auto", "folder", "csv", "jsonl", "hf"] = "auto"
    prefix: str = "shard"
    """Shards are named PREFIX-000000.tar, PREFIX-000001.tar, ..."""
    samples_per_shard: int = 10000
    image_column: str = "image"
    """CSV/JSONL: column with the image path (relative to the file's folder); HF: the image column."""
    caption_column: str = "caption"
    """CSV/JSONL/HF: the caption column (a list of captions is kept whole in the json member)."""
    csv_separator: str | None = None
    """Default: tab for .tsv, comma otherwise."""
    hf_split: str = "train"
    hf_builder: str | None = None
    """Use load_dataset(HF_BUILDER, data_dir=INPUT), e.g. imagefolder, json, parquet; default: load_from_disk
    when INPUT is a save_to_disk folder, else load_dataset(INPUT)."""
    max_side: int | None = None
    """Downscale images whose longer side exceeds this (re-encodes as JPEG)."""
    jpeg_quality: int | None = None
    """Re-encode every image as JPEG at this quality (1-100; >= 90 keeps full-resolution colour); with only
    --max-side, resized images use 95."""
    workers: int = 0
    """Processes for decoding/encoding; 0: one per CPU core."""
    overwrite: bool = False
    """Replace existing PREFIX-*.tar shards in the output folder."""
    index: bool = False
    """Write metadata (sample counts) for existing shards given by --input, e.g. LAION/DataComp/CC3M tars."""

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError(
                "--input is required (an image folder, a .csv/.jsonl file, a Hugging Face dataset, "
                "or with --index a shard spec)"
            )
        if not self.index and not self.output_dir:
            raise ConfigError("--output-dir is required")
        if self.samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"--max-side must be >= 1, got {self.max_side}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", self.prefix):
            raise ConfigError(f"--prefix {self.prefix!r} may only hold letters, digits, '-' and '_'")


# --------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with validation
# --------------------------------------------------------------------------------------------------------------


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(None allowed, the type without None: one type, or a Union of the others)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, args[0] if len(args) == 1 else functools.reduce(operator.or_, args)
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(inner, '__name__', inner)})")
    tp = inner
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. float | Literal["auto"]: the first member that fits
        for member in get_args(tp):
            try:
                return _coerce(value, member, key)
            except ConfigError:
                continue
        names = [
            repr(get_args(m)[0]) if get_origin(m) is Literal else getattr(m, "__name__", str(m)) for m in get_args(tp)
        ]
        raise ConfigError(f"{key}: invalid value {value!r}; expected {' or '.join(names)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping with keys {_field_names(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: invalid value {value!r}; valid: {', '.join(map(str, choices))}")
        return value
    if origin in (list, Sequence):
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from nested mappings, rejecting unknown keys and badly typed values."""
    hints = get_type_hints(cls)
    names = _field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {prefix}{k}{hint}; valid keys: {', '.join(prefix + n for n in names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML)."""
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section")
    d[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------------------------
# Command line: generated from these dataclasses in vlp.cli (tyro)
# --------------------------------------------------------------------------------------------------------------


def parse_cli(
    cls: type[T], argv: Sequence[str], aliases: Mapping[str, str] | None = None, prog: str | None = None
) -> T:
    """See :func:`vlp.cli.parse_cli` (kept here for callers that import it from vlp.config)."""
    from vlp.cli import parse_cli as _parse_cli

    return _parse_cli(cls, argv, aliases, prog)
