"""Zero-shot classification: class-name x prompt-template classifiers and top-k accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def build_zeroshot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """[D, C] weights: per class, the normalised text embeddings of every template, averaged and renormalised."""
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    texts = [t.format(c) for c in classnames for t in templates]
    embs = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        embs.append(F.normalize(encode_text(tokens).float(), dim=-1))
    emb = torch.cat(embs).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).T.contiguous()


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many rows have their target among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == targets[:, None]).any(1).sum())


@torch.no_grad()
def encode_images(encode_image: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor],
                  device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Normalised image embeddings [N, D] of preprocessed image tensors, in batches."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack(list(images[i : i + batch_size])).to(device)
        out.append(F.normalize(encode_image(batch).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_label_families(
    image_features: torch.Tensor,
    labels: Sequence[dict],
    class_families: dict[str, Sequence[str]],
    templates: dict[str, Sequence[str]],
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Zero-shot top-1/top-5 for every class family (e.g. shape, colour) of labelled images, with chance level.

    ``labels[i][family]`` is the class name of image i in that family. Keys: ``zeroshot/<family>/top1``,
    ``.../top5``, ``.../chance`` (1 / number of classes).
    """
    results: dict[str, float] = {}
    for family, classnames in class_families.items():
        index = {c: j for j, c in enumerate(classnames)}
        missing = {lab.get(family) for lab in labels} - set(index)
        if missing:
            raise ValueError(f"labels of family {family!r} not among its class names: {sorted(map(str, missing))}")
        targets = torch.tensor([index[lab[family]] for lab in labels])
        weights = build_zeroshot_classifier(encode_text, tokenizer, classnames, templates[family], device).cpu()
        logits = image_features @ weights
        n = len(labels)
        results[f"zeroshot/{family}/top1"] = topk_correct(logits, targets, 1) / n
        results[f"zeroshot/{family}/top5"] = topk_correct(logits, targets, 5) / n
        results[f"zeroshot/{family}/chance"] = 1.0 / len(classnames)
    return results
