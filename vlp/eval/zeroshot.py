"""Zero-shot classification: class names x prompt templates -> classifier weights, and the metrics of the field.

Class names and templates come from plain-text or JSON files, or from the built-in ImageNet class names and
prompt-template sets that open_clip ships (imported, not copied). A template is a ``str.format`` string with one
``{}`` for the class name, or a callable (open_clip's built-in sets are lambdas).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlp.config import ConfigError

Template = str | Callable[[str], str]

BUILTIN_CLASSNAMES = ("imagenet",)
BUILTIN_TEMPLATES = ("openai", "simple")


def builtin_classnames(name: str) -> list[str]:
    """Built-in class-name lists: ``imagenet`` (the 1000 ImageNet-1k names from open_clip, in wnid order)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if name == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    raise ConfigError(
        f"unknown built-in class names {name!r}; valid: {', '.join(BUILTIN_CLASSNAMES)} (or a .txt / .json file)"
    )


def builtin_templates(name: str) -> list[Template]:
    """Built-in template sets from open_clip: ``openai`` (the 80 OpenAI ImageNet prompts) or ``simple`` (its 7)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if name not in sets:
        raise ConfigError(
            f"unknown built-in templates {name!r}; valid: {', '.join(BUILTIN_TEMPLATES)} (or a .txt / .json file)"
        )
    return list(sets[name])


def _read_lines_or_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_classnames(spec: str) -> list[str] | dict[str, str]:
    """Class names from ``imagenet`` or a file.

    A ``.txt`` file holds one name per line (blank lines and ``#`` comments ignored); a ``.json`` file holds a list
    of names, ``{"classnames": [...]}``, or a mapping from raw label (a folder name, a label string) to name. A list
    gives names by class index; a mapping names classes by their raw label.
    """
    if spec in BUILTIN_CLASSNAMES:
        return builtin_classnames(spec)
    path = Path(spec)
    data = _read_lines_or_json(path, "class-name")
    if isinstance(data, dict) and "classnames" in data:
        data = data["classnames"]
    if isinstance(data, dict):
        if not all(isinstance(v, str) and v.strip() for v in data.values()):
            raise ConfigError(f"{path}: every class name in the mapping must be a non-empty string")
        names: list[str] | dict[str, str] = {str(k): v.strip() for k, v in data.items()}
    elif isinstance(data, list):
        if not all(isinstance(v, str) and v.strip() for v in data):
            raise ConfigError(f"{path}: every class name must be a non-empty string")
        names = [v.strip() for v in data]
    else:
        raise ConfigError(f"{path}: expected a list of class names or a mapping label -> name")
    if not names:
        raise ConfigError(f"{path}: the class-name file is empty; put one class name per line")
    values = list(names.values()) if isinstance(names, dict) else names
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ConfigError(f"{path}: duplicate class names {dupes[:5]}; every class needs a distinct name")
    return names


def load_templates(spec: str) -> list[Template]:
    """Prompt templates from ``openai``, ``simple`` or a file.

    A ``.txt`` file holds one template per line; a ``.json`` file a list or ``{"templates": [...]}``. Every template
    must contain ``{}`` where the class name goes.
    """
    if spec in BUILTIN_TEMPLATES:
        return builtin_templates(spec)
    path = Path(spec)
    data = _read_lines_or_json(path, "template")
    if isinstance(data, dict) and "templates" in data:
        data = data["templates"]
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise ConfigError(f'{path}: expected a list of template strings such as "a photo of a {{}}."')
    data = [t.strip() for t in data if t.strip()]
    if not data:
        raise ConfigError(f"{path}: the template file is empty; put one template per line, e.g. 'a photo of a {{}}.'")
    check_templates(data, str(path))
    return data


def check_templates(templates: Sequence[Template], where: str = "templates") -> None:
    """Every string template must format with exactly one ``{}`` placeholder."""
    if not templates:
        raise ConfigError(f"{where}: no prompt templates; give at least one, e.g. 'a photo of a {{}}.'")
    for i, t in enumerate(templates):
        if callable(t):
            continue
        try:
            ok = "{}" in t and t.format("x") != t
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{where}: template {i + 1} {t!r} needs exactly one '{{}}' where the class name goes "
                "(and no other braces)"
            )


def format_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """All prompts, class-major: [c0 t0, c0 t1, ..., c1 t0, ...]."""
    return [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]


def classifier_from_prompt_features(prompt_features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[D, C] weights from class-major prompt embeddings [C * T, D]: normalise, average per class, renormalise."""
    emb = F.normalize(prompt_features.float(), dim=-1)
    emb = emb.view(num_classes, emb.shape[0] // num_classes, -1).mean(1)
    return F.normalize(emb, dim=-1).T.contiguous()


@torch.no_grad()
def build_zeroshot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """[D, C] weights: per class, the normalised text embeddings of every template, averaged and renormalised."""
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    texts = format_prompts(classnames, templates)
    embs = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        embs.append(encode_text(tokens).float())
    return classifier_from_prompt_features(torch.cat(embs), len(classnames))


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many rows have their target among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == targets[:, None]).any(1).sum())


