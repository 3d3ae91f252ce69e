"""The pretraining loop on accelerate (+ DeepSpeed ZeRO): data, model, accumulation, guards, checkpoints, evaluation.

:class:`Trainer` sets a run up (accelerator or DeepSpeed engine, model, locked towers, objective, data stream,
optimiser and schedule, resume) and runs it. One optimiser step consumes ``accum_steps`` micro-batches per
process, accumulated exactly (GradCache, vlp.train.gradcache) or plainly; a step with a non-finite loss or
gradient is skipped and counted (vlp.train.guards); checkpoints are written every ``checkpoint.every`` steps and
at the end (vlp.train.checkpoint), and the end of the run exports the consolidated fp32 model.
"""

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
from vlp.checkpointing import (
    TRAINER_STATE,
    dualtower_state,
    export_model,
    preset_for_training,
    resolve_resume,
    rng_state,
    run_dir_of,
    set_rng_state,
)
from vlp.config import ConfigError, PretrainConfig, save_yaml, to_dict
from vlp.distributed import barrier, broadcast_object, world_info
from vlp.eval.during_training import TrainingEvaluator
from vlp.eval.zeroshot import encode_images, evaluate_label_families
from vlp.model import DualTower, build_model, build_tokenizer, build_transforms
from vlp.preflight import check_shards_exist
from vlp.presets import preset_to_dict, save_run_preset
from vlp.ssl import monitor as _ssl_monitor  # registers the SSL objectives and auxiliary terms too
from vlp.train import contrastive as _contrastive  # noqa: F401 - registers the objective
from vlp.train.checkpoint import CheckpointManager
from vlp.train.engine import StepOutcome, TrainEngine, build_accelerator, build_engine
from vlp.train.gradcache import accumulate_step
from vlp.train.guards import FaultInjector, NonFiniteGuard, TrainingDiverged
from vlp.train.metrics import MetricsWriter, memory_metrics
from vlp.train.objective import OBJECTIVES, Objective
from vlp.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class DataSources:
    """Resolved training/evaluation data: shard specs plus zero-shot class families where known."""

    train_shards: str
    eval_shards: str | None
    class_families: dict[str, list[str]] | None = None
    templates: dict[str, list[str]] | None = None


def resolve_output_dir(cfg: PretrainConfig) -> Path:
    """The run directory: ``output_dir`` or runs/<time>-<loss or SSL objective>, identical on every rank."""
    name = cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.image_text_loss or cfg.objective}"
    return Path(broadcast_object(name))


def resolve_data(cfg: PretrainConfig, accelerator: Accelerator) -> DataSources:
    """The user's shards, or the embedded synthetic set (written once, by the main process first)."""
    if cfg.data.train_shards:
        return DataSources(cfg.data.train_shards, cfg.data.eval_shards)
    # main process first (accelerate's main_process_first is unreliable under DeepSpeed on CPU: see world_info)
    main = world_info().is_main
    synth = None
    if main:
        synth = ensure_synthetic_data(cfg.data.synthetic_dir, cfg.data.synthetic_train_samples,
                                      cfg.data.synthetic_eval_samples, seed=0)
    barrier()
    if not main:
        synth = ensure_synthetic_data(cfg.data.synthetic_dir, cfg.data.synthetic_train_samples,
                                      cfg.data.synthetic_eval_samples, seed=0)
    assert synth is not None
    return DataSources(synth.train_shards, cfg.data.eval_shards or synth.eval_shards,
                       synth.class_families, synth.templates)


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


def load_pretrained_weights(model: DualTower, path: str) -> None:
    """Initialise from ``--model.pretrained``: a .pt file ({"model": state} or a state dict), a .safetensors file,
    or a run / checkpoint directory of this project."""
    p = Path(path)
    if p.is_dir():
        from vlp.checkpointing import load_trained_model

        state = load_trained_model(p)[0].state_dict()
    elif p.suffix == ".safetensors" and p.is_file():
        from safetensors.torch import load_file

        state = load_file(str(p))
    elif p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    else:
        raise ConfigError(f"--model.pretrained {path}: no such file or directory")
    model.load_state_dict(state)


