"""The image-text contrastive objective (CLIP softmax or SigLIP sigmoid), optionally with an auxiliary SSL term.

The registered image-text objectives (``clip.py``, ``siglip.py``) build it with their loss.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from vlp.losses import ContrastiveLoss
from vlp.model import DualTower, build_tokenizer, build_transforms
from vlp.objectives.base import AuxiliaryTerm, DualTowerObjective, build_dual_tower

log = logging.getLogger(__name__)

#: at most this many samples of each process's first batch estimate the mean output that centre_init removes
CENTRE_INIT_MAX_SAMPLES = 256


class ContrastiveObjective(DualTowerObjective):
    """Image-text loss on normalised tower outputs, plus ``aux_weight`` x an auxiliary term if one is given."""

    def __init__(
        self,
        model: DualTower,
        loss_fn: ContrastiveLoss,
        image_transform,
        tokenizer,
        aux: AuxiliaryTerm | None = None,
        aux_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.aux = aux
        self.aux_weight = aux_weight
        self.has_ssl = aux is not None

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
        scalars = {id(self.model.logit_scale)} | (
            {id(self.model.logit_bias)} if self.model.logit_bias is not None else set()
        )
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
            loss = self.loss_fn(
                emb["image"].float(), emb["text"].float(), scale.float(), None if bias is None else bias.float()
            )
        # logged values are copies taken at this forward pass (before the step's update), under every engine:
        # a detached view would share the parameter's storage and show the updated value except under ZeRO-3
        logs: dict[str, Any] = {"loss/contrastive": loss.detach(), "logit_scale": scale.detach().float().clone()}
        if bias is not None:
            logs["logit_bias"] = bias.detach().float().clone()
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

    @functools.cached_property
    def centred_towers(self) -> tuple[str, ...]:
        """The towers a fresh run centres on its first batch (vlp.centre_init): those ``loss.centre_init`` (or the
        loss's default) names, none when the weights are ``--model.pretrained``; never a locked tower, nor one
        without a last linear map (a timm ViT with attention pooling and no projection: logged once)."""
        from vlp.centre_init import image_output_map, text_output_map

        cfg = self._cfg
        wanted = cfg.loss.resolved_centre_towers
        if not wanted or cfg.model.pretrained:
            return ()
        locked = {"image": cfg.model.lock_image, "text": cfg.model.lock_text}
        maps = {"image": image_output_map(self.model.clip), "text": text_output_map(self.model.clip)}
        if missing := [t for t in wanted if maps[t] is None and not locked[t]]:
            log.warning(
                "loss.centre_init: no last linear map to centre in the %s tower; left as built", " and ".join(missing)
            )
        return tuple(t for t in wanted if not locked[t] and maps[t] is not None)

    def lr_scales(self) -> dict[str, float]:
        loss = self._cfg.loss
        scales = {}
        if self.model.logit_bias is not None and self.model.logit_bias.requires_grad:
            scales["logit_bias"] = loss.resolved_bias_lr_scale
        if self.model.logit_scale.requires_grad:
            scales["logit_scale"] = loss.resolved_temperature_lr_scale
        return {k: v for k, v in scales.items() if v != 1.0}

    def wants_data_init(self) -> bool:
        return bool(self.centred_towers)

    def init_from_data(self, batch: dict[str, Any]) -> dict[str, float]:
        from vlp.centre_init import centre_outputs

        n = min(len(batch["image"]), CENTRE_INIT_MAX_SAMPLES)
        device = self.model.logit_scale.device
        images, tokens = batch["image"][:n].to(device), batch["text"][:n].to(device)
        return centre_outputs(self.model, images, tokens, self.centred_towers)

    def after_step(self, step: int, total_steps: int) -> None:
        if self.aux is not None:
            self.aux.after_step(step, total_steps)

    def describe(self) -> str:
        aux = f" + {self._cfg.aux_ssl_weight:g} x {self._cfg.aux_ssl}" if self.aux is not None else ""
        return f"{self.preset.name} ({self._cfg.objective}) with {self._cfg.loss.name}/{self._cfg.loss.impl} loss{aux}"


def build_image_text(
    cfg: Any, loss_factory: Callable[[Any], ContrastiveLoss], model: DualTower | None = None, preset: Any = None
) -> ContrastiveObjective:
    """The image-text objective of ``cfg``: its DualTower (or ``model`` built from ``preset``),
    ``loss_factory(cfg.loss)`` (+ ``cfg.aux_ssl``)."""
    from vlp.objectives.registry import auxiliary_term

    if model is None:
        model, preset = build_dual_tower(cfg, preset)
    aux = None
    if getattr(cfg, "aux_ssl", None):
        aux = auxiliary_term(cfg.aux_ssl)(cfg, model, preset)
    obj = ContrastiveObjective(
        model,
        loss_factory(cfg.loss),
        build_transforms(preset, is_train=True),
        build_tokenizer(preset),
        aux,
        getattr(cfg, "aux_ssl_weight", 1.0),
    )
    obj.attach(cfg, model, preset)
    return obj