def classification_metrics(
    similarities: torch.Tensor,
    targets: torch.Tensor,
    classnames: Sequence[str],
    logit_scale: float = 100.0,
    logit_bias: float | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, mean per-class and per-class accuracy, confusion matrix and probability summaries.

    ``similarities`` are image-classifier cosines [N, C]. Predictions rank them (softmax and, for SigLIP, the
    sigmoid of ``logit_scale * s + logit_bias`` are both monotonic in s, so they rank identically). Probabilities:
    softmax over classes of ``logit_scale * s``; with a bias also the per-class sigmoid. Per-class accuracy is None
    for a class without images; the mean per-class accuracy averages the classes that have images.
    """
    n, c = similarities.shape
    if n == 0:
        raise ValueError("no images to evaluate")
    targets = targets.long()
    pred = similarities.argmax(1)
    confusion = torch.bincount(targets * c + pred, minlength=c * c).view(c, c)
    support = confusion.sum(1)
    correct = confusion.diag()
    per_class = [(float(correct[i]) / float(support[i])) if support[i] > 0 else None for i in range(c)]
    present = [a for a in per_class if a is not None]
    logits = logit_scale * similarities.float()
    softmax = logits.softmax(1)
    rows = torch.arange(n)
    out: dict[str, Any] = {
        "num_images": n,
        "num_classes": c,
        "top1": topk_correct(similarities, targets, 1) / n,
        "top5": topk_correct(similarities, targets, 5) / n,
        "mean_per_class": sum(present) / len(present),
        "chance": 1.0 / c,
        "per_class": [
            {"class": name, "accuracy": acc, "support": int(s)}
            for name, acc, s in zip(classnames, per_class, support.tolist())
        ],
        "confusion_matrix": confusion.tolist(),
        "probabilities": {
            "logit_scale": float(logit_scale),
            "softmax_true_class_mean": float(softmax[rows, targets].mean()),
            "softmax_top1_mean": float(softmax.max(1).values.mean()),
        },
    }
    if logit_bias is not None:
        sigmoid = (logits + logit_bias).sigmoid()
        out["probabilities"].update(
            {
                "logit_bias": float(logit_bias),
                "sigmoid_true_class_mean": float(sigmoid[rows, targets].mean()),
                "sigmoid_top1_mean": float(sigmoid.max(1).values.mean()),
                "sigmoid_true_class_above_half": float((sigmoid[rows, targets] > 0.5).float().mean()),
            }
        )
    return out


def top_predictions(
    similarities: torch.Tensor,
    classnames: Sequence[str],
    k: int = 5,
    logit_scale: float = 100.0,
    logit_bias: float | None = None,
) -> list[list[dict[str, Any]]]:
    """Per image, its ``k`` best classes with softmax (and, with a bias, sigmoid) probabilities."""
    logits = logit_scale * similarities.float()
    soft = logits.softmax(1)
    sig = (logits + logit_bias).sigmoid() if logit_bias is not None else None
    k = min(k, similarities.shape[1])
    idx = similarities.topk(k, dim=1).indices
    out = []
    for i, row in enumerate(idx.tolist()):
        preds = []
        for j in row:
            p: dict[str, Any] = {"class": classnames[j], "index": j, "softmax": float(soft[i, j])}
            if sig is not None:
                p["sigmoid"] = float(sig[i, j])
            preds.append(p)
        out.append(preds)
    return out
