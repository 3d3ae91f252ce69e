"""The objective interface the engine drives, and what the dual-tower objectives (image-text and SSL) share.

An objective is an ``nn.Module`` that owns every trainable module it uses (towers, heads, teachers, a projector),
so that accelerate/DeepSpeed wrap all of them, and that knows how to turn a decoded sample into tensors. Per step
the engine calls ``sample_transform`` and ``collate`` (through the data pipeline), ``forward`` and ``after_step``;
per run it asks the objective what to evaluate (:meth:`Objective.evaluation`), what to write at the end
(:meth:`Objective.export`) and what to add to the summary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipelines.collate import collate
from vlp.config import ConfigError
from vlp.model import DualTower, ModelPreset, build_model, load_preset

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """A run's resolved data: training shards, held-out shards, and the held-out label families where known."""

    train_shards: str
    eval_shards: str | None
    class_families: dict[str, list[str]] | None = None
    templates: dict[str, list[str]] | None = None


class RunEvaluation:
    """What a run evaluates, every ``every`` steps and at the end. Every rank calls :meth:`evaluate` and
    :meth:`final` at the same steps (the work may be collective); metrics come back on the main process."""

    every: int = 0

    def evaluate(self, step: int, module: nn.Module, device: torch.device) -> dict[str, Any]:
        return {}

    def begin(self, module: nn.Module, device: torch.device) -> dict[str, Any]:
        """Before the first step of a fresh run (e.g. a baseline to compare the end with)."""
        return {}

    def due(self, step: int) -> bool:
        """Whether :meth:`evaluate` has work at ``step`` on this process."""
        return bool(self.every) and step % self.every == 0

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to report the whole run (e.g. the curve so far); kept in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def final(self, module: nn.Module, device: torch.device, step: int | None = None) -> dict[str, Any]:
        """The end-of-run evaluation after step ``step``."""
        return {}


