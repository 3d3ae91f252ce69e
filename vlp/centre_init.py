"""Data-dependent initialisation of a dual tower: centre each tower's outputs on the first training batch.

Randomly initialised towers map all their inputs to nearly one direction: after ReLU and average pooling every image
feature is positive, and every caption's end token shares its token and position embedding, so the L2-normalised
embeddings of ``tiny-resnet-hr`` crowd into narrow cones (the mean of 256 image embeddings has norm 0.978, of their
captions 0.80). A step that turns one cone then moves all B x B image-text cosines together. CLIP's softmax is
blind to such a common shift of a row's logits; SigLIP's sigmoid is not: every logit moves by t x the shift and the
loss pushes the towers around on the constant-logit plateau instead of separating the pairs (docs/training.md,
"SigLIP's initial bias and temperature").

:func:`centre_outputs` removes the common direction where it is cheapest: the last linear map of each tower (the
projection into the shared embedding space) is multiplied on its output side by the projector I - m m^T onto the
complement of m, the unit mean of that tower's outputs over the batch. The batch's outputs then have mean exactly
zero; nothing else about the architecture changes (the same modules and state-dict keys, so exports and
``--model.pretrained`` loads are unaffected), and training re-learns the removed direction if it needs it. Under
several processes the mean is the global batch's (summed across ranks), so every rank makes the same change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class OutputMap:
    """A tower's last linear map: an ``nn.Linear`` (y = W x + b) or a matrix parameter applied as y = x @ A."""

    def __init__(self, where: str, module: nn.Linear | None = None, matrix: nn.Parameter | None = None) -> None:
        self.where, self.module, self.matrix = where, module, matrix

    def project_out(self, direction: torch.Tensor) -> None:
        """Compose the map with I - d d^T on its output side (``direction`` a unit vector of the output space)."""
        with torch.no_grad():
            if self.module is not None:
                w = self.module.weight
                d = direction.to(w.device, w.dtype)
                w.sub_(torch.outer(d, d @ w))
                if self.module.bias is not None:
                    self.module.bias.sub_(d * (d @ self.module.bias))
            else:
                a = self.matrix
                d = direction.to(a.device, a.dtype)
                a.sub_(torch.outer(a @ d, d))


def _as_map(where: str, obj: object) -> OutputMap | None:
    if isinstance(obj, nn.Linear):
        return OutputMap(where, module=obj)
    if isinstance(obj, nn.Parameter) and obj.dim() == 2:
        return OutputMap(where, matrix=obj)
    if isinstance(obj, nn.Sequential) and len(obj) and isinstance(obj[-1], nn.Linear):
        return OutputMap(f"{where}[-1]", module=obj[-1])
    return None


def image_output_map(clip: nn.Module) -> OutputMap | None:
    """The image tower's last linear map (open_clip's ViT ``proj``; a timm tower's head projection, the last layer of
    its MLP head, or the trunk's own classifier when open_clip adds no head); None when there is none."""
    visual = clip.visual
    if getattr(visual, "proj", None) is not None and isinstance(visual.proj, nn.Parameter):
        return _as_map("visual.proj", visual.proj)
    head = getattr(visual, "head", None)
    if isinstance(head, nn.Sequential) and len(head):
        if hasattr(head, "proj"):
            return _as_map("visual.head.proj", head.proj)
        if hasattr(head, "mlp"):
            return _as_map("visual.head.mlp.fc2", head.mlp.fc2)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "get_classifier"):
        return _as_map("visual.trunk classifier", trunk.get_classifier())
    return None


def text_output_map(clip: nn.Module) -> OutputMap | None:
    """The text tower's last linear map (``text_projection`` of open_clip's CLIP or of a custom text tower; the
    ``proj`` of a Hugging Face text tower); None when there is none."""
    text = getattr(clip, "text", None)
    candidates = [("text_projection", getattr(clip, "text_projection", None))]
    if text is not None:
        candidates += [("text.text_projection", getattr(text, "text_projection", None))]
        candidates += [("text.proj", getattr(text, "proj", None))]
    for where, obj in candidates:
        found = _as_map(where, obj) if obj is not None else None
        if found is not None:
            return found
    return None


def _global_mean(outputs: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of ``outputs`` (n, d), over every process's batch when a process group is up."""
    total = outputs.double().sum(0)
    count = torch.tensor([float(outputs.shape[0])], dtype=torch.float64, device=outputs.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        both = torch.cat([total, count])
        torch.distributed.all_reduce(both)
        total, count = both[:-1], both[-1:]
    return (total / count).float()


@torch.no_grad()
def centre_outputs(
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    towers: tuple[str, ...] = ("image", "text"),
) -> dict[str, float]:
    """Centre the towers named in ``towers`` of ``model`` (a :class:`vlp.model.DualTower`) on a batch (this process's
    share of it under several processes). Returns, per tower, the norm of the mean normalised embedding of the batch
    before and after (``init/<tower>_mean_norm_before``, ``..._after``: 1 is a single direction, near 0 centred).

    The forward passes run in training mode (as the first step will see the towers) without touching the towers'
    buffers (e.g. batch-norm running statistics are restored afterwards)."""
    clip = model.clip
    encoders: dict[str, tuple[Callable[[], torch.Tensor], OutputMap | None]] = {
        "image": (lambda: model.encode_image(images, normalize=False), image_output_map(clip)),
        "text": (lambda: model.encode_text(tokens, normalize=False), text_output_map(clip)),
    }
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    stats: dict[str, float] = {}
    try:
        for tower in towers:
            encode, out_map = encoders[tower]
            if out_map is None:
                raise ValueError(f"centre_outputs: the {tower} tower has no last linear map to centre")
            raw = encode()
            stats[f"init/{tower}_mean_norm_before"] = F.normalize(raw.float(), dim=-1).mean(0).norm().item()
            out_map.project_out(F.normalize(_global_mean(raw), dim=0))
            after = F.normalize(encode().float(), dim=-1)
            stats[f"init/{tower}_mean_norm_after"] = after.mean(0).norm().item()
    finally:
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return stats
