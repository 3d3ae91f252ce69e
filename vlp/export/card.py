"""Model cards (README.md with YAML metadata) for exported folders, written with huggingface_hub's ModelCard.

The metadata says which library loads the folder (``library_name``), what it is for (``pipeline_tag``), where it came
from (preset, loss, steps, the weights it was initialised from) and, when the run wrote a ``summary.json``, its
zero-shot figures as ``model-index`` results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PIPELINE = {
    "hf-full": "zero-shot-image-classification",
    "hf-vision": "image-feature-extraction",
    "open_clip": "zero-shot-image-classification",
}
LIBRARY = {"hf-full": "transformers", "hf-vision": "transformers", "open_clip": "open_clip"}
LOAD = {
    "hf-full": 'from transformers import pipeline\n\nclassify = pipeline("zero-shot-image-classification", '
    'model="{dir}")',
    "hf-vision": "from transformers import AutoImageProcessor, AutoModel\n\n"
    'tower = AutoModel.from_pretrained("{dir}")\nprocessor = AutoImageProcessor.from_pretrained("{dir}")',
    "open_clip": 'import open_clip\n\nmodel, _, preprocess = open_clip.create_model_and_transforms("local-dir:{dir}")\n'
    'tokenizer = open_clip.get_tokenizer("local-dir:{dir}")',
}


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of a run directory, a checkpoint directory (runs/X/checkpoints/step-N) or a file in it."""
    p = Path(checkpoint)
    if p.is_file():
        p = p.parent
    if p.parent.name == "checkpoints":
        p = p.parent.parent
    return p


def run_info(checkpoint: str | Path, cfg: Any = None) -> dict[str, Any]:
    """What a model card says about a run: its name, preset, loss, steps, initial weights and zero-shot figures."""
    run = run_dir_of(checkpoint)
    summary_file = run / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    info: dict[str, Any] = {"run": run.name}
    if cfg is not None:
        info["preset"] = Path(cfg.model.name).stem if cfg.model.name.endswith((".yaml", ".yml")) else cfg.model.name
        info["loss"] = getattr(cfg, "image_text_loss", None) or cfg.loss.name
        info["steps"] = summary.get("steps", cfg.train.steps)
        if cfg.model.pretrained and run_dir_of(cfg.model.pretrained).resolve() != run.resolve():
            info["initialised_from"] = str(cfg.model.pretrained)
            source = run_dir_of(cfg.model.pretrained) / "source.json"
            if source.is_file():
                info["base_model"] = json.loads(source.read_text()).get("source")
    source = run / "source.json"
    if source.is_file():  # an imported run exported unchanged
        info.setdefault("base_model", json.loads(source.read_text()).get("source"))
    info["zeroshot"] = {
        k.removeprefix("zeroshot/"): float(v)
        for k, v in summary.items()
        if k.startswith("zeroshot/") and isinstance(v, (int, float)) and k != "zeroshot/num_images"
    }
    if "zeroshot/num_images" in summary:
        info["zeroshot_images"] = int(summary["zeroshot/num_images"])
    return info


def model_card(fmt: str, family: str, architecture: str, info: dict[str, Any] | None = None):
    """The huggingface_hub ModelCard of an export in format ``fmt`` (hf-full, hf-vision, open_clip)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    info = dict(info or {})
    name = info.get("run") or architecture
    results = [
        EvalResult(
            task_type="zero-shot-image-classification",
            dataset_type="vlp-eval-shards",
            dataset_name="held-out evaluation shards of the run",
            metric_type="accuracy",
            metric_name=k,
            metric_value=v,
        )
        for k, v in sorted(info.get("zeroshot", {}).items())
        if not k.endswith("/chance")
    ]
    extra: dict[str, Any] = {
        "vlp": {k: info[k] for k in ("run", "preset", "loss", "steps", "initialised_from") if info.get(k) is not None}
    }
    if info.get("base_model"):
        extra["base_model"] = str(info["base_model"])
    data = ModelCardData(
        library_name=LIBRARY[fmt],
        pipeline_tag=PIPELINE[fmt],
        tags=["vlp", family, "vision", "contrastive-image-text", LIBRARY[fmt]],
        model_name=name if results else None,
        eval_results=results or None,
        **extra,
    )
    lines = [
        f"# {name}",
        "",
        f"A {family.upper()} {'image tower' if fmt == 'hf-vision' else 'dual tower'} "
        f"({architecture}) trained and exported with vlp (`scripts/export_hf.py --format {fmt}`); it loads "
        f"with {LIBRARY[fmt]} alone.",
        "",
    ]
    facts = [
        (k.replace("_", " "), info[k])
        for k in ("preset", "loss", "steps", "initialised_from", "base_model")
        if info.get(k) is not None
    ]
    if facts:
        lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    if info.get("zeroshot"):
        n = info.get("zeroshot_images")
        lines += [
            f"Zero-shot top-1 on the run's held-out evaluation shards{f' ({n} images)' if n else ''}:",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {k} | {v:.4f} |" for k, v in sorted(info["zeroshot"].items())],
            "",
        ]
    lines += ["```python", LOAD[fmt].format(dir="PATH/TO/THIS/FOLDER"), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(
    out_dir: Path, fmt: str, family: str, architecture: str, info: dict[str, Any] | None = None
) -> Path:
    """README.md in ``out_dir``."""
    path = Path(out_dir) / "README.md"
    model_card(fmt, family, architecture, info).save(str(path))
    return path