class Objective(nn.Module):
    """Base class: ``forward(batch) -> (loss, logs)``; logs are floats or 0-d tensors for the metrics file.

    Objectives whose loss is a function of per-sample embeddings (the contrastive one) also implement
    :meth:`embed` and :meth:`loss_from_embeddings`, set ``supports_gradcache`` and accept
    ``forward(batch, mode="embed")``: that is what exact large-batch accumulation (vlp.train.gradcache) needs.
    """

    #: whether samples must carry a caption (False lets image-only shards through)
    requires_text: bool = True
    #: leave frozen parameters out of checkpoints (a frozen LLM is not rewritten at every save); resuming then
    #: needs the objective to rebuild them identically (from the run's config)
    exclude_frozen_from_checkpoints: bool = False
    #: whether the objective runs under DeepSpeed ZeRO-3 (partitioned parameters)
    supports_zero3: bool = True
    #: a key of the forward's logs to record as the step's loss instead of the backpropagated one (which may be
    #: a rank's scaled share of it)
    reported_loss_key: str | None = None

    @property
    def supports_gradcache(self) -> bool:
        """Whether the loss splits into :meth:`embed` (per micro-batch) and :meth:`loss_from_embeddings`."""
        return False

    def embed(self, batch: dict[str, Any], reuse: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Embeddings of one (micro-)batch: per-sample rows, plus the :attr:`shared_keys` (e.g. the logit scale).

        ``reuse`` holds embeddings computed earlier for this batch whose producers are frozen
        (:meth:`frozen_outputs`); they are returned as given instead of being recomputed.
        """
        raise NotImplementedError(f"{type(self).__name__} has no separable embeddings")

    def loss_from_embeddings(self, emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of a whole (accumulated) batch from its concatenated :meth:`embed` outputs."""
        raise NotImplementedError(f"{type(self).__name__} has no separable embeddings")

    #: entries of :meth:`embed` that are not per-sample (identical for every micro-batch), in a fixed order: the
    #: backward pass visits them in this order, and every rank must visit them alike (ZeRO-2 reduces gradients in
    #: the order their hooks fire, so two ranks iterating a set in different hash-seeded orders would swap them)
    shared_keys: tuple[str, ...] = ()

    def frozen_outputs(self) -> tuple[str, ...]:
        """Entries of :meth:`embed` that need no gradient because everything producing them is frozen (in a fixed
        order, like :attr:`shared_keys`)."""
        return ()

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Decoded sample {"image": PIL RGB, "text": str | None, "json": dict | None} -> tensors for one sample."""
        raise NotImplementedError

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Samples -> a batch (default: tensors stacked by key, multi-view lists stacked per view)."""
        return collate(samples)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every applied optimiser step (EMA teachers, momentum/temperature schedules)."""

    # -- run-level hooks ---------------------------------------------------------------------------------------
    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name suffix (e.g. ``{"logit_bias": 25.0}``); the optimiser puts
        the parameters whose names end so in a group of their own at that multiple of ``optim.lr``."""
        return {}

    def wants_data_init(self) -> bool:
        """Whether a fresh run calls :meth:`init_from_data` with its first batch before the first step."""
        return False

    def init_from_data(self, batch: dict[str, Any]) -> dict[str, float]:
        """Data-dependent initialisation on this process's share of the first batch (collective under several
        processes; the weights are not wrapped by accelerate/DeepSpeed yet); returns figures to log at step 0."""
        return {}

    def describe(self) -> str:
        """What trains, for the start-up log line."""
        return type(self).__name__

    def hidden_size(self) -> int:
        """The widest layer (sizes DeepSpeed's communication buckets)."""
        return max((max(p.shape) for p in self.parameters() if p.ndim == 2), default=1)

    def evaluation(self, cfg: Any, data: RunData) -> RunEvaluation | None:
        """What to evaluate during and after training (None: nothing)."""
        return None

    def build_plain(self) -> nn.Module:
        """A fresh fp32 copy of the module :meth:`eval_module` returns (evaluation of sharded or 16-bit runs)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be evaluated from a sharded engine")

    def eval_module(self) -> nn.Module:
        """The module evaluation runs on (its weights are gathered under ZeRO-3)."""
        return self

    def export(self, run_dir: Path, state: dict[str, torch.Tensor], summary: dict[str, Any]) -> dict[str, Any]:
        """Write the end-of-run artefacts from the objective's consolidated fp32 state (main process only);
        returns summary entries (e.g. the export's path)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Entries of summary.json that only this objective knows."""
        return {}


class AuxiliaryTerm(nn.Module):
    """An extra loss beside the image-text one (e.g. SimCLR on image views, as in SLIP).

    ``sample_transform`` adds its own tensors to a sample; ``forward(batch, model)`` returns (loss, logs).
    """

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {}

    def forward(self, batch: dict[str, Any], model: DualTower) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------
# What the dual-tower objectives share
# ----------------------------------------------------------------------------------------------------------------


def load_pretrained_weights(model: DualTower, path: str) -> None:
    """Initialise from ``--model.pretrained``: a .pt file ({"model": state} or a state dict), a .safetensors file,
    or a run / checkpoint directory of this project."""
    p = Path(path)
    if p.is_dir():
        from vlp.checkpointing import load_trained_model

        state = load_trained_model(p)[0].state_dict()
    elif p.suffix == ".safetensors" and p.is_file():
        from safetensors.torch import load_file

        state = load_file(str(p))
    elif p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    else:
        raise ConfigError(f"--model.pretrained {path}: no such file or directory")
    model.load_state_dict(state)


def lock_towers(model: DualTower, cfg: Any) -> None:
    """Freeze the image and/or text tower as configured (open_clip's LiT locking), except their last groups."""
    m = cfg.model
    if m.lock_image:
        model.clip.lock_image_tower(unlocked_groups=m.lock_image_unlocked_groups)
    if m.lock_text:
        model.clip.lock_text_tower(unlocked_layers=m.lock_text_unlocked_layers)
    if m.lock_image or m.lock_text:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "locked towers (image=%s, text=%s): %d of %d parameters trainable",
            m.lock_image,
            m.lock_text,
            trainable,
            total,
        )


def build_dual_tower(cfg: Any, preset: ModelPreset | None = None) -> tuple[DualTower, ModelPreset]:
    """The run's DualTower: preset (``preset``, e.g. a resumed run's own, else ``cfg.model.name``'s), gradient
    checkpointing, ``--model.pretrained`` weights, locked towers."""
    preset = preset or load_preset(cfg.model.name)
    model = build_model(preset, cfg.loss)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.model.pretrained:
        load_pretrained_weights(model, cfg.model.pretrained)
    lock_towers(model, cfg)
    return model, preset


class DualTowerObjective(Objective):
    """An objective that trains (part of) a :class:`DualTower`: evaluation on the held-out sets (zero-shot,
    retrieval, the representation monitor) and the consolidated ``model.safetensors`` export."""

    model: DualTower
    preset: ModelPreset
    #: the objective trains the text tower (zero-shot evaluation makes sense)
    trains_text: bool = True
    #: an SSL term is part of the objective (turns the representation monitor on by default)
    has_ssl: bool = False

    def attach(self, cfg: Any, model: DualTower, preset: ModelPreset) -> None:
        self._cfg = cfg
        self.preset = preset
        self._build = lambda: build_model(preset, cfg.loss)

    def hidden_size(self) -> int:
        p = self.preset
        widths = [p.embed_dim, int(p.text_cfg.get("width", 0)), int(p.vision_cfg.get("width", 0))]
        return max(w for w in widths if w)

    def eval_module(self) -> nn.Module:
        return self.model

    def build_plain(self) -> nn.Module:
        return self._build()

    def evaluation(self, cfg: Any, data: RunData) -> RunEvaluation | None:
        from vlp.objectives.evaluation import DualTowerEvaluation

        return DualTowerEvaluation.from_config(cfg, data, self.preset, zeroshot=self.trains_text, ssl=self.has_ssl)

    def summary(self) -> dict[str, Any]:
        return {"model": self.preset.name}

    def export(self, run_dir: Path, state: dict[str, torch.Tensor], summary: dict[str, Any]) -> dict[str, Any]:
        from vlp.checkpointing import dualtower_state, export_model

        if not getattr(self._cfg.checkpoint, "export", True):
            return {}
        return {"export": str(export_model(dualtower_state(state), run_dir))}


Builder = Callable[[Any, Any], Objective]
