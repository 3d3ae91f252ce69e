"""The image-text contrastive objective (CLIP softmax or SigLIP sigmoid), optionally with an auxiliary term."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.losses import ContrastiveLoss, build_loss
from vlp.model import DualTower, ModelPreset, build_tokenizer, build_transforms
from vlp.train.objective import Objective, register_objective


class AuxiliaryTerm(nn.Module):
    """An extra loss beside the contrastive one (e.g. SimCLR on image views, as in SLIP).

    ``sample_transform`` adds its own tensors to a sample; ``forward(batch, model)`` returns (loss, logs).
    """

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {}

    def forward(self, batch: dict[str, Any], model: DualTower) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        pass


class ContrastiveObjective(Objective):
    """Image-text loss on normalised tower outputs, plus ``aux_weight`` x an auxiliary term if one is given."""

    def __init__(self, model: DualTower, loss_fn: ContrastiveLoss, image_transform, tokenizer,
                 aux: AuxiliaryTerm | None = None, aux_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.aux = aux
        self.aux_weight = aux_weight

    def sample_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = {"image": self.image_transform(sample["image"]), "text": self.tokenizer([sample["text"]])[0]}
        if self.aux is not None:
            out.update(self.aux.sample_transform(sample))
        return out

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        img, txt, scale, bias = self.model(batch["image"], batch["text"])
        loss = self.loss_fn(img.float(), txt.float(), scale.float(), None if bias is None else bias.float())
        logs: dict[str, Any] = {"loss/contrastive": loss.detach(), "logit_scale": scale.detach()}
        if bias is not None:
            logs["logit_bias"] = bias.detach()
        if self.aux is not None:
            aux_loss, aux_logs = self.aux(batch, self.model)
            logs.update(aux_logs)
            logs["loss/aux"] = aux_loss.detach()
            loss = loss + self.aux_weight * aux_loss
        return loss, logs

    def after_step(self, step: int, total_steps: int) -> None:
        if self.aux is not None:
            self.aux.after_step(step, total_steps)


# name -> factory(cfg, model, preset) -> AuxiliaryTerm, filled by the SSL package.
AUXILIARY_TERMS: dict[str, Any] = {}


@register_objective("contrastive")
def build_contrastive(cfg, model: DualTower, preset: ModelPreset) -> ContrastiveObjective:
    """The default objective: ``cfg.loss`` between the two towers (+ ``cfg.aux_ssl`` if set)."""
    aux = None
    if getattr(cfg, "aux_ssl", None):
        from vlp.config import ConfigError

        if cfg.aux_ssl not in AUXILIARY_TERMS:
            raise ConfigError(f"unknown --aux-ssl {cfg.aux_ssl!r}; valid: {', '.join(sorted(AUXILIARY_TERMS))}")
        aux = AUXILIARY_TERMS[cfg.aux_ssl](cfg, model, preset)
    return ContrastiveObjective(model, build_loss(cfg.loss), build_transforms(preset, is_train=True),
                                build_tokenizer(preset), aux, getattr(cfg, "aux_ssl_weight", 1.0))
