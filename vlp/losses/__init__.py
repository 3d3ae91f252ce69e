"""Contrastive image-text losses, one per file, selected by name and implementation through a registry."""

from __future__ import annotations

from vlp.config import ConfigError, LossConfig
from vlp.losses.base import ContrastiveLoss
from vlp.losses.clip import ChunkedClipLoss, NaiveClipLoss, clip_loss_reference
from vlp.losses.siglip import ChunkedSigLipLoss, NaiveSigLipLoss, siglip_loss_reference

# (loss name, implementation) -> class. A new loss or implementation is one file plus one line here.
LOSSES: dict[tuple[str, str], type[ContrastiveLoss]] = {
    ("clip", "naive"): NaiveClipLoss,
    ("siglip", "naive"): NaiveSigLipLoss,
    ("clip", "chunked"): ChunkedClipLoss,
    ("siglip", "chunked"): ChunkedSigLipLoss,
}


def build_loss(cfg: LossConfig) -> ContrastiveLoss:
    """Instantiate the loss named by ``cfg.name`` / ``cfg.impl``."""
    key = (cfg.name, cfg.impl)
    if key not in LOSSES:
        valid = ", ".join(f"{n}/{i}" for n, i in sorted(LOSSES))
        raise ConfigError(f"no loss {cfg.name!r} with impl {cfg.impl!r}; valid: {valid}")
    cls = LOSSES[key]
    kwargs = {"max_logit_scale": cfg.resolved_max_logit_scale}
    if cfg.impl == "chunked":
        kwargs["chunk_size"] = cfg.chunk_size
    return cls(**kwargs)


__all__ = [
    "LOSSES",
    "ChunkedClipLoss",
    "ChunkedSigLipLoss",
    "ContrastiveLoss",
    "NaiveClipLoss",
    "NaiveSigLipLoss",
    "build_loss",
    "clip_loss_reference",
    "siglip_loss_reference",
]
