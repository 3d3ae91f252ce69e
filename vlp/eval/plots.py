"""PNG plots of zero-shot results: confusion matrix, per-class accuracy, example images with top predictions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MAX_LABELLED_CLASSES = 40
"""Above this many classes the confusion matrix drops its tick labels and the bar chart shows the extremes."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def plot_confusion(task: str, metrics: Mapping[str, Any], path: Path) -> Path:
    """Row-normalised confusion matrix (true class down, predicted class across)."""
    plt = _pyplot()
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    names = [c["class"] for c in metrics["per_class"]]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    c = len(names)
    size = min(4 + 0.35 * c, 24) if c <= MAX_LABELLED_CLASSES else 10
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
        if c <= 15:
            for i in range(c):
                for j in range(c):
                    if cm[i, j]:
                        ax.text(
                            j,
                            i,
                            int(cm[i, j]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{task}: confusion (top-1 {metrics['top1']:.1%}, {metrics['num_images']} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_class(task: str, metrics: Mapping[str, Any], path: Path) -> Path:
    """Horizontal bars of per-class top-1 accuracy (the worst and best classes when there are many)."""
    plt = _pyplot()
    rows = [(c["class"], c["accuracy"], c["support"]) for c in metrics["per_class"] if c["accuracy"] is not None]
    title = f"{task}: per-class top-1 accuracy (mean per class {metrics['mean_per_class']:.1%})"
    if len(rows) > MAX_LABELLED_CLASSES:
        rows = sorted(rows, key=lambda r: r[1])
        half = MAX_LABELLED_CLASSES // 2
        rows = rows[:half] + rows[-half:]
        title += f"\n{half} worst and {half} best of {len(metrics['per_class'])} classes"
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * len(rows)))
    y = np.arange(len(rows))
    ax.barh(y, [r[1] for r in rows], color="tab:blue")
    ax.axvline(metrics["chance"], color="tab:red", linestyle="--", label=f"chance {metrics['chance']:.1%}")
    ax.set_yticks(y, [f"{r[0]} (n={r[2]})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_examples(
    task: str,
    metrics: Mapping[str, Any],
    images: Mapping[int, np.ndarray],
    path: Path,
    columns: int = 4,
    show_top: int = 3,
) -> Path | None:
    """A grid of the example images, each with its true class and top predictions (green: top-1 correct)."""
    examples = [e for e in metrics.get("examples", []) if e["index"] in images]
    if not examples:
        return None
    plt = _pyplot()
    rows = -(-len(examples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, (3.3 + 0.2 * show_top) * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ex in zip(axes.ravel(), examples):
        ax.imshow(images[ex["index"]])
        lines = [f"true: {ex['label']}"]
        for rank, p in enumerate(ex["top"][:show_top], 1):
            prob = f"{p['softmax']:.0%}" + (f", sigmoid {p['sigmoid']:.2g}" if "sigmoid" in p else "")
            lines.append(f"{rank}. {p['class']} ({prob})")
        ax.set_title("\n".join(lines), fontsize=8, loc="left", color="tab:green" if ex["correct"] else "tab:red")
    fig.suptitle(f"{task}: examples with their top-{show_top} predictions (green: top-1 correct)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.3 + 0.2 * show_top) / rows))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(
    results: Mapping[str, Any], example_images: Mapping[str, Mapping[int, np.ndarray]], out_dir: str | Path
) -> list[Path]:
    """Every classification task's three plots in ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for task, metrics in results.get("classification", {}).items():
        stem = _safe(task)
        written.append(plot_confusion(task, metrics, out / f"{stem}_confusion.png"))
        written.append(plot_per_class(task, metrics, out / f"{stem}_per_class.png"))
        grid = plot_examples(task, metrics, example_images.get(task, {}), out / f"{stem}_examples.png")
        if grid is not None:
            written.append(grid)
    return written
