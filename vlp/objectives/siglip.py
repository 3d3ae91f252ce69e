"""SigLIP (Zhai et al., 2023): a sigmoid loss on every image-text pair, no softmax normalisation.

logits = exp(t) * img @ txt.T + b with t initialised to log(10) and b to -10 (the paper's prior); labels +1 on
the diagonal and -1 elsewhere; loss = -sum(log sigmoid(labels * logits)) / B. The maths (naive and chunked, with
the ring exchange across ranks) is in vlp/losses/siglip.py.
"""

from __future__ import annotations

import math
from typing import Any

from vlp.objectives.registry import register_objective


def _loss(loss_cfg: Any):
    from vlp.losses import build_loss

    return build_loss(loss_cfg)


@register_objective(
    "siglip",
    "image_text",
    loss_defaults={"init_logit_scale": math.log(10.0), "init_logit_bias": "auto", "max_logit_scale": None},
)
def build(cfg: Any, world: Any, model: Any = None, preset: Any = None):
    """Image-text contrastive training with the SigLIP sigmoid loss (the ``loss`` section configures it)."""
    from vlp.objectives.image_text import build_image_text

    return build_image_text(cfg, _loss, model, preset)
