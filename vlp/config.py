"""Typed configuration for every entry point: dataclasses, YAML loading, command-line overrides.

A config is a tree of dataclasses. Values come, in increasing priority, from the dataclass defaults, a YAML
file (``--config x.yaml``) and command-line flags. Every field is reachable as ``--section.field`` (dashes and
underscores are interchangeable) and the common ones have short aliases (``--loss siglip`` sets ``loss.name``).
Unknown keys and bad values raise :class:`ConfigError` naming the key and listing what is valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
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
            raise ConfigError(f"model.patch_dropout must be in [0, 1) (the fraction of patches dropped), got "
                              f"{self.patch_dropout}")
        if self.lock_image_unlocked_groups < 0 or self.lock_text_unlocked_layers < 0:
            raise ConfigError("model.lock_image_unlocked_groups and model.lock_text_unlocked_layers must be >= 0, got "
                              f"{self.lock_image_unlocked_groups} and {self.lock_text_unlocked_layers}")


@dataclass
class LossConfig:
    """The contrastive image-text objective."""

    name: Literal["clip", "siglip"] = "siglip"
    impl: Literal["naive", "chunked"] = "chunked"
    """chunked (default) tiles the logits and never holds the B x B matrix, forward or backward, on any rank; naive
    materialises it (the reference, and for debugging). Both give the same loss and gradients."""
    chunk_size: int = 1024
    """Tile edge for the chunked implementation. 1024 was measured (docs/benchmarks.md, "Losses: memory and time";
    B=16384, D=512, CPU) to be the fastest tile for siglip and within run-to-run noise (8%) of the fastest for
    clip: smaller tiles add per-tile overhead (128: 1.5x the time), larger ones add memory (4096: up to 2.4x the
    extra peak) without a clear gain."""
    init_logit_scale: float | None = None
    """Initial log temperature t; default log(1/0.07) for clip, log(10) for siglip."""
    init_logit_bias: float | None = None
    """Initial bias b (siglip only); default -10."""
    max_logit_scale: float | None = None
    """Upper clamp on t; default log(100) for clip, none for siglip."""

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"loss.chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def resolved_init_logit_scale(self) -> float:
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return math.log(1 / 0.07) if self.name == "clip" else math.log(10.0)

    @property
    def resolved_init_logit_bias(self) -> float | None:
        if self.name != "siglip":
            return None
        return -10.0 if self.init_logit_bias is None else self.init_logit_bias

    @property
    def resolved_max_logit_scale(self) -> float | None:
        if self.max_logit_scale is not None:
            return self.max_logit_scale
        return math.log(100.0) if self.name == "clip" else None


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
    synthetic_dir: str | None = None
    """Cache directory for the embedded synthetic shards (default: ~/.cache/vlp/synthetic)."""
    synthetic_train_samples: int = 20000
    synthetic_eval_samples: int = 1000
    caption_key: str = "txt"
    """Where the caption lives: 'txt', or 'json:FIELD' for a field of the json member."""
    workers: int = 2
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


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 2e-3
    """Peak learning rate. The default suits the CPU demo (tiny-resnet-hr, batch 64, 1000 steps; on a 7x7-stem variant
    of its tower, 600 SigLIP steps gave held-out shape top-1 33% at 2e-3, 26% at 1e-3 and 12% at 3e-3); set it for
    your model and batch (open_clip_train's default is 5e-4)."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    fused: bool | None = None
    """AdamW's fused kernel (one pass over every parameter; about 3.5x faster than the multi-tensor path on a CPU,
    where the optimiser step of the tiny presets is otherwise ~18% of a step). None: on wherever every trainable
    parameter is a floating-point tensor on a CPU or CUDA device."""


@dataclass
class TrainConfig:
    """Run length, batch and bookkeeping."""

    steps: int = 1000
    batch_size: int = 64
    """Per-process batch size."""
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    log_every: int = 10
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
    compile: bool = False
    """torch.compile the towers' transformer blocks (image trunk and text transformer) before training. The first
    steps are slower while the kernels compile; needs a C++ compiler on CPU."""

    def __post_init__(self) -> None:
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
    batch_size: int = 256
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


def _check_scale(key: str, value: list[float] | None) -> None:
    if value is not None and not (len(value) == 2 and 0 < value[0] <= value[1] <= 1):
        raise ConfigError(f"{key} must be [min, max] with 0 < min <= max <= 1, got {value}")


def _check_positive(section: str, **values: float) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {v}")


def _check_momentum(key: str, value: float | None) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{key} must be in [0, 1], got {value}")


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al., 2020) as SLIP (Mu et al., 2021) runs it on a ViT: NT-Xent over 2N views."""

    temperature: float = 0.1
    """NT-Xent temperature (SLIP's SimCLR term)."""
    hidden_dim: int = 4096
    out_dim: int = 256
    num_layers: int = 3
    """Projection MLP depth (SLIP: 3 layers, 4096 hidden, 256 out)."""
    batch_norm: bool = True
    """Batch norm (over the global batch) in the projection MLP, as in SimCLR and SLIP."""

    def __post_init__(self) -> None:
        _check_positive("ssl.simclr", temperature=self.temperature, hidden_dim=self.hidden_dim, out_dim=self.out_dim,
                        num_layers=self.num_layers)


@dataclass
class MoCoConfig:
    """MoCo v3 (Chen, Xie & He, 2021) or v2 (Chen et al., 2020, with a key queue); None picks the version's value."""

    version: Literal[2, 3] = 3
    temperature: float = 0.2
    """InfoNCE temperature (0.2 for both: MoCo v3's ViT setting and MoCo v2)."""
    momentum: float | None = None
    """Momentum-encoder EMA; None: 0.99 (v3, cosine to 1) or 0.999 (v2, constant)."""
    momentum_cosine: bool | None = None
    """Raise the momentum to 1 on a half-cosine over training; None: true for v3, false for v2."""
    out_dim: int | None = None
    """Embedding size; None: 256 (v3) or 128 (v2)."""
    hidden_dim: int | None = None
    """MLP hidden size; None: 4096 (v3) or the backbone width (v2)."""
    queue_size: int = 65536
    """v2 only: keys in the queue (K); must be a multiple of the global batch."""

    def __post_init__(self) -> None:
        _check_positive("ssl.moco", temperature=self.temperature, queue_size=self.queue_size)
        _check_momentum("ssl.moco.momentum", self.momentum)

    @property
    def resolved_momentum(self) -> float:
        return self.momentum if self.momentum is not None else (0.99 if self.version == 3 else 0.999)

    @property
    def resolved_momentum_cosine(self) -> bool:
        return self.momentum_cosine if self.momentum_cosine is not None else self.version == 3

    @property
    def resolved_out_dim(self) -> int:
        return self.out_dim if self.out_dim is not None else (256 if self.version == 3 else 128)


@dataclass
class BYOLConfig:
    """BYOL (Grill et al., 2020): online projector + predictor regress an EMA target's projection."""

    momentum: float = 0.996
    """Target EMA at the start; raised to 1 on a half-cosine."""
    hidden_dim: int = 4096
    out_dim: int = 256

    def __post_init__(self) -> None:
        _check_positive("ssl.byol", hidden_dim=self.hidden_dim, out_dim=self.out_dim)
        _check_momentum("ssl.byol.momentum", self.momentum)


@dataclass
class DINOConfig:
    """DINO (Caron et al., 2021): self-distillation with a centred, sharpened EMA teacher and multi-crop."""

    out_dim: int = 65536
    """Prototypes K of the head's weight-normalised last layer."""
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    batch_norm: bool = False
    norm_last_layer: bool = True
    """Fix the last layer's weight-norm scale to 1 (more stable; the reference default)."""
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    """Teacher temperature after warmup (e.g. 0.07 with warmup_teacher_temp 0.04 for longer runs)."""
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    """Linear warmup of the teacher temperature from warmup_teacher_temp to teacher_temp over these steps."""
    center_momentum: float = 0.9
    momentum: float = 0.996
    """Teacher EMA at the start; raised to 1 on a half-cosine."""
    local_crops: int = 8
    """Local crops per image beside the 2 global ones."""
    freeze_last_layer_epochs: float = 1.0
    """Keep the last layer fixed for this many epochs (epoch = samples per epoch / global batch, in steps)."""

    def __post_init__(self) -> None:
        _check_positive("ssl.dino", out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                        bottleneck_dim=self.bottleneck_dim, num_layers=self.num_layers,
                        student_temp=self.student_temp, teacher_temp=self.teacher_temp,
                        warmup_teacher_temp=self.warmup_teacher_temp)
        _check_momentum("ssl.dino.momentum", self.momentum)
        _check_momentum("ssl.dino.center_momentum", self.center_momentum)
        if self.local_crops < 0 or self.warmup_teacher_temp_steps < 0 or self.freeze_last_layer_epochs < 0:
            raise ConfigError("ssl.dino.local_crops, warmup_teacher_temp_steps and freeze_last_layer_epochs must be "
                              f">= 0, got {self.local_crops}, {self.warmup_teacher_temp_steps}, "
                              f"{self.freeze_last_layer_epochs}")


@dataclass
class SSLViewsConfig:
    """Augmented views for the SSL objectives; None keeps each method's reference value."""

    crop_scale: list[float] | None = None
    """RandomResizedCrop area range of the (global) views; reference: SimCLR/BYOL/MoCo v3 [0.08, 1],
    MoCo v2 [0.2, 1], DINO global [0.4, 1]."""
    local_crop_scale: list[float] | None = None
    """DINO local crops' area range; reference [0.05, 0.4]."""
    local_crop_size: int | None = None
    """DINO local crop side; None: image size x 96/224 rounded to the patch size (96 at 224)."""

    def __post_init__(self) -> None:
        _check_scale("ssl.views.crop_scale", self.crop_scale)
        _check_scale("ssl.views.local_crop_scale", self.local_crop_scale)
        if self.local_crop_size is not None and self.local_crop_size < 1:
            raise ConfigError(f"ssl.views.local_crop_size must be >= 1, got {self.local_crop_size}")


@dataclass
class SSLMonitorConfig:
    """Representation checks during training: k-NN top-1 on labelled held-out images and a collapse monitor."""

    every: int | None = None
    """Every N steps; None: 100 for runs with an SSL objective or --aux-ssl, 0 (off) otherwise."""
    label_key: str | None = None
    """Field of the held-out samples' json used as the k-NN class; None: 'shape' (the synthetic set)."""
    knn_k: int = 20
    knn_temperature: float = 0.07
    """Weighted k-NN vote as in DINO's evaluation (k=20, T=0.07)."""
    max_images: int = 1000

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 0:
            raise ConfigError(f"ssl.monitor.every must be >= 0 (0 turns it off), got {self.every}")
        _check_positive("ssl.monitor", knn_k=self.knn_k, knn_temperature=self.knn_temperature,
                        max_images=self.max_images)


@dataclass
class SSLConfig:
    """Self-supervised image objectives (standalone --objective NAME, or --aux-ssl NAME beside CLIP/SigLIP)."""

    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    views: SSLViewsConfig = field(default_factory=SSLViewsConfig)
    monitor: SSLMonitorConfig = field(default_factory=SSLMonitorConfig)


@dataclass
class PretrainConfig:
    """Everything `scripts/pretrain.py` needs."""

    objective: str = "contrastive"
    """What to train: contrastive (image-text, --loss picks clip or siglip) or a registered SSL objective."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    aux_ssl: str | None = None
    """Add a self-supervised image term (simclr, moco, byol or dino) to the contrastive loss, as SLIP does."""
    aux_ssl_weight: float = 1.0
    """Weight of the auxiliary SSL term in the total loss."""
    output_dir: str | None = None
    """Run directory; default runs/<time>-<loss>, or runs/<time>-<objective> for a standalone SSL run."""

    @property
    def image_text_loss(self) -> str | None:
        """The image-text loss this run trains (clip, siglip), or None for a standalone SSL objective."""
        return self.loss.name if self.objective == "contrastive" else None


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
            raise ConfigError("give exactly one model: --checkpoint RUN_DIR_OR_FILE or --open-clip-model NAME "
                              "[--pretrained PATH]")
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


# --------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with validation
# --------------------------------------------------------------------------------------------------------------


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
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
# Command line
# --------------------------------------------------------------------------------------------------------------


def _dotted_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, type, doc) for every leaf field."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            out.extend(_dotted_fields(inner, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", tp, ""))
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, no usage dump
        raise ConfigError(message + " (see --help)")


def _type_label(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if get_origin(inner) is Literal:
        label = "|".join(map(str, get_args(inner)))
    else:
        label = getattr(inner, "__name__", str(inner))
    return label + ("|null" if optional else "")


def parse_cli(
    cls: type[T], argv: Sequence[str], aliases: Mapping[str, str] | None = None, prog: str | None = None
) -> T:
    """Parse ``argv`` into ``cls``: ``--config FILE`` (repeatable) then ``--a.b VALUE`` overrides and aliases."""
    aliases = dict(aliases or {})
    leaves = _dotted_fields(cls)
    leaf_names = {name for name, _, _ in leaves}
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip(), allow_abbrev=False)
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    for alias, target in aliases.items():
        if target not in leaf_names:
            raise AssertionError(f"alias --{alias} targets unknown key {target}")
        tp = next(t for n, t, _ in leaves if n == target)
        parser.add_argument(f"--{alias}", dest=target, metavar=_type_label(tp), default=argparse.SUPPRESS,
                            help=f"alias of --{target}")
    for name, tp, _ in leaves:
        flags = [f"--{name}"]
        dashed = f"--{name.replace('_', '-')}"
        if dashed != flags[0] and dashed[2:] not in aliases:
            flags.append(dashed)
        flags = [f for f in flags if f[2:] not in aliases]
        if not flags:  # reachable only through its alias
            continue
        parser.add_argument(*flags, dest=name, metavar=_type_label(tp), default=argparse.SUPPRESS)
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        bad = unknown[0]
        valid = sorted({"--" + n for n in leaf_names} | {"--" + a for a in aliases})
        close = difflib.get_close_matches(bad.split("=")[0], valid, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unrecognised argument {bad}{hint} (see --help for all options)")
    data: dict[str, Any] = {}
    for cfg_file in ns.config:
        data = _deep_merge(data, load_yaml(cfg_file))
    for name, raw in vars(ns).items():
        if name == "config":
            continue
        try:
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError:
            value = raw
        tp = next(t for n, t, _ in leaves if n == name)
        _, inner = _is_optional(tp)
        if inner is str and value is not None and not isinstance(value, str):
            value = raw  # keep '0001' or 'true' as written when a string is wanted
        _set_dotted(data, name, value)
    return from_dict(cls, data)
