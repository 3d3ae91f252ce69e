"""One evaluation pass: encode an image source (split over ranks), then zero-shot classification and retrieval.

The same code serves the standalone CLI (one process) and evaluation during training (every rank takes part:
each encodes its share of the images and of the prompt/caption texts; features are gathered and the metrics are
computed on the main process). Every rank runs the same number of forward calls, which sharded-parameter
engines such as ZeRO-3 need. Evaluation puts the model in eval mode and restores the caller's mode and every RNG
state afterwards, so it never changes a training run's random stream.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.distributed import all_gather_objects, all_gather_rows, comm_device
from vlp.eval.retrieval import retrieval_metrics
from vlp.eval.sources import ImageSource
from vlp.eval.zeroshot import (
    Template,
    check_templates,
    classification_metrics,
    classifier_from_prompt_features,
    format_prompts,
    top_predictions,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The model, whatever built it
# ----------------------------------------------------------------------------------------------------------------


def _scalar(p: torch.Tensor) -> float:
    """A scalar parameter's value, gathering it first when DeepSpeed ZeRO-3 has partitioned it (collective)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return float(p.detach().float().reshape(-1)[0])
    return float(p.detach().float().reshape(-1)[0])


@dataclass
class ZeroShotModel:
    """What evaluation needs from a dual-tower model: normalised encoders, tokenizer, preprocessing, t and b.

    ``logit_scale`` is the multiplier exp(t); ``logit_bias`` is b for sigmoid (SigLIP) models, else None.
    """

    module: nn.Module
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[torch.Tensor], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    logit_scale: float
    logit_bias: float | None
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @classmethod
    def from_dual_tower(
        cls,
        model: nn.Module,
        tokenizer: Callable | None = None,
        preprocess: Callable | None = None,
        description: dict[str, Any] | None = None,
    ) -> ZeroShotModel:
        """Wrap a :class:`vlp.model.DualTower` (tokenizer and eval transform from its preset unless given)."""
        from vlp.model import build_tokenizer, build_transforms

        bias = model.logit_bias
        return cls(
            module=model,
            encode_image=lambda x: model.encode_image(x, normalize=True),
            encode_text=lambda t: model.encode_text(t, normalize=True),
            tokenizer=tokenizer or build_tokenizer(model.preset),
            preprocess=preprocess or build_transforms(model.preset, is_train=False),
            logit_scale=math.exp(_scalar(model.logit_scale)),
            logit_bias=None if bias is None else _scalar(bias),
            description=description or {"type": "vlp", "preset": model.preset.name},
        )

    @classmethod
    def from_open_clip(
        cls, model: nn.Module, tokenizer: Callable, preprocess: Callable, description: dict[str, Any] | None = None
    ) -> ZeroShotModel:
        """Wrap an open_clip ``CLIP`` / ``CustomTextCLIP`` with its tokenizer and eval preprocessing."""
        bias = getattr(model, "logit_bias", None)
        return cls(
            module=model,
            encode_image=lambda x: model.encode_image(x, normalize=True),
            encode_text=lambda t: model.encode_text(t, normalize=True),
            tokenizer=tokenizer,
            preprocess=preprocess,
            logit_scale=math.exp(_scalar(model.logit_scale)),
            logit_bias=None if bias is None else _scalar(bias),
            description=description or {"type": "open_clip"},
        )


# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """An image source plus what to measure on it: zero-shot classification per label family (with that
    family's prompt templates) and, if ``retrieval`` is named, image-text retrieval on the captions."""

    source: ImageSource
    templates: Mapping[str, Sequence[Template]]
    retrieval: str | None = None
    """Name of the retrieval task on this source's captions; None: no retrieval."""

    def __post_init__(self) -> None:
        for fam in self.source.families:
            if fam not in self.templates:
                raise ValueError(f"no prompt templates for label family {fam!r}")
            check_templates(self.templates[fam], f"templates of {fam!r}")


@dataclass
class EvalOptions:
    """How to run an evaluation pass."""

    batch_size: int = 256
    workers: int = 0
    num_examples: int = 0
    """Keep this many leading images (display-ready) and their top predictions, for plots."""
    top_k_examples: int = 5
    distributed: bool = True
    """Split the work over an initialised process group; False: this process evaluates everything alone."""


@dataclass
class EvalOutput:
    """JSON-ready results (``None`` on non-main ranks) and, per classification task, display images of its
    examples by image index."""

    results: dict[str, Any] | None
    example_images: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Process-group plumbing
# ----------------------------------------------------------------------------------------------------------------


