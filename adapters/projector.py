"""The multimodal projector: the only trained part of the adapter, from vision width to LLM width.

Types follow LLaVA's naming: ``linear`` is one Linear; ``mlpNx_gelu`` is Linear, then N-1 x [GELU, Linear]. The
module is an ``nn.Sequential``, so its state-dict keys are ``0.weight``, ``2.weight``, ... as in LLaVA's
``mm_projector``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vlp.config import ConfigError

if TYPE_CHECKING:  # torch is imported when a projector is built, not when a config names one
    from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str) -> int:
    """Number of Linear layers of a projector type (``linear`` -> 1, ``mlp2x_gelu`` -> 2)."""
    if projector_type == "linear":
        return 1
    m = _MLP.match(projector_type)
    if m is None or int(m.group(1)) < 1:
        raise ConfigError(
            f"unknown projector type {projector_type!r}; valid: linear, mlp2x_gelu, mlp3x_gelu, "
            "... (mlpNx_gelu with N >= 1)"
        )
    return int(m.group(1))


def check_llava_projector(projector_type: str) -> None:
    """Raise a ConfigError naming ``projector_type`` when ``--format llava`` cannot hold it: transformers'
    LlavaMultiModalProjector is Linear, activation, Linear, which holds linear / mlp1x_gelu and mlp2x_gelu exactly."""
    if projector_depth(projector_type) > 2:
        raise ConfigError(
            f"projector type {projector_type!r} cannot be exported to LlavaForConditionalGeneration, "
            "whose projector is Linear-act-Linear; train with --projector mlp2x_gelu (or linear), or "
            "keep --format projector"
        )


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Sequential:
    """A freshly initialised projector (PyTorch's default Linear init) of ``projector_type``."""
    from torch import nn

    depth = projector_depth(projector_type)
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)
