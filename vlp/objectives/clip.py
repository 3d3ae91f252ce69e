"""CLIP (Radford et al., 2021): softmax cross-entropy over image-text similarities, both directions.

logits = exp(t) * img @ txt.T with t learnable, initialised to log(1/0.07) and clamped to at most log(100); the
loss is the mean of the image->text and text->image cross-entropies over the global batch. The maths (naive and
chunked, across ranks) is in vlp/losses/clip.py.
"""

from __future__ import annotations

import math
from typing import Any

from vlp.objectives.registry import register_objective


def _loss(loss_cfg: Any):
    from vlp.losses import build_loss

    return build_loss(loss_cfg)


@register_objective(
    "clip",
    "image_text",
    loss_defaults={
        "init_logit_scale": math.log(1 / 0.07),
        "init_logit_bias": None,
        "max_logit_scale": math.log(100.0),
        "centre_init": "off",
    },
)
def build(cfg: Any, world: Any, model: Any = None, preset: Any = None):
    """Image-text contrastive training with the CLIP softmax loss (the ``loss`` section configures it)."""
    from vlp.objectives.image_text import build_image_text

    return build_image_text(cfg, _loss, model, preset)
