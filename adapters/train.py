"""The adapter training loop on accelerate (plain, DDP or DeepSpeed ZeRO): only the projector learns.

``build_adapter`` assembles tower, LLM, projector and collator from an :class:`AdapterConfig`; ``run_adapter_training``
trains, evaluates the held-out caption loss, checkpoints the projector and optionally exports a LLaVA folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from adapters.config import AdapterConfig
from adapters.data import CaptionCollator, build_caption_loader, held_out_batches
from adapters.export import export_llava, load_projector_state, save_projector
from adapters.llm import LoadedLLM, ensure_tiny_llm, load_llm
from adapters.model import LlavaAdapter, caption_loss, caption_token_losses
from adapters.projector import build_projector, check_llava_projector
from adapters.vision import SELECT_TO_HF, FrozenVisionTower, load_vision_tower
from vlp.config import ConfigError, OptimConfig, save_yaml
from vlp.distributed import all_reduce_sum, broadcast_object, world_info
from vlp.train.metrics import MetricsWriter
from vlp.train.optim import build_scheduler

log = logging.getLogger(__name__)


@dataclass
class AdapterParts:
    """Everything a run or a test needs, built from one config."""

    model: LlavaAdapter
    tower: FrozenVisionTower
    llm: LoadedLLM
    collator: CaptionCollator


def compute_dtype(precision: str) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, dtype of the frozen parts): bf16 on GPU and fp32 on CPU for ``auto``."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on CPU")
    mp = {"fp32": "no"}.get(precision, precision)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]
    return mp, dtype


def projector_meta(cfg: AdapterConfig, parts: AdapterParts, step: int) -> dict[str, Any]:
    """What mm_projector.json records: enough to rebuild the adapter around the weights."""
    tower = parts.tower
    return {
        "projector_type": cfg.projector.type,
        "in_features": tower.hidden_size,
        "out_features": int(parts.llm.model.config.hidden_size),
        "vision_tower": tower.describe(),
        "vision_feature_layer": tower.feature_layer,
        "vision_feature_select": tower.select,
        "vision_feature_select_strategy": SELECT_TO_HF[tower.select],
        "num_image_tokens": tower.num_positions,
        "llm": parts.llm.path,
        "image_token": parts.llm.image_token,
        "image_token_id": parts.llm.image_token_id,
        "prompt": cfg.llm.prompt,
        "max_length": cfg.llm.max_length,
        "step": step,
    }


def build_adapter(cfg: AdapterConfig, frozen_dtype: torch.dtype = torch.float32) -> AdapterParts:
    """Tower + projector + LLM + collator as configured (the projector from ``projector.init`` when given)."""
    llm_path = cfg.llm.path or ensure_tiny_llm(cfg.llm.tiny_dir, seed=0)
    llm = load_llm(llm_path, cfg.llm.image_token, dtype=frozen_dtype, grad_checkpointing=cfg.llm.grad_checkpointing)
    tower = load_vision_tower(cfg.vision.tower, cfg.vision.preset, cfg.vision.feature_layer, cfg.vision.select,
                              seed=cfg.train.seed)
    tower.to(frozen_dtype)
    text_hidden = int(llm.model.config.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        projector = build_projector(cfg.projector.type, tower.hidden_size, text_hidden)
    if cfg.projector.init:
        state, meta = load_projector_state(cfg.projector.init)
        if meta.get("projector_type", cfg.projector.type) != cfg.projector.type:
            raise ConfigError(f"projector.init {cfg.projector.init} holds a {meta['projector_type']} projector but "
                              f"projector.type is {cfg.projector.type}")
        try:
            projector.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"projector.init {cfg.projector.init} does not fit a {cfg.projector.type} projector "
                              f"from width {tower.hidden_size} to {text_hidden}: {e}") from e
    model = LlavaAdapter(tower, projector, llm.model, llm.image_token_id, cfg.projector.type,
                         llm_checkpointing=cfg.llm.grad_checkpointing)
    collator = CaptionCollator(llm.tokenizer, cfg.llm.image_token, llm.image_token_id, tower.num_positions,
                               cfg.llm.prompt, cfg.llm.max_length)
    return AdapterParts(model, tower, llm, collator)


@torch.no_grad()
def held_out_loss(model: LlavaAdapter, batches: list[dict[str, torch.Tensor]], device, autocast,
                  text_only: bool = False) -> float:
    """Mean caption-token cross-entropy over the held-out pairs of every rank.

    ``text_only``: the LLM alone on the captions without the image (what the adapter has to beat to show that the
    image information reaches the LLM).
    """
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    for b in batches:
        with autocast():
            if text_only:
                labels = b["text_labels"].to(device)
                logits = model.llm(input_ids=b["text_input_ids"].to(device),
                                   attention_mask=b["text_attention_mask"].to(device), use_cache=False).logits
            else:
                labels = b["labels"].to(device)
                logits = model(b["pixel_values"].to(device), b["input_ids"].to(device),
                               b["attention_mask"].to(device))
        s, n = caption_token_losses(logits, labels)
        total, count = total + float(s), count + float(n)
    model.train(was_training)
    total, count = all_reduce_sum([total, count], device)
    return total / max(count, 1.0)


def build_accelerator(cfg: AdapterConfig, mixed_precision: str) -> Accelerator:
    """accelerate, under DeepSpeed when ``train.deepspeed`` is set or the launcher asks for it (see
    vlp.train.engine.build_accelerator: DeepSpeed on CPU needs ``cpu=False`` and DS_ACCELERATOR=cpu)."""
    from vlp.train.engine import apply_deepspeed_patches, deepspeed_from_launcher, resolve_deepspeed_config

    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision}
    if cfg.train.deepspeed or deepspeed_from_launcher():
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        apply_deepspeed_patches()
        if cfg.train.deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            path = resolve_deepspeed_config(cfg.train.deepspeed)
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=json.loads(path.read_text()))
    else:
        kwargs["cpu"] = not torch.cuda.is_available()
    return Accelerator(**kwargs)


def configure_deepspeed(accelerator: Accelerator, cfg: AdapterConfig, world_size: int, hidden_size: int) -> None:
    """Fill the ``auto`` fields of the DeepSpeed config from the adapter config and torch.distributed's world size.

    No DataLoader is prepared (the stream is a WebLoader), so accelerate cannot infer the micro batch; and under
    DeepSpeed on CPU it counts one process. Values written explicitly in the JSON are kept and checked.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    micro = cfg.train.batch_size
    plugin.deepspeed_config_process(
        must_match=False, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
        train_batch_size=micro * world_size, gradient_clipping=float(cfg.optim.grad_clip or 0.0),
        **{"zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
           "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
           "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size})
    conf = plugin.deepspeed_config
    if conf["train_micro_batch_size_per_gpu"] != micro or conf["gradient_accumulation_steps"] != 1 \
            or conf["train_batch_size"] != micro * world_size:
        raise ConfigError(f"DeepSpeed config: train_micro_batch_size_per_gpu={conf['train_micro_batch_size_per_gpu']}"
                          f", gradient_accumulation_steps={conf['gradient_accumulation_steps']}, train_batch_size="
                          f"{conf['train_batch_size']} do not fit --batch-size {micro} on {world_size} process(es) "
                          'without accumulation; set them to "auto"')
    if "optimizer" in conf or "scheduler" in conf:
        raise ConfigError("DeepSpeed config: remove its 'optimizer'/'scheduler' sections; the adapter builds AdamW "
                          "and the warmup-cosine schedule itself (--lr, --optim.warmup_ratio)")
    log.info("DeepSpeed ZeRO-%s: micro batch %d on %d process(es)", conf.get("zero_optimization", {}).get("stage", 0),
             micro, world_size)


def resolve_data(cfg: AdapterConfig, accelerator: Accelerator) -> tuple[str, str | None]:
    """(train shards, held-out shards): the user's, or the embedded synthetic set (written by rank 0 first)."""
    if cfg.data.train_shards:
        from vlp.preflight import check_shards_exist

        check_shards_exist(cfg.data.train_shards)
        return cfg.data.train_shards, cfg.data.eval_shards
    from data_pipelines.synthetic import ensure_synthetic_data

    with accelerator.main_process_first():
        synth = ensure_synthetic_data(cfg.data.synthetic_dir, cfg.data.synthetic_train_samples,
                                      cfg.data.synthetic_eval_samples, seed=0)
    return synth.train_shards, cfg.data.eval_shards or synth.eval_shards


def engine_info(model, optimizer) -> dict[str, Any]:
    """What actually trained the projector (recorded in summary.json): the wrapped model's and optimizer's types,
    and under DeepSpeed the ZeRO stage and how many fp32 master weights this rank holds (its partition)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the engine's optimizer
    info: dict[str, Any] = {"model": type(model).__name__, "optimizer": type(inner).__name__}
    if hasattr(model, "zero_optimization_stage"):
        info["zero_stage"] = int(model.zero_optimization_stage())
        groups = getattr(inner, "single_partition_of_fp32_groups", None)
        if groups is not None:  # ZeRO-1/2: this rank's slice of the flattened fp32 parameters
            info["fp32_partition_numel"] = int(sum(g.numel() for g in groups))
    return info


def run_adapter_training(cfg: AdapterConfig, parts: AdapterParts | None = None) -> dict[str, Any]:
    """Train the projector as configured; returns the run summary (also written to summary.json).

    ``parts``: an adapter already built by :func:`build_adapter` for this config (tests use it to inspect the
    frozen parts afterwards); default: built here.
    """
    if cfg.export.format == "llava":  # before anything is built: a projector HF cannot hold is refused up front
        check_llava_projector(cfg.projector.type)
    mp, frozen_dtype = compute_dtype(cfg.train.precision)
    accelerator = build_accelerator(cfg, mp)
    world = world_info()
    set_seed(cfg.train.seed)
    out_dir = Path(broadcast_object(cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-adapter"))
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")

    train_shards, eval_shards = resolve_data(cfg, accelerator)
    if parts is None:
        with accelerator.main_process_first():  # rank 0 builds the tiny LLM once
            parts = build_adapter(cfg, frozen_dtype)
    model, tower = parts.model, parts.tower
    device = accelerator.device
    transform = tower.image_transform
    log.info("tower %s (%d blocks, layer %d, %s: %d positions x %d), LLM %s (hidden %d), projector %s",
             tower.describe(), tower.num_layers, tower.feature_layer, tower.select, tower.num_positions,
             tower.hidden_size, parts.llm.path, parts.llm.model.config.hidden_size, cfg.projector.type)

    params = [p for p in model.projector.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    steps = cfg.train.steps
    warmup = math.ceil(cfg.optim.warmup_ratio * steps)
    scheduler = build_scheduler(optimizer, OptimConfig(lr=cfg.optim.lr, warmup_steps=warmup,
                                                       min_lr_ratio=cfg.optim.min_lr_ratio), max(steps, 1))
    widest = max(tower.hidden_size, int(parts.llm.model.config.hidden_size))
    configure_deepspeed(accelerator, cfg, world.world_size, widest)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: LlavaAdapter = accelerator.unwrap_model(model)

    eval_batches: list[dict[str, torch.Tensor]] = []
    if eval_shards and cfg.data.eval_samples > 0:
        eval_batches = held_out_batches(eval_shards, transform, parts.collator, cfg.data.eval_samples,
                                        cfg.train.batch_size, world.rank, world.world_size, cfg.data.caption_key)
    metrics = MetricsWriter(out_dir, enabled=world.is_main)
    global_batch = cfg.train.batch_size * world.world_size
    log.info("training the projector on %d process(es)%s, global batch %d, %d steps; outputs in %s",
             world.world_size, " under DeepSpeed" if deepspeed else "", global_batch, steps, out_dir)

    eval_curve: list[tuple[int, float]] = []

    eval_enabled = bool(eval_shards) and cfg.data.eval_samples > 0  # the same on every rank

    def evaluate(step: int) -> None:
        if eval_enabled:
            value = held_out_loss(unwrapped, eval_batches, device, accelerator.autocast)
            eval_curve.append((step, value))
            metrics.log(step, {"eval/caption_loss": value})
            log.info("step %d: held-out caption loss %.4f", step, value)

    def checkpoint(step: int) -> None:
        if world.is_main:
            save_projector(unwrapped.projector, projector_meta(cfg, parts, step), out_dir)

    text_only_loss = None
    if eval_enabled:
        text_only_loss = held_out_loss(unwrapped, eval_batches, device, accelerator.autocast, text_only=True)
        metrics.log(0, {"eval/text_only_caption_loss": text_only_loss})
        log.info("held-out caption loss of the LLM without the image: %.4f", text_only_loss)
    evaluate(0)
    losses: list[float] = []
    t_start = time.perf_counter()
    if steps > 0:
        loader = build_caption_loader(
            train_shards, transform, parts.collator, cfg.train.batch_size, seed=cfg.train.seed, rank=world.rank,
            world_size=world.world_size, workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer,
            caption_key=cfg.data.caption_key, sharding=cfg.data.sharding)
        batches = iter(loader)
        bar = tqdm(total=steps, desc="adapter", unit="step", disable=not world.is_main)
        model.train()
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with accelerator.autocast():
                logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            loss, loss_value = caption_loss(logits, batch["labels"], world.world_size)
            accelerator.backward(loss)
            grad_norm = None
            if cfg.optim.grad_clip and not deepspeed:
                grad_norm = float(accelerator.clip_grad_norm_(unwrapped.projector.parameters(), cfg.optim.grad_clip))
            lr = scheduler.get_last_lr()[0]  # the rate of this update
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses.append(loss_value)
            record = {"loss": loss_value, "lr": lr, "samples_per_s": global_batch / dt,
                      "step_time_s": dt, "caption_tokens": int(batch["labels"].ne(-100).sum())}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            metrics.log(step, record)
            bar.update(1)
            if cfg.train.log_every and (step % cfg.train.log_every == 0 or step == 1):
                bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{global_batch / dt:.0f}")
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != steps:
                evaluate(step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != steps:
                checkpoint(step)
        bar.close()
        evaluate(steps)
    train_time = time.perf_counter() - t_start
    checkpoint(steps)

    summary: dict[str, Any] = {
        "steps": steps, "world_size": world.world_size, "global_batch": global_batch,
        "engine": engine_info(model, optimizer),
        "projector": cfg.projector.type, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "train_time_s": train_time,
        "eval_caption_loss": [list(x) for x in eval_curve], "eval_text_only_caption_loss": text_only_loss,
        "projector_checkpoint": str(out_dir / "mm_projector.safetensors"),
    }
    if eval_curve and len(eval_curve) > 1 and eval_curve[0][1] > 0:
        summary["eval_loss_drop"] = 1.0 - eval_curve[-1][1] / eval_curve[0][1]
    if cfg.export.format == "llava" and world.is_main:
        llava_dir = Path(cfg.export.dir) if cfg.export.dir else out_dir / "llava"
        export_llava(tower, unwrapped.projector, cfg.projector.type, unwrapped.llm, parts.llm.tokenizer,
                     parts.llm.image_token, parts.llm.image_token_id, llava_dir)
        summary["llava_dir"] = str(llava_dir)
    if world.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    metrics.close()
    accelerator.wait_for_everyone()
    summary["output_dir"] = str(out_dir)
    summary["is_main"] = world.is_main
    return summary
