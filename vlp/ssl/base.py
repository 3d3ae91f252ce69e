"""What the SSL methods share: the method interface and helpers.

A method (:class:`SSLMethod`) turns a list of augmented views into a loss, given the image tower to train. The
same method object serves both modes (registered by vlp/objectives/<method>.py):

- standalone (``--objective NAME``): :class:`vlp.objectives.ssl_standalone.SSLObjective` owns the image tower
  and the method. The text tower and the tower's image-text projection are not used.
- auxiliary (``--aux-ssl NAME``): the method is the auxiliary term of the image-text objective and trains the
  DualTower's image tower through its backbone features (before the contrastive projection).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.ssl_views import DEFAULT_MEAN, DEFAULT_STD, MultiView
from vlp.model import DualTower, ModelPreset
from vlp.ssl.backbone import check_not_zero3


def collapse_statistic(features: torch.Tensor) -> torch.Tensor:
    """The collapse statistic of a batch of features (N, D): 1 for features spread like an isotropic Gaussian, 0 when
    every row points the same way.

    Each row is L2-normalised, the batch's mean direction is removed and the rows are normalised again; the
    statistic is the mean over dimensions of the per-dimension standard deviation, times sqrt(D) (SimSiam's monitor,
    Chen & He, 2021, on centred features). Centring matters for backbone features: after a ReLU they share a large
    common direction, which on uncentred features reads as near-collapse for a tower that separates its classes
    well (0.03 against 0.7-0.9 centred, issue 17).
    """
    f = F.normalize(features.detach().float(), dim=-1)
    f = F.normalize(f - f.mean(dim=0, keepdim=True), dim=-1)
    return f.std(dim=0).mean() * math.sqrt(f.shape[1])


class SSLMethod(nn.Module):
    """A self-supervised image loss on augmented views of the same image.

    ``visual`` is the student image tower; it is kept as a plain reference (not a sub-module) because it belongs
    to the DualTower (auxiliary mode) or the standalone objective. Subclasses implement :meth:`compute` and, if
    they have a teacher, :meth:`update_teacher`.
    """

    name = "ssl"

    def __init__(self, visual: nn.Module, views: MultiView) -> None:
        super().__init__()
        self._student = (visual,)
        self.views = views
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        """Optimiser steps done (0-based index of the step being computed)."""
        self._checked = False

    @property
    def student_visual(self) -> nn.Module:
        return self._student[0]

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {"ssl_views": self.views(sample["image"])}

    def compute(self, views: Sequence[torch.Tensor], visual: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss for a batch of views (a list with one (B, 3, H, W) tensor per view) and logs."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], model: DualTower) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.run(batch["ssl_views"], model.visual)

    def run(self, views: Sequence[torch.Tensor], visual: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self._checked:
            check_not_zero3(visual)
            self._checked = True
        return self.compute(views, visual)

    def update_teacher(self, index: int, total_steps: int) -> None:
        """EMA update after the optimiser step with 0-based ``index`` (methods without a teacher: nothing)."""

    def after_step(self, step: int, total_steps: int) -> None:
        self.update_teacher(step - 1, total_steps)
        self.step.fill_(step)


def preset_norm(preset: ModelPreset) -> tuple[Sequence[float], Sequence[float]]:
    """The preset's normalisation mean/std (open_clip's defaults when it names none)."""
    pp = preset.preprocess or {}
    return pp.get("mean") or DEFAULT_MEAN, pp.get("std") or DEFAULT_STD


def scale_or(value: Sequence[float] | None, default: tuple[float, float]) -> tuple[float, float]:
    return (float(value[0]), float(value[1])) if value is not None else default
