"""Standalone zero-shot evaluation of a vlp checkpoint or any open_clip model (``scripts/eval_zeroshot.py``).

Both kinds of model go through the same engine, so a run can be compared with a reference model on the same data.
With a vlp run and no data flags, it evaluates the run's own held-out data exactly as ``--eval-every`` does in
training. Launched with several processes (``torchrun``), the work is split as in training and rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlp.config import ConfigError, ZeroShotEvalConfig, to_dict
from vlp.eval.during_training import heldout_sets, labelled_set, run_heldout_data
from vlp.eval.engine import EvalOptions, EvalSet, ZeroShotModel, evaluate, flatten_metrics
from vlp.eval.sources import WebDatasetSource

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``auto``: this process's CUDA device when there is one, else the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"bad device {spec!r}; valid: auto, cpu, cuda, cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but no CUDA device is available; use --device cpu")
    return device


def init_distributed_from_env(device: torch.device) -> None:
    """Join the process group a launcher (torchrun) describes in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def load_model(cfg: ZeroShotEvalConfig, device: torch.device) -> tuple[ZeroShotModel, Any]:
    """The model to evaluate and, for a vlp checkpoint, its run's PretrainConfig (else None)."""
    if cfg.checkpoint:
        from vlp.checkpointing import load_trained_model

        model, run_cfg = load_trained_model(cfg.checkpoint)
        model.to(device)
        desc = {
            "type": "vlp",
            "checkpoint": str(cfg.checkpoint),
            "preset": run_cfg.model.name,
            "objective": run_cfg.objective,
            "loss": run_cfg.image_text_loss,
        }
        return ZeroShotModel.from_dual_tower(model, description=desc), run_cfg
    import open_clip

    name = cfg.open_clip_model
    schema = name.split(":", 1)[0] if ":" in name else None
    if schema is None and name not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {name!r}; valid: one of open_clip.list_models() "
            f"(e.g. {', '.join(open_clip.list_models()[:4])}, ...) or local-dir:PATH"
        )
    if cfg.pretrained and "/" in cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"--pretrained weights file not found: {cfg.pretrained}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=cfg.pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot build open_clip model {name!r} with pretrained={cfg.pretrained!r}: {e}") from e
    desc = {"type": "open_clip", "model": name, "pretrained": cfg.pretrained}
    return ZeroShotModel.from_open_clip(model, tokenizer, preprocess, desc), None


def build_sets(cfg: ZeroShotEvalConfig, run_cfg: Any) -> list[EvalSet]:
    """The evaluation sets the flags ask for (the run's held-out data by default)."""
    heldout = cfg.heldout if cfg.heldout is not None else not (cfg.data.enabled or cfg.retrieval_shards)
    sets: list[EvalSet] = []
    if heldout:
        if run_cfg is None:
            raise ConfigError(
                "no data to evaluate: give --image-folder, --wds-shards, --hf-dataset or "
                "--retrieval-shards (held-out data comes only with a vlp --checkpoint)"
            )
        sets.extend(heldout_sets(run_cfg, *run_heldout_data(run_cfg)))
        if not sets:
            raise ConfigError(
                f"the run {cfg.checkpoint} has no held-out data configured (data.eval_shards); "
                "give --image-folder, --wds-shards, --hf-dataset or --retrieval-shards"
            )
    if cfg.data.enabled:
        sets.append(labelled_set(cfg.data))
    if cfg.retrieval_shards:
        source = WebDatasetSource(cfg.retrieval_shards, caption_key=cfg.caption_key, name="retrieval")
        sets.append(EvalSet(source, {}, retrieval=source.name))
    return sets


def default_output_dir(cfg: ZeroShotEvalConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if cfg.checkpoint:
        ckpt = Path(cfg.checkpoint)
        if ckpt.is_dir() and ckpt.parent.name == "checkpoints":  # RUN/checkpoints/step-N: beside, not inside it
            return ckpt.parent.parent / f"eval-zeroshot-{ckpt.name}"
        return (ckpt if ckpt.is_dir() else ckpt.parent) / "eval-zeroshot"
    return Path("eval-zeroshot")


def run_zeroshot_eval(cfg: ZeroShotEvalConfig) -> dict[str, Any] | None:
    """Evaluate as configured; on the main process write results.json (+ PNG plots) and return the results."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    init_distributed_from_env(device)
    model, run_cfg = load_model(cfg, device)
    sets = build_sets(cfg, run_cfg)
    options = EvalOptions(
        batch_size=cfg.batch_size, workers=cfg.workers, num_examples=cfg.num_examples if cfg.plots else 0
    )
    out = evaluate(model, sets, options)
    if out.results is None:
        return None
    results = out.results
    results["metrics"] = flatten_metrics(results)
    results["config"] = to_dict(cfg)
    results["eval_time_s"] = time.perf_counter() - t0
    out_dir = default_output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if cfg.plots:
        from vlp.eval.plots import write_plots

        files = [str(p) for p in write_plots(results, out.example_images, out_dir)]
    results["plots"] = files
    path = out_dir / "results.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    results["results_file"] = str(path)
    log.info("wrote %s and %d plot(s)", path, len(files))
    return results
