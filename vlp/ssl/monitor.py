"""Representation checks usable during training: k-NN accuracy on labelled held-out images, and collapse.

Both read the image tower's pooled backbone features (what the SSL heads read, before the contrastive
projection), computed in eval mode on the preset's evaluation transform:

- k-NN top-1: leave-one-out weighted k-NN over the held-out set with DINO's vote (k = 20 nearest neighbours by
  cosine similarity, each voting exp(sim / 0.07) for its class; Caron et al., 2021). Chance is 1 / classes.
- collapse: :func:`vlp.ssl.base.collapse_statistic` of the features (SimSiam's mean per-dimension standard deviation
  of L2-normalised features, on features centred by their mean direction): reported times sqrt(d), 1 = spread like
  an isotropic Gaussian, 0 = every image maps to the same direction (``monitor/embed_std_x_sqrt_d``), and divided
  by sqrt(d) (``monitor/embed_std``, about 1/sqrt(d) when spread). The same statistic of each training batch's
  backbone features is logged as ``ssl/<method>/z_std``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vlp.ssl.backbone import backbone_features, check_not_zero3
from vlp.ssl.base import collapse_statistic

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_top1(features: torch.Tensor, labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Leave-one-out weighted k-NN top-1 accuracy of ``features`` (N, D) with integer ``labels`` (N,)."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"k-NN needs at least 2 labelled samples, got {n}")
    f = F.normalize(features.float(), dim=-1)
    sim = f @ f.t()
    sim.fill_diagonal_(float("-inf"))
    k = min(k, n - 1)
    top_sim, top_idx = sim.topk(k, dim=1)
    num_classes = int(labels.max()) + 1
    votes = torch.zeros(n, num_classes, dtype=torch.float32, device=f.device)
    votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
    return float((votes.argmax(dim=1) == labels).float().mean())


class RepresentationMonitor:
    """Computes k-NN top-1 and the collapse statistic of an image tower on fixed held-out images every N steps."""

    def __init__(
        self,
        images: Sequence[Image.Image],
        labels: Sequence[str] | None,
        transform: Callable,
        every: int,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
    ) -> None:
        self.images = list(images)
        self.transform = transform
        self.every = every
        self.k = k
        self.temperature = temperature
        self.batch_size = batch_size
        self.classes: list[str] = sorted(set(labels)) if labels else []
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = torch.tensor([index[x] for x in labels]) if labels else None
        self.last: dict[str, float] = {}

    @classmethod
    def from_config(
        cls, cfg, eval_shards: str | None, transform: Callable, is_ssl_run: bool
    ) -> RepresentationMonitor | None:
        """The monitor a run asks for (``cfg``: the ``ssl.monitor`` section, or a run config holding it), or None
        when it is off or there is no held-out data."""
        mcfg = cfg.ssl.monitor if hasattr(cfg, "ssl") else cfg
        every = mcfg.every if mcfg.every is not None else (100 if is_ssl_run else 0)
        if every <= 0:
            return None
        if not eval_shards:
            log.warning("representation monitor: no held-out shards (--eval-shards); k-NN/collapse checks are off")
            return None
        from data_pipelines.loader import build_eval_samples

        # default: the json's first field, the family every caption names in both synthetic sets (shape, object)
        label_key = mcfg.label_key
        images, labels = [], []
        for sample in build_eval_samples(eval_shards):
            images.append(sample["image"])
            meta = sample["json"] or {}
            if label_key is None and meta:
                label_key = next(iter(meta))
            labels.append(meta.get(label_key) if label_key else None)
            if len(images) >= mcfg.max_images:
                break
        if not images:
            log.warning("representation monitor: no images in %s; checks are off", eval_shards)
            return None
        if any(x is None for x in labels):
            log.warning(
                "representation monitor: held-out samples lack json field %r; k-NN is off, collapse monitor on",
                label_key,
            )
            labels = None
        else:
            labels = [str(x) for x in labels]
        log.info(
            "representation monitor: %d held-out images%s, every %d steps",
            len(images),
            f", k-NN on {label_key!r} ({len(set(labels))} classes)" if labels else "",
            every,
        )
        return cls(images, labels, transform, every, mcfg.knn_k, mcfg.knn_temperature)

    @torch.no_grad()
    def features(self, visual: torch.nn.Module, device: torch.device | str) -> torch.Tensor:
        """Backbone features of the held-out images (eval mode; the tower's mode is restored)."""
        check_not_zero3(visual)
        was_training = visual.training
        visual.eval()
        dtype = next(visual.parameters()).dtype
        out = []
        try:
            for i in range(0, len(self.images), self.batch_size):
                batch = torch.stack([self.transform(im) for im in self.images[i : i + self.batch_size]])
                out.append(backbone_features(visual, batch.to(device=device, dtype=dtype)).float().cpu())
        finally:
            visual.train(was_training)
        return torch.cat(out)

    def run(self, visual: torch.nn.Module, device: torch.device | str) -> dict[str, float]:
        """k-NN top-1 (if labelled), chance, and the collapse statistic, as metric names -> values."""
        feats = self.features(visual, device)
        stat = float(collapse_statistic(feats))
        res: dict[str, Any] = {
            "monitor/embed_std": stat / math.sqrt(feats.shape[1]),
            "monitor/embed_std_x_sqrt_d": stat,
        }
        if self.labels is not None:
            res["monitor/knn_top1"] = knn_top1(feats, self.labels, self.k, self.temperature)
            res["monitor/knn_chance"] = 1.0 / len(self.classes)
        self.last = res
        return res

    def maybe_run(self, step: int, visual: torch.nn.Module, device: torch.device | str) -> dict[str, float]:
        """:meth:`run` when ``step`` is a multiple of ``every``; otherwise nothing."""
        if self.every <= 0 or step % self.every:
            return {}
        return self.run(visual, device)
