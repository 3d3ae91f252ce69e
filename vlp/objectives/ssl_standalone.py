"""Standalone self-supervised training of the image tower: what every SSL objective registers as ``--objective``.

The objective owns the image tower and the method. The text tower and the tower's image-text projection are not
used: the text tower is simply not part of the objective (so neither the optimiser, DDP nor DeepSpeed see it) and
the projection is frozen, so data-parallel wrappers never meet a parameter without a gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.model import DualTower
from vlp.objectives.base import DualTowerObjective
from vlp.ssl.backbone import projection_parameters
from vlp.ssl.base import SSLMethod


class SSLObjective(DualTowerObjective):
    """The image tower trained by an SSL method on images alone (captions are ignored)."""

    requires_text = False
    trains_text = False
    has_ssl = True

    def __init__(self, tower: DualTower, method: SSLMethod) -> None:
        super().__init__()
        for p in projection_parameters(tower.visual):
            p.requires_grad_(False)
        self.visual = tower.visual
        self.method = method
        self._tower = (tower,)  # a plain reference: the text tower is not part of the objective

    @property
    def tower(self) -> DualTower:
        return self._tower[0]

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self.method.sample_transform(sample)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.method.run(batch["ssl_views"], self.visual)

    def after_step(self, step: int, total_steps: int) -> None:
        self.method.after_step(step, total_steps)

    def describe(self) -> str:
        return f"{self.preset.name} ({self.method.name}) (image tower only)"

    def eval_module(self) -> nn.Module:
        return self.tower

    def export(self, run_dir: Path, state: dict[str, torch.Tensor], summary: dict[str, Any]) -> dict[str, Any]:
        """model.safetensors of the whole DualTower: the trained image tower and the untouched text tower."""
        from vlp.checkpointing import export_model

        if not self._cfg.checkpoint.export:
            return {}
        tower_state = {k: v for k, v in self.tower.state_dict().items()}
        prefix = "visual."
        visual_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        tower_state.update({f"clip.visual.{k}": v for k, v in visual_state.items()})
        return {"export": str(export_model(tower_state, run_dir))}
