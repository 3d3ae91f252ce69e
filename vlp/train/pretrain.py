"""The image-text pretraining loop on accelerate: data, model, loss, optimiser, logging, checkpoint, evaluation."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from data_pipelines.loader import build_eval_samples, build_train_loader
from data_pipelines.synthetic import ensure_synthetic_data
from vlp.config import ConfigError, PretrainConfig, save_yaml, to_dict
from vlp.distributed import world_info
from vlp.eval.during_training import TrainingEvaluator
from vlp.eval.zeroshot import encode_images, evaluate_label_families
from vlp.model import DualTower, build_model, build_tokenizer, build_transforms, load_preset
from vlp.ssl import monitor as _ssl_monitor  # registers the SSL objectives and auxiliary terms too
from vlp.train import contrastive as _contrastive  # noqa: F401 - registers the objective
from vlp.train.checkpoint import atomic_save, rng_state
from vlp.train.metrics import MetricsWriter
from vlp.train.objective import OBJECTIVES, to_device
from vlp.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class DataSources:
    """Resolved training/evaluation data: shard specs plus zero-shot class families where known."""

    train_shards: str
    eval_shards: str | None
    class_families: dict[str, list[str]] | None = None
    templates: dict[str, list[str]] | None = None


def mixed_precision(cfg: PretrainConfig) -> str:
    """accelerate's mixed_precision value: bf16 on GPU and fp32 ('no') on CPU unless set explicitly."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if p in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"train.precision={p} needs a GPU; use fp32 (or auto) on CPU")
    return {"fp32": "no"}.get(p, p)


def _broadcast_str(value: str) -> str:
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def resolve_output_dir(cfg: PretrainConfig) -> Path:
    """The run directory: ``output_dir`` or runs/<time>-<loss>, identical on every rank."""
    name = cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.loss.name}"
    return Path(_broadcast_str(name))


def resolve_data(cfg: PretrainConfig, accelerator: Accelerator) -> DataSources:
    """The user's shards, or the embedded synthetic set (written once, by the main process first)."""
    if cfg.data.train_shards:
        return DataSources(cfg.data.train_shards, cfg.data.eval_shards)
    with accelerator.main_process_first():
        synth = ensure_synthetic_data(cfg.data.synthetic_dir, cfg.data.synthetic_train_samples,
                                      cfg.data.synthetic_eval_samples, seed=0)
    return DataSources(synth.train_shards, cfg.data.eval_shards or synth.eval_shards,
                       synth.class_families, synth.templates)


def check_shards_exist(spec: str) -> None:
    """Fail early, with the path, when local shards named by ``spec`` do not exist."""
    import braceexpand

    for source in spec.split("::"):
        paths = list(braceexpand.braceexpand(source))
        local = [p for p in paths if "://" not in p and not p.startswith("pipe:")]
        missing = [p for p in local if not Path(p).is_file()]
        if local and len(missing) == len(local):
            raise ConfigError(f"no shards found for {source!r} (first missing: {missing[0]}); "
                              "pass --train-shards with existing .tar files, e.g. /data/shard-{000000..000009}.tar")
        if missing:
            log.warning("%d of %d shards of %s are missing (first: %s)", len(missing), len(local), source, missing[0])


@torch.no_grad()
def zeroshot_summary(model: DualTower, data: DataSources, tokenizer, transform, device, batch_size: int
                     ) -> dict[str, float]:
    """Held-out zero-shot top-1/top-5 per class family (needs labelled eval shards with class families)."""
    if not data.eval_shards or not data.class_families:
        return {}
    images, labels = [], []
    for s in build_eval_samples(data.eval_shards):
        if s["json"] is not None:
            images.append(transform(s["image"]))
            labels.append(s["json"])
    was_training = model.training
    model.eval()
    feats = encode_images(model.encode_image, images, device, batch_size)
    res = evaluate_label_families(feats, labels, data.class_families, data.templates, model.encode_text,
                                  tokenizer, device)
    model.train(was_training)
    res["zeroshot/num_images"] = len(images)
    return res