def _world(distributed: bool) -> tuple[int, int]:
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _max_over_ranks(value: int, world: int, device: torch.device) -> int:
    if world == 1:
        return value
    t = torch.tensor([value], device=comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, and every RNG (python, numpy, torch, CUDA) restored on exit."""
    from vlp.checkpointing import rng_state, set_rng_state

    state = rng_state()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)
        set_rng_state(state)


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


class _RankImages(IterableDataset):
    """This rank's (and loader worker's) share of a source, decoded and preprocessed: image i goes to slot
    i mod (world x workers). Yields (index, tensor or None when undecodable, key, labels, captions)."""

    def __init__(self, source: ImageSource, transform: Callable, rank: int, world: int) -> None:
        self.source, self.transform, self.rank, self.world = source, transform, rank, world

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        stride, slot = self.world * workers, self.rank * workers + wid
        for i, rec in enumerate(self.source.records()):
            if i % stride != slot:
                continue
            try:
                x = self.transform(rec.load_image())
            except Exception as e:  # noqa: BLE001 - a corrupt image is skipped and counted, never fatal
                log.debug("skipping undecodable image %s: %s", rec.key, e)
                x = None
            yield i, x, rec.key, rec.labels, rec.captions


def _as_list(batch: list) -> list:
    return batch


def _to_display(x: torch.Tensor, preprocess: Callable) -> np.ndarray:
    """A preprocessed image tensor back to uint8 HxWx3 using the transform's Normalize mean/std."""
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            mean, std = t.mean, t.std
    img = x.float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def encode_texts_split(
    model: ZeroShotModel, texts: Sequence[str], batch_size: int, distributed: bool = True
) -> torch.Tensor:
    """Normalised text features [len(texts), D] (float32, CPU) on every rank; each rank encodes an equal slice."""
    rank, world = _world(distributed)
    n = len(texts)
    if n == 0:
        raise ValueError("no texts to encode")
    per = math.ceil(n / world)
    padded = list(texts) + [texts[-1]] * (per * world - n)
    mine = padded[rank * per : (rank + 1) * per]
    out = []
    for i in range(0, len(mine), batch_size):
        tokens = model.tokenizer(mine[i : i + batch_size]).to(model.device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    local = torch.cat(out)
    return torch.cat(all_gather_rows(local, model.device) if world > 1 else [local])[:n]


@dataclass
class EncodedImages:
    """Image features and metadata in source order, the same on every rank."""

    features: torch.Tensor
    keys: list[str]
    labels: list[dict[str, int]]
    captions: list[list[str]]
    indices: list[int]
    skipped: int
    examples: dict[int, np.ndarray]


def encode_source(model: ZeroShotModel, source: ImageSource, options: EvalOptions) -> EncodedImages:
    """Encode every decodable image of ``source``, this rank taking its share; gathered, in source order."""
    rank, world = _world(options.distributed)
    loader = DataLoader(
        _RankImages(source, model.preprocess, rank, world),
        batch_size=options.batch_size,
        num_workers=options.workers,
        collate_fn=_as_list,
        generator=torch.Generator().manual_seed(0),
    )
    feats, meta, examples = [], [], {}
    skipped = batches = 0
    shape = None
    for batch in loader:
        ok = [b for b in batch if b[1] is not None]
        skipped += len(batch) - len(ok)
        if not ok:
            continue
        x = torch.stack([b[1] for b in ok])
        shape = tuple(x.shape[1:])
        feats.append(F.normalize(model.encode_image(x.to(model.device, model.dtype)).float(), dim=-1).cpu())
        batches += 1
        for i, xi, key, labels, caps in ok:
            meta.append((i, key, labels, caps))
            if i < options.num_examples:
                examples[i] = _to_display(xi, model.preprocess)
    all_meta = all_gather_objects((meta, skipped, shape, examples)) if world > 1 else [(meta, skipped, shape, examples)]
    shape = next((m[2] for m in all_meta if m[2] is not None), None)
    if shape is None:
        raise ValueError(f"no decodable images in source {source.name!r}")
    for _ in range(_max_over_ranks(batches, world, model.device) - batches):  # same forward count on every rank
        model.encode_image(torch.zeros((1, *shape), device=model.device, dtype=model.dtype))
    local = torch.cat(feats) if feats else torch.zeros((0, 0))
    dim = _max_over_ranks(local.shape[1] if feats else 0, world, model.device)
    if not feats:
        local = torch.zeros((0, dim))
    parts = all_gather_rows(local, model.device) if world > 1 else [local]
    rows = [(m, f) for (rank_meta, *_), p in zip(all_meta, parts) for m, f in zip(rank_meta, p)]
    rows.sort(key=lambda r: r[0][0])
    merged_examples: dict[int, np.ndarray] = {}
    for m in all_meta:
        merged_examples.update(m[3])
    return EncodedImages(
        features=torch.stack([f for _, f in rows]),
        keys=[m[1] for m, _ in rows],
        labels=[m[2] for m, _ in rows],
        captions=[m[3] for m, _ in rows],
        indices=[m[0] for m, _ in rows],
        skipped=sum(m[1] for m in all_meta),
        examples=merged_examples,
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def evaluate_set(model: ZeroShotModel, eval_set: EvalSet, options: EvalOptions) -> EvalOutput:
    """Zero-shot classification for every label family of the source and retrieval on its captions."""
    rank, _ = _world(options.distributed)
    with preserved_state(model.module):
        enc = encode_source(model, eval_set.source, options)
        results: dict[str, Any] = {
            "source": eval_set.source.describe(),
            "num_images": len(enc.keys),
            "skipped_images": enc.skipped,
            "classification": {},
            "retrieval": {},
        }
        if enc.skipped:
            log.warning("%s: skipped %d undecodable image(s)", eval_set.source.name, enc.skipped)
        for fam, classnames in eval_set.source.families.items():
            rows = [j for j, lab in enumerate(enc.labels) if fam in lab]
            prompts = format_prompts(classnames, eval_set.templates[fam])
            weights = classifier_from_prompt_features(
                encode_texts_split(model, prompts, options.batch_size, options.distributed), len(classnames)
            )
            if rank != 0:
                continue
            if not rows:
                log.warning("%s: no images carry a %r label; skipping that family", eval_set.source.name, fam)
                continue
            sims = enc.features[rows] @ weights
            targets = torch.tensor([enc.labels[j][fam] for j in rows])
            m = classification_metrics(sims, targets, classnames, model.logit_scale, model.logit_bias)
            m["num_templates"] = len(eval_set.templates[fam])
            if options.num_examples:
                ex_rows = [r for r in rows if enc.indices[r] < options.num_examples]
                preds = top_predictions(
                    enc.features[ex_rows] @ weights,
                    classnames,
                    options.top_k_examples,
                    model.logit_scale,
                    model.logit_bias,
                )
                m["examples"] = [
                    {
                        "index": enc.indices[r],
                        "key": enc.keys[r],
                        "label": classnames[enc.labels[r][fam]],
                        "correct": p[0]["index"] == enc.labels[r][fam],
                        "top": p,
                    }
                    for r, p in zip(ex_rows, preds)
                ]
            results["classification"][fam] = m
        if eval_set.retrieval:
            with_caps = [j for j, caps in enumerate(enc.captions) if caps]
            texts = [c for j in with_caps for c in enc.captions[j]]
            owner = torch.tensor([k for k, j in enumerate(with_caps) for _ in enc.captions[j]], dtype=torch.long)
            if not texts:
                raise ValueError(
                    f"retrieval on {eval_set.source.name!r}: no captions found "
                    "(check the caption key, e.g. 'txt' or 'json:caption')"
                )
            text_feats = encode_texts_split(model, texts, options.batch_size, options.distributed)
            if rank == 0:
                results["retrieval"][eval_set.retrieval] = retrieval_metrics(enc.features[with_caps], text_feats, owner)
    if rank != 0:
        return EvalOutput(None)
    return EvalOutput(results, {task: enc.examples for task in results["classification"]})


def merge_outputs(outputs: Sequence[EvalOutput], model: ZeroShotModel) -> EvalOutput:
    """One results document for several evaluation sets (task names must be distinct)."""
    if any(o.results is None for o in outputs):
        return EvalOutput(None)
    merged: dict[str, Any] = {
        "model": {**model.description, "logit_scale": model.logit_scale, "logit_bias": model.logit_bias},
        "classification": {},
        "retrieval": {},
        "sources": [],
    }
    images: dict[str, dict[int, np.ndarray]] = {}
    for o in outputs:
        res = o.results
        assert res is not None
        merged["sources"].append(
            {**res["source"], "num_images": res["num_images"], "skipped_images": res["skipped_images"]}
        )
        for kind in ("classification", "retrieval"):
            for name, value in res[kind].items():
                if name in merged[kind]:
                    raise ValueError(
                        f"two evaluation sets both define the {kind} task {name!r}; give them distinct names"
                    )
                merged[kind][name] = value
        images.update(o.example_images)
    return EvalOutput(merged, images)


def evaluate(model: ZeroShotModel, sets: Sequence[EvalSet], options: EvalOptions | None = None) -> EvalOutput:
    """Evaluate every set; on the main process the merged results, elsewhere ``EvalOutput(None)``."""
    options = options or EvalOptions()
    return merge_outputs([evaluate_set(model, s, options) for s in sets], model)


def flatten_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Scalars for logs: ``zeroshot/<task>/{top1,top5,mean_per_class,chance}`` and ``retrieval/<metric>``
    (``retrieval/<task>/<metric>`` when there are several retrieval tasks)."""
    flat: dict[str, float] = {}
    for task, m in results.get("classification", {}).items():
        for key in ("top1", "top5", "mean_per_class", "chance"):
            flat[f"zeroshot/{task}/{key}"] = float(m[key])
        probs = m.get("probabilities", {})
        if "sigmoid_true_class_mean" in probs:
            flat[f"zeroshot/{task}/sigmoid_true_class_mean"] = float(probs["sigmoid_true_class_mean"])
    retrieval = results.get("retrieval", {})
    for task, m in retrieval.items():
        prefix = "retrieval/" if len(retrieval) == 1 else f"retrieval/{task}/"
        for key, value in m.items():
            if key.startswith(("image_to_text_R", "text_to_image_R")):
                flat[prefix + key] = float(value)
    return flat
