"""SigLIP (Zhai et al., 2023): a sigmoid loss on every image-text pair, no softmax normalisation.

logits = t * img @ txt.T + b (t = exp of the learnt log temperature); labels +1 on the diagonal and -1 elsewhere;
loss = -sum(log sigmoid(labels * logits)) / B. The paper starts at t = 10, b = -10; here both default to ``auto``,
the same prior for the run's global batch B: b = -ln(B - 1), t = ln(B - 1) (b = -10, t = 10 at B of about 22,000;
vlp.config.batch_prior_logit_bias/_scale, docs/training.md). The maths (naive and chunked, with
the ring exchange across ranks) is in vlp/losses/siglip.py.
"""

from __future__ import annotations

from typing import Any

from vlp.objectives.registry import register_objective


def _loss(loss_cfg: Any):
    from vlp.losses import build_loss

    return build_loss(loss_cfg)


@register_objective(
    "siglip",
    "image_text",
    loss_defaults={
        "init_logit_scale": "auto",
        "init_logit_bias": "auto",
        "max_logit_scale": None,
        "centre_init": "both",
        "bias_lr_scale": 25.0,
        "temperature_lr_scale": 25.0,
    },
    default_lr=3e-3,
)
def build(cfg: Any, world: Any, model: Any = None, preset: Any = None):
    """Image-text contrastive training with the SigLIP sigmoid loss (the ``loss`` section configures it)."""
    from vlp.objectives.image_text import build_image_text

    return build_image_text(cfg, _loss, model, preset)