def run_pretraining(cfg: PretrainConfig) -> dict[str, Any]:
    """Train a dual tower as configured; returns the run summary (also written to summary.json)."""
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), cpu=not torch.cuda.is_available())
    world = world_info()
    set_seed(cfg.train.seed)
    out_dir = resolve_output_dir(cfg)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")

    preset = load_preset(cfg.model.name)
    data = resolve_data(cfg, accelerator)
    check_shards_exist(data.train_shards)
    model = build_model(preset, cfg.loss)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.model.pretrained:
        state = torch.load(cfg.model.pretrained, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {cfg.objective!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    objective = OBJECTIVES[cfg.objective](cfg, model, preset)
    tokenizer = build_tokenizer(preset)
    eval_tf = build_transforms(preset, is_train=False)
    evaluator = TrainingEvaluator.from_config(cfg, data.eval_shards, data.class_families, data.templates,
                                              tokenizer, eval_tf)
    monitor = _ssl_monitor.RepresentationMonitor.from_config(
        cfg, data.eval_shards, eval_tf, is_ssl_run=cfg.objective != "contrastive" or bool(cfg.aux_ssl)
    ) if world.is_main else None
    loader = build_train_loader(
        data.train_shards, objective.sample_transform, cfg.train.batch_size, seed=cfg.train.seed, rank=world.rank,
        world_size=world.world_size, workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer,
        caption_key=cfg.data.caption_key, require_text=objective.requires_text, mode=cfg.data.mode,
        weights=cfg.data.source_weights, num_samples=cfg.data.train_num_samples, metadata=cfg.data.train_metadata,
        max_consecutive_failures=cfg.data.max_consecutive_failures, timeout_s=cfg.data.loader_timeout_s)
    if cfg.data.epochs is not None:  # run length in passes over the data (needs the epoch length)
        cfg.train.steps = loader.steps_for_epochs(cfg.data.epochs, cfg.train.batch_size * world.world_size)
        log.info("%g epoch(s) of %d samples = %d steps", cfg.data.epochs, loader.num_samples, cfg.train.steps)

    optimizer = build_optimizer(objective, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)  # stepped by hand: once per update
    wrapped, optimizer = accelerator.prepare(objective, optimizer)
    metrics = MetricsWriter(out_dir, enabled=world.is_main)
    global_batch = cfg.train.batch_size * world.world_size
    log.info("training %s with %s/%s loss on %d process(es), global batch %d, %d steps; outputs in %s",
             preset.name, cfg.loss.name, cfg.loss.impl, world.world_size, global_batch, cfg.train.steps, out_dir)

    batches = iter(loader)
    bar = tqdm(total=cfg.train.steps * global_batch, desc="pretrain", unit="sample", unit_scale=True,
               disable=not world.is_main)  # samples, of a known total
    wrapped.train()
    t_start = time.perf_counter()
    losses = []
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        if step == 1 and cfg.train.save_first_batch:
            torch.save(batch, out_dir / f"first_batch_rank{world.rank}.pt")
        with accelerator.autocast():
            loss, logs = wrapped(to_device(batch, accelerator.device))
        accelerator.backward(loss)
        grad_norm = None
        if cfg.optim.grad_clip:
            grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(step, cfg.train.steps)
        dt = time.perf_counter() - t0
        loss_value = loss.item()
        losses.append(loss_value)
        record = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "samples_per_s": global_batch / dt,
                  "step_time_s": dt, **{k: float(v) for k, v in logs.items()}}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record.update(loader.log_metrics(with_faults=step % cfg.train.log_every == 0 or step in (1, cfg.train.steps)))
        metrics.log(step, record)
        if eval_metrics := evaluator.maybe_evaluate(step, model):  # all ranks; metrics on the main one
            metrics.log(step, eval_metrics)
        if monitor is not None and (rep := monitor.maybe_run(step, model.visual, accelerator.device)):
            metrics.log(step, rep)  # k-NN / collapse checks of the image backbone, main process only
        bar.update(global_batch)
        if step % cfg.train.log_every == 0 or step == 1:
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{global_batch / dt:.0f}",
                            **({"epoch": f"{loader.epoch:.2f}"} if loader.epoch is not None else {}))
    bar.close()
    loader.close()
    train_time = time.perf_counter() - t_start

    summary: dict[str, Any] = {
        "steps": cfg.train.steps, "world_size": world.world_size, "global_batch": global_batch,
        "loss": cfg.loss.name, "model": preset.name, "first_loss": losses[0], "final_loss": losses[-1],
        "train_time_s": train_time, "samples_per_s": global_batch * cfg.train.steps / train_time,
        **loader.log_metrics(with_faults=True),  # collective: data position and skipped data, all ranks
    }
    if world.is_main:
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "step": cfg.train.steps, "rng": rng_state(),
                     "config": to_dict(cfg)}, out_dir / "checkpoint.pt")
        if monitor is not None:
            final = monitor.last if cfg.train.steps % monitor.every == 0 else {}
            summary.update(final or monitor.run(model.visual, accelerator.device))
        if cfg.eval.zeroshot and objective.requires_text:  # standalone SSL trains no text tower
            summary.update(zeroshot_summary(model, data, tokenizer, eval_tf, accelerator.device,
                                            cfg.eval.batch_size))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics.log(cfg.train.steps, {k: v for k, v in summary.items() if k.startswith("zeroshot/")})
    metrics.close()
    accelerator.wait_for_everyone()
    summary["output_dir"] = str(out_dir)
    summary["is_main"] = world.is_main
    return summary