def lock_towers(model: DualTower, cfg: PretrainConfig) -> None:
    """Freeze the image and/or text tower as configured (open_clip's LiT locking), except their last groups."""
    m = cfg.model
    if m.lock_image:
        model.clip.lock_image_tower(unlocked_groups=m.lock_image_unlocked_groups)
    if m.lock_text:
        model.clip.lock_text_tower(unlocked_layers=m.lock_text_unlocked_layers)
    if m.lock_image or m.lock_text:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("locked towers (image=%s, text=%s): %d of %d parameters trainable", m.lock_image, m.lock_text,
                 trainable, total)


def slice_batch(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every entry of a collated batch (tensors, lists of tensors, lists)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t[start:stop] for t in v]
        else:
            out[k] = v[start:stop]
    return out


def concat_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of splitting a batch into micro-batches."""
    if len(batches) == 1:
        return batches[0]
    out: dict[str, Any] = {}
    for k, v in batches[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat([b[k] for b in batches])
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [torch.cat([b[k][i] for b in batches]) for i in range(len(v))]
        else:
            out[k] = [x for b in batches for x in b[k]]
    return out


class Trainer:
    """One pretraining run: ``Trainer(cfg).run()`` sets up in the constructor, trains, evaluates, returns the
    summary. Tests use the pieces (``engine``, ``next_micro_batches``, ``train_step``) directly."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.accelerator = build_accelerator(cfg)
        self.world = world = world_info()
        resume = cfg.checkpoint.resume
        if resume == "latest" and not cfg.output_dir:
            raise ConfigError("--resume latest needs --output-dir (the run directory to continue)")
        if resume and resume != "latest" and not cfg.output_dir:
            cfg.output_dir = str(run_dir_of(resolve_resume(resume, None)))  # type: ignore[arg-type]
        set_seed(cfg.train.seed)
        self.out_dir = out_dir = resolve_output_dir(cfg)
        self.resume_from = resolve_resume(resume, out_dir) if resume else None
        if resume == "latest" and self.resume_from is None:
            log.info("--resume latest: no checkpoint in %s yet, starting a fresh run", out_dir)
        self.preset = preset = preset_for_training(cfg, self.resume_from)  # a resumed run keeps its own preset
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, out_dir / "config.yaml")
            save_run_preset(preset, out_dir)  # preset.yaml: the run reloads as trained, whatever configs/ says later

        self.data = data = resolve_data(cfg, self.accelerator)
        check_shards_exist(data.train_shards)
        model = build_model(preset, cfg.loss)
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.model.pretrained:
            load_pretrained_weights(model, cfg.model.pretrained)
        lock_towers(model, cfg)
        self.model = model
        if cfg.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {cfg.objective!r}; valid: {', '.join(sorted(OBJECTIVES))}")
        self.objective: Objective = OBJECTIVES[cfg.objective](cfg, model, preset)
        exact = cfg.train.accumulation == "gradcache"
        if cfg.train.accum_steps > 1 and exact and not self.objective.supports_gradcache:
            raise ConfigError(f"exact accumulation (train.accumulation=gradcache) needs a loss over per-sample "
                              f"embeddings; objective {cfg.objective!r}{' with --aux-ssl' if cfg.aux_ssl else ''} "
                              "has none: use --train.accumulation plain, or --accum-steps 1")
        self.tokenizer = build_tokenizer(preset)
        self.eval_tf = build_transforms(preset, is_train=False)
        self.evaluator = TrainingEvaluator.from_config(cfg, data.eval_shards, data.class_families, data.templates,
                                                       self.tokenizer, self.eval_tf)
        self.monitor = _ssl_monitor.RepresentationMonitor.from_config(
            cfg, data.eval_shards, self.eval_tf, is_ssl_run=cfg.objective != "contrastive" or bool(cfg.aux_ssl)
        ) if world.is_main else None
        self.global_batch = cfg.train.batch_size * cfg.train.accum_steps * world.world_size
        self.loader = self._build_loader()
        if cfg.data.epochs is not None:  # run length in passes over the data (needs the epoch length)
            cfg.train.steps = self.loader.steps_for_epochs(cfg.data.epochs, self.global_batch)
            log.info("%g epoch(s) of %d samples = %d steps", cfg.data.epochs, self.loader.num_samples, cfg.train.steps)

        optimizer = build_optimizer(self.objective, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)  # stepped by hand: once per step
        self.engine: TrainEngine = build_engine(self.accelerator, self.objective, optimizer, cfg, world, preset)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.faults = FaultInjector()
        self.checkpoints = CheckpointManager(out_dir, cfg.checkpoint.keep, world.rank, barrier,
                                             before_commit=lambda s: self.faults.maybe_kill("sigkill-checkpoint", s))
        self.metrics = MetricsWriter(out_dir, enabled=world.is_main, report_to=cfg.train.report_to)
        self.step = 0
        self.losses: list[float] = []
        self.last_checkpoint: Path | None = None
        self._batches = None
        if self.resume_from is not None:
            self._resume(self.resume_from)
        trains = f"with {cfg.image_text_loss}/{cfg.loss.impl} loss" if cfg.image_text_loss else "(image tower only)"
        log.info("training %s (%s) %s on %d process(es) [%s], global batch %d = %d x %d micro-batch(es) x %d, "
                 "%d steps; outputs in %s", preset.name, cfg.objective, trains, world.world_size, self.engine.kind,
                 self.global_batch, cfg.train.batch_size, cfg.train.accum_steps, world.world_size, cfg.train.steps,
                 out_dir)

    # ---------------------------------------------------------------------------------------------------- data
    def _build_loader(self):
        cfg, world = self.cfg, self.world
        if cfg.train.global_stream:  # everyone reads the same stream of global batches (verification mode)
            batch, rank, size = self.global_batch, 0, 1
        else:
            batch, rank, size = cfg.train.batch_size, world.rank, world.world_size
        return build_train_loader(
            self.data.train_shards, self.objective.sample_transform, batch, seed=cfg.train.seed, rank=rank,
            world_size=size, workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer,
            caption_key=cfg.data.caption_key, require_text=self.objective.requires_text, mode=cfg.data.mode,
            weights=cfg.data.source_weights, num_samples=cfg.data.train_num_samples, metadata=cfg.data.train_metadata,
            max_consecutive_failures=cfg.data.max_consecutive_failures, timeout_s=cfg.data.loader_timeout_s)

    def next_micro_batches(self) -> list[dict[str, Any]]:
        """This process's ``accum_steps`` micro-batches for the next optimiser step."""
        if self._batches is None:
            self._batches = iter(self.loader)
        k, b = self.cfg.train.accum_steps, self.cfg.train.batch_size
        if self.cfg.train.global_stream:
            big = next(self._batches)
            lo = self.world.rank * b * k
            return [slice_batch(big, lo + i * b, lo + (i + 1) * b) for i in range(k)]
        return [next(self._batches) for _ in range(k)]

    # ---------------------------------------------------------------------------------------------------- steps
    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> tuple[float, StepOutcome, dict]:
        """Forward/backward over the micro-batches and the (possibly skipped) update; (loss, outcome, logs)."""
        result = accumulate_step(self.engine, micro_batches, self.cfg.train.accumulation,
                                 self.faults.loss_factor(step), self.faults.grad_factor(step))
        outcome = self.engine.step() if result.backward_done else StepOutcome(False, None, "nonfinite_loss")
        if not result.finite:
            outcome = StepOutcome(False, outcome.grad_norm, "nonfinite_loss")
        return float(result.loss), outcome, result.logs

    def train(self) -> None:
        """Run the remaining steps (from a resumed step onwards), checkpointing as configured."""
        cfg, world, engine = self.cfg, self.world, self.engine
        steps, g = cfg.train.steps, self.global_batch
        bar = tqdm(total=steps * g, initial=self.step * g, desc="pretrain", unit="sample", unit_scale=True,
                   disable=not world.is_main)  # samples, of a known total
        engine.wrapped.train()
        first = self.step + 1
        self._t_start = time.perf_counter()
        for step in range(first, steps + 1):
            t0 = time.perf_counter()
            micro = self.next_micro_batches()
            t_data = time.perf_counter() - t0
            if step == first and cfg.train.save_first_batch:
                torch.save(concat_batches(micro), self.out_dir / f"first_batch_rank{world.rank}.pt")
            lr = self.scheduler.get_last_lr()[0]
            loss, outcome, logs = self.train_step(micro, step)
            self.scheduler.step()
            self.step = step
            self.guard.record(step, outcome.applied, outcome.reason)
            if outcome.applied:
                self.objective.after_step(step, steps)
            dt = time.perf_counter() - t0
            self.losses.append(loss)
            record = {"loss": loss, "lr": lr, "samples_per_s": g / dt,
                      "samples_per_s_per_device": g / dt / world.world_size, "step_time_s": dt,
                      "data_time_s": t_data, "step_applied": float(outcome.applied),
                      **{k: float(v) for k, v in logs.items()}, **self.guard.metrics(),
                      **memory_metrics(self.accelerator.device)}
            if outcome.grad_norm is not None:
                record["grad_norm"] = outcome.grad_norm
            record.update(self.loader.log_metrics(with_faults=step % cfg.train.log_every == 0 or step in (1, steps)))
            self.metrics.log(step, record)
            self._periodic_evaluation(step)
            bar.update(g)
            if step % cfg.train.log_every == 0 or step == first:
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{g / dt:.0f}",
                                **({"epoch": f"{self.loader.epoch:.2f}"} if self.loader.epoch is not None else {}))
            if self.guard.diverged:
                path = self.save_checkpoint(step)
                bar.close()
                raise TrainingDiverged(self.guard.message(step, str(path)))
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                self.save_checkpoint(step)
            self.faults.maybe_kill("sigkill", step)
        bar.close()
        self.loader.close()
        self._train_time = time.perf_counter() - self._t_start
        if self.last_checkpoint is None or self._checkpoint_step != steps:
            self.save_checkpoint(steps)

    def _periodic_evaluation(self, step: int) -> None:
        due = bool(self.evaluator.every) and step % self.evaluator.every == 0
        if self.monitor is not None:
            due = due or (self.monitor.every > 0 and step % self.monitor.every == 0)
        if self.engine.evaluation_needs_collective:
            flag = torch.tensor([float(due)], device=self.accelerator.device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            due = bool(flag.item())
        if not due:
            return
        with self.engine.evaluation_model(self.model, lambda: build_model(self.preset, self.cfg.loss)) as model:
            if eval_metrics := self.evaluator.maybe_evaluate(step, model):  # all ranks; metrics on the main one
                self.metrics.log(step, eval_metrics)
            device = self.accelerator.device
            if self.monitor is not None and (rep := self.monitor.maybe_run(step, model.visual, device)):
                self.metrics.log(step, rep)  # k-NN / collapse checks of the image backbone, main process only

    # ---------------------------------------------------------------------------------------------------- state
    def save_checkpoint(self, step: int) -> Path:
        """Checkpoint the current state as step ``step`` (collective); returns its directory."""
        cfg, world = self.cfg, self.world
        data_all = None if cfg.train.global_stream else self.loader.global_state_dict()  # collective
        trainer_state = {
            "version": 1, "step": step, "samples_seen": step * self.global_batch,
            "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict(),
            "scaler": self.engine.scaler_state(), "world_size": world.world_size, "engine": self.engine.kind,
            "zero_stage": getattr(self.engine, "stage", None), "accum_steps": cfg.train.accum_steps,
            "batch_size": cfg.train.batch_size, "global_stream": cfg.train.global_stream, "data": data_all,
            "config": to_dict(cfg), "preset": preset_to_dict(self.preset),
        }
        rank_state = {"rank": world.rank, "rng": rng_state(), "data": self.loader.state_dict()}
        self.last_checkpoint = self.checkpoints.save(step, self.engine.save, rank_state, trainer_state)
        self._checkpoint_step = step
        return self.last_checkpoint

    def _resume(self, ckpt: Path) -> None:
        cfg, world = self.cfg, self.world
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
        was_ds, is_ds = state.get("engine") == "deepspeed", self.engine.kind == "deepspeed"
        if was_ds != is_ds or (is_ds and state.get("zero_stage") != getattr(self.engine, "stage", None)):
            how = f"DeepSpeed ZeRO-{state.get('zero_stage')}" if was_ds else "without DeepSpeed"
            raise ConfigError(f"--resume {ckpt}: the checkpoint was written {how}; resume with the same engine "
                              "(--deepspeed / accelerate config)")
        if is_ds and state["world_size"] != world.world_size:
            raise ConfigError(f"--resume {ckpt}: a DeepSpeed ZeRO checkpoint of {state['world_size']} processes "
                              f"cannot be loaded by {world.world_size}; resume with the same number of processes")
        if state.get("global_stream", False) != cfg.train.global_stream:
            raise ConfigError(f"--resume {ckpt}: train.global_stream was {state.get('global_stream')} in the "
                              "checkpointed run; resume with the same value")
        self.engine.load(ckpt)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.guard.load_state_dict(state["guard"])
        self.engine.load_scaler_state(state.get("scaler"))
        self.step = int(state["step"])
        self._checkpoint_step = self.step
        self.last_checkpoint = ckpt
        rank_file = ckpt / f"rank_{world.rank:05d}.pt"
        rank_state = None
        if state["world_size"] == world.world_size and rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
            self.loader.load_state_dict(rank_state["data"])
        elif state.get("data") is not None:
            self.loader.load_state_dict(state["data"])  # another layout: the data module re-plans (with a warning)
        else:
            log.warning("--resume %s: no data position for this layout; the data stream starts afresh", ckpt)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        log.info("resumed from %s at step %d (%d samples seen)", ckpt, self.step, state["samples_seen"])
        self.metrics.log(self.step, {"resumed_from_step": self.step})

    # ---------------------------------------------------------------------------------------------------- end
    def finish(self) -> dict[str, Any]:
        """Export the consolidated model, run the final evaluations, write summary.json; returns the summary."""
        cfg, world = self.cfg, self.world
        train_time = getattr(self, "_train_time", 0.0)
        done = len(self.losses)
        summary: dict[str, Any] = {
            "steps": cfg.train.steps, "world_size": world.world_size, "global_batch": self.global_batch,
            "accum_steps": cfg.train.accum_steps, "engine": self.engine.kind, "objective": cfg.objective,
            "loss": cfg.image_text_loss,
            "model": self.preset.name, "first_loss": self.losses[0] if done else None,
            "final_loss": self.losses[-1] if done else None, "train_time_s": train_time,
            "samples_per_s": self.global_batch * done / train_time if train_time > 0 else None,
            **self.guard.metrics(),
            **self.loader.log_metrics(with_faults=True),  # collective: data position and skipped data, all ranks
        }
        if self.last_checkpoint is not None:
            summary["checkpoint"] = str(self.last_checkpoint)
        final_model: DualTower = self.model
        if world.is_main:
            state = None
            if self.engine.kind == "deepspeed" and self.last_checkpoint is not None:
                from vlp.checkpointing import consolidated_state_dict

                state = dualtower_state(consolidated_state_dict(self.last_checkpoint))
                final_model = build_model(self.preset, cfg.loss).to(self.accelerator.device)
                final_model.load_state_dict(state)  # fp32, no DeepSpeed hooks: evaluable on this process alone
            if cfg.checkpoint.export:
                path = export_model(state if state is not None else self.model.state_dict(), self.out_dir)
                summary["export"] = str(path)
            if self.monitor is not None:
                final = self.monitor.last if cfg.train.steps % self.monitor.every == 0 else {}
                summary.update(final or self.monitor.run(final_model.visual, self.accelerator.device))
            if cfg.eval.zeroshot and self.objective.requires_text:  # standalone SSL trains no text tower
                summary.update(zeroshot_summary(final_model, self.data, self.tokenizer, self.eval_tf,
                                                self.accelerator.device, cfg.eval.batch_size))
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self.metrics.log(cfg.train.steps, {k: v for k, v in summary.items() if k.startswith("zeroshot/")})
        self.metrics.close()
        barrier()
        summary["output_dir"] = str(self.out_dir)
        summary["is_main"] = world.is_main
        return summary

    def run(self) -> dict[str, Any]:
        self.train()
        return self.finish()


def run_pretraining(cfg: PretrainConfig) -> dict[str, Any]:
    """Train as configured; returns the run summary (also written to summary.json).

    Raises TrainingDiverged (after checkpointing) when too many consecutive steps were non-finite.
    """
    return Trainer(cfg).run()
