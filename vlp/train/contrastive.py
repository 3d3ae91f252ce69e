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

    shared_keys = ("logit_scale", "logit_bias")

    @property
    def supports_gradcache(self) -> bool:
        return self.aux is None  # an auxiliary SSL term has its own (non-separable) views and state

    def frozen_outputs(self) -> tuple[str, ...]:
        out = []  # in a fixed order: see Objective.shared_keys
        if not any(p.requires_grad for p in self.model.visual.parameters()):
            out.append("image")
        visual = {id(p) for p in self.model.visual.parameters()}
        scalars = {id(self.model.logit_scale)} | ({id(self.model.logit_bias)} if self.model.logit_bias is not None
                                                   else set())
        text = [p for p in self.model.parameters() if id(p) not in visual and id(p) not in scalars]
        if not any(p.requires_grad for p in text):
            out.append("text")
        return tuple(out)

    def embed(self, batch: dict[str, Any], reuse: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        m = self.model
        if reuse:  # a frozen tower's embeddings from an earlier pass over this batch
            img = reuse["image"] if "image" in reuse else m.encode_image(batch["image"])
            txt = reuse["text"] if "text" in reuse else m.encode_text(batch["text"])
            scale, bias = m.logit_scale, m.logit_bias
        else:
            img, txt, scale, bias = m(batch["image"], batch["text"])
        out = {"image": img, "text": txt, "logit_scale": scale}
        if bias is not None:
            out["logit_bias"] = bias
        return out

    def loss_from_embeddings(self, emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The contrastive loss of (possibly accumulated) embeddings, in fp32 even under autocast."""
        scale, bias = emb["logit_scale"], emb.get("logit_bias")
        with torch.autocast(device_type=emb["image"].device.type, enabled=False):
            loss = self.loss_fn(emb["image"].float(), emb["text"].float(), scale.float(),
                                None if bias is None else bias.float())
        logs: dict[str, Any] = {"loss/contrastive": loss.detach(), "logit_scale": scale.detach()}
        if bias is not None:
            logs["logit_bias"] = bias.detach()
        return loss, logs

    def forward(self, batch: dict[str, Any], mode: str = "loss", reuse: dict[str, torch.Tensor] | None = None):
        """``mode="loss"``: (loss, logs) of the batch; ``mode="embed"``: :meth:`embed` (for exact accumulation)."""
        if mode == "embed":
            return self.embed(batch, reuse)
        if mode != "loss":
            raise ValueError(f"mode must be 'loss' or 'embed', got {mode!r}")
        loss, logs = self.loss_from_embeddings(self.embed(batch))
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
