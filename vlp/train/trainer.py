"""The one training engine: every registered objective (image-text, SSL, the LLaVA projector) runs here.

:class:`Trainer` sets a run up (accelerator or DeepSpeed engine, the objective looked up by name in
:mod:`vlp.objectives`, data stream, optimiser and schedule, resume) and runs it. One optimiser step consumes
``accum_steps`` micro-batches per process, accumulated exactly (GradCache, vlp.train.gradcache) or plainly; a step
with a non-finite loss or gradient is skipped and counted (vlp.train.guards); checkpoints are written every
``checkpoint.every`` steps and at the end (vlp.train.checkpoint). The objective says what to evaluate (every
``--eval-every`` steps and at the end, through one evaluator) and what to export at the end.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from data_pipelines.loader import build_train_loader
from data_pipelines.synthetic import synthetic_data_for
from vlp.checkpointing import (
    TRAINER_STATE,
    consolidated_state_dict,
    preset_for_training,
    resolve_resume,
    rng_state,
    run_dir_of,
    set_rng_state,
)
from vlp.config import ConfigError, save_yaml, to_dict
from vlp.distributed import barrier, broadcast_object, world_info
from vlp.objectives import registry
from vlp.objectives.base import Objective, RunData, RunEvaluation
from vlp.preflight import check_shards_exist
from vlp.presets import preset_to_dict, save_run_preset
from vlp.train.checkpoint import CheckpointManager
from vlp.train.engine import StepOutcome, TrainEngine, build_accelerator, build_engine
from vlp.train.gradcache import accumulate_step
from vlp.train.guards import FaultInjector, NonFiniteGuard, TrainingDiverged
from vlp.train.metrics import MetricsWriter, memory_metrics
from vlp.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def resolve_output_dir(cfg: Any) -> Path:
    """The run directory: ``output_dir`` or runs/<time>-<objective>, identical on every rank."""
    out = cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{registry.resolve(cfg).name}"
    return Path(broadcast_object(out))


def check_resume_config(ckpt: Path, cfg: Any, objective: str) -> None:
    """Refuse, before config.yaml is rewritten, to resume a checkpoint of another objective, loss, LLM or tower:
    the state would not fit (or, worse, would load into the wrong frozen model)."""
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    saved = state.get("config") or {}
    was = state.get("objective")
    if was is not None and was != objective:
        raise ConfigError(
            f"--resume {ckpt}: the checkpoint trained objective {was!r}, this run {objective!r}; "
            f"resume with the run's own options (e.g. --config {run_dir_of(ckpt) / 'config.yaml'})"
        )
    for section, key in (
        ("loss", "name"),
        ("llm", "path"),
        ("vision", "tower"),
        ("vision", "preset"),
        ("projector", "type"),
    ):
        if section in saved and hasattr(cfg, section):
            old, new = saved[section].get(key), getattr(getattr(cfg, section), key)
            if old != new:
                raise ConfigError(
                    f"--resume {ckpt}: the checkpoint was trained with {section}.{key}={old!r}, this "
                    f"run has {new!r}; resume with the same value (or --config "
                    f"{run_dir_of(ckpt) / 'config.yaml'})"
                )


def resolve_data(cfg: Any) -> RunData:
    """The user's shards, or the embedded synthetic set (written once, by the main process first)."""
    if cfg.data.train_shards:
        return RunData(cfg.data.train_shards, cfg.data.eval_shards)
    # main process first (accelerate's main_process_first is unreliable under DeepSpeed on CPU: see world_info)
    main = world_info().is_main
    synth = None
    if main:
        synth = synthetic_data_for(cfg.data)
    barrier()
    if not main:
        synth = synthetic_data_for(cfg.data)
    assert synth is not None
    return RunData(synth.train_shards, cfg.data.eval_shards or synth.eval_shards, synth.class_families, synth.templates)


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


def check_lr_groups(ckpt: Path, saved: list[float], current: list[float]) -> None:
    """Refuse to resume when the optimiser's learning-rate groups (their multiples of the first group's rate, e.g.
    SigLIP's bias at ``--loss.bias_lr_scale`` x lr) differ from the checkpoint's: loading would keep the
    checkpoint's rates whatever the command line says."""

    def ratio(lrs: list[float]) -> list[float]:
        return [round(lr / lrs[0], 6) for lr in lrs]

    if len(saved) != len(current) or ratio(saved) != ratio(current):
        raise ConfigError(
            f"--resume {ckpt}: the checkpoint's optimiser groups run at {ratio(saved)} x lr, this run's at "
            f"{ratio(current)} x lr; resume with the checkpoint's --loss.bias_lr_scale and "
            "--loss.temperature_lr_scale (1 for runs written before the options existed, 2026-12-05)"
        )


class Trainer:
    """One training run of any registered objective: ``Trainer(cfg).run()`` sets up in the constructor, trains,
    evaluates, exports and returns the summary. Tests use the pieces (``engine``, ``next_micro_batches``,
    ``train_step``) directly.

    ``cfg`` is a run config: :class:`vlp.config.PretrainConfig` (with the registered objectives' sections) or
    another config with the same common sections (``data``, ``optim``, ``train``, ``checkpoint``, ``objective``,
    ``output_dir``), such as :class:`adapters.config.AdapterConfig`.
    """

    def __init__(self, cfg: Any, objective: Objective | None = None) -> None:
        """``objective``: one already built for ``cfg`` (tests inspect its parts afterwards); default: built from
        the registry by name."""
        self.cfg = cfg
        self.spec = spec = registry.resolve(cfg)
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
        if self.resume_from is not None:
            check_resume_config(self.resume_from, cfg, spec.name)
        if resume == "latest" and self.resume_from is None:
            log.info("--resume latest: no checkpoint in %s yet, starting a fresh run", out_dir)
        # the dual tower's preset (a resumed run keeps its own), for objectives whose builder takes one
        takes_preset = "preset" in inspect.signature(spec.build).parameters
        self.preset = preset = preset_for_training(cfg, self.resume_from) if takes_preset else None
        self.global_batch = cfg.train.batch_size * cfg.train.accum_steps * world.world_size
        loss_cfg = getattr(cfg, "loss", None)
        if loss_cfg is not None and (loss_cfg.bias_is_auto or loss_cfg.scale_is_auto):
            loss_cfg.resolve_auto(self.global_batch)
            log.info(
                "loss auto priors for the global batch of %d: init_logit_scale %.4f (t = %.3f), init_logit_bias %s",
                self.global_batch,
                loss_cfg.resolved_init_logit_scale,
                math.exp(loss_cfg.resolved_init_logit_scale),
                loss_cfg.resolved_init_logit_bias,
            )
        if loss_cfg is not None and getattr(cfg, "image_text_loss", None):
            loss_cfg.resolve_lr_scales()  # config.yaml records the multipliers the run trains at
        if cfg.optim.lr is None:  # the objective's default rate, recorded in config.yaml
            cfg.optim.lr = registry.default_lr(spec)
            log.info("learning rate: %g (%s's default; --lr sets another)", cfg.optim.lr, spec.name)
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, out_dir / "config.yaml")
            if preset is not None:  # preset.yaml: the run reloads as trained, whatever configs/ says later
                save_run_preset(preset, out_dir)

        self.data = data = resolve_data(cfg)
        check_shards_exist(data.train_shards)
        if objective is None:
            objective = spec.build(cfg, world, preset=preset) if preset is not None else spec.build(cfg, world)
        self.objective: Objective = objective
        exact = cfg.train.accumulation == "gradcache"
        if cfg.train.accum_steps > 1 and exact and not self.objective.supports_gradcache:
            aux = " with --aux-ssl" if getattr(cfg, "aux_ssl", None) else ""
            raise ConfigError(
                f"exact accumulation (train.accumulation=gradcache) needs a loss over per-sample "
                f"embeddings; objective {spec.name!r}{aux} has none: use --train.accumulation plain, "
                "or --accum-steps 1"
            )
        self.evaluation = self.objective.evaluation(cfg, data)
        self.loader = self._build_loader()
        if cfg.data.epochs is not None:  # run length in passes over the data (needs the epoch length)
            cfg.train.steps = self.loader.steps_for_epochs(cfg.data.epochs, self.global_batch)
            log.info("%g epoch(s) of %d samples = %d steps", cfg.data.epochs, self.loader.num_samples, cfg.train.steps)

        self._batches = None
        self._pending: list[dict[str, Any]] | None = None  # micro-batches drawn before the first step
        self._init_stats: dict[str, float] = {}
        if self.resume_from is None and self.objective.wants_data_init():
            self._init_from_data()
        optimizer = build_optimizer(self.objective, cfg.optim, self.objective.lr_scales())
        self.scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)  # stepped by hand: once per step
        self.engine: TrainEngine = build_engine(
            self.accelerator, self.objective, optimizer, cfg, world, self.objective.hidden_size()
        )
        if getattr(self.engine, "stage", None) == 3 and not self.objective.supports_zero3:
            raise ConfigError(
                f"objective {spec.name!r} does not support DeepSpeed ZeRO-3; use ZeRO-0/1/2 "
                "(--deepspeed zero2 or configs/accelerate/zero2.yaml)"
            )
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.faults = FaultInjector()
        self.checkpoints = CheckpointManager(
            out_dir,
            cfg.checkpoint.keep,
            world.rank,
            barrier,
            before_commit=lambda s: self.faults.maybe_kill("sigkill-checkpoint", s),
        )
        self.metrics = MetricsWriter(out_dir, enabled=world.is_main, report_to=cfg.train.report_to)
        self.step = 0
        self.losses: list[float] = []
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None
        self._train_time = 0.0
        if self._init_stats:
            self.metrics.log(0, self._init_stats)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        log.info(
            "training %s on %d process(es) [%s], global batch %d = %d x %d micro-batch(es) x %d, "
            "%d steps; outputs in %s",
            self.objective.describe(),
            world.world_size,
            self.engine.kind,
            self.global_batch,
            cfg.train.batch_size,
            cfg.train.accum_steps,
            world.world_size,
            cfg.train.steps,
            out_dir,
        )

    # ---------------------------------------------------------------------------------------------------- data
    def _build_loader(self):
        cfg, world = self.cfg, self.world
        if cfg.train.global_stream:  # everyone reads the same stream of global batches (verification mode)
            batch, rank, size = self.global_batch, 0, 1
        else:
            batch, rank, size = cfg.train.batch_size, world.rank, world.world_size
        return build_train_loader(
            self.data.train_shards,
            self.objective.sample_transform,
            batch,
            collate_fn=self.objective.collate,
            seed=cfg.train.seed,
            rank=rank,
            world_size=size,
            workers=cfg.data.workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            caption_key=cfg.data.caption_key,
            require_text=self.objective.requires_text,
            mode=cfg.data.mode,
            weights=cfg.data.source_weights,
            num_samples=cfg.data.train_num_samples,
            metadata=cfg.data.train_metadata,
            max_consecutive_failures=cfg.data.max_consecutive_failures,
            timeout_s=cfg.data.loader_timeout_s,
        )

    def _init_from_data(self) -> None:
        """The objective's data-dependent initialisation on the first step's batch (which that step still trains
        on), before the engine wraps the weights."""
        self._pending = self.next_micro_batches()
        if self.accelerator.device.type != "cpu":  # the engine moves it there anyway; the forward is faster there
            self.objective.to(self.accelerator.device)
        stats = self.objective.init_from_data(concat_batches(self._pending))
        if stats:
            log.info("initialised from the first batch: %s", ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        self._init_stats = stats

    def next_micro_batches(self) -> list[dict[str, Any]]:
        """This process's ``accum_steps`` micro-batches for the next optimiser step."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
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
        result = accumulate_step(
            self.engine,
            micro_batches,
            self.cfg.train.accumulation,
            self.faults.loss_factor(step),
            self.faults.grad_factor(step),
        )
        outcome = self.engine.step() if result.backward_done else StepOutcome(False, None, "nonfinite_loss")
        if not result.finite:
            outcome = StepOutcome(False, outcome.grad_norm, "nonfinite_loss")
        key = self.objective.reported_loss_key  # e.g. a global mean the backpropagated loss is a scaled share of
        loss = result.logs[key] if key and key in result.logs and result.finite else result.loss
        return float(loss), outcome, result.logs

    def train(self) -> None:
        """Run the remaining steps (from a resumed step onwards), checkpointing as configured."""
        cfg, world, engine = self.cfg, self.world, self.engine
        steps, g = cfg.train.steps, self.global_batch
        ev = self.evaluation
        if self.step == 0 and ev is not None and type(ev).begin is not RunEvaluation.begin:  # e.g. a baseline
            with self.engine.evaluation_model(self.objective.eval_module(), self.objective.build_plain) as module:
                if metrics := self.evaluation.begin(module, self.accelerator.device):
                    self.metrics.log(0, metrics)
        desc = "adapter" if self.spec.kind == "adapter" else "pretrain"
        bar = tqdm(
            total=steps * g, initial=self.step * g, desc=desc, unit="sample", unit_scale=True, disable=not world.is_main
        )  # samples, of a known total
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
            record = {
                "loss": loss,
                "lr": lr,
                "samples_per_s": g / dt,
                "samples_per_s_per_device": g / dt / world.world_size,
                "step_time_s": dt,
                "data_time_s": t_data,
                "step_applied": float(outcome.applied),
                **{k: float(v) for k, v in logs.items()},
                **self.guard.metrics(),
                **memory_metrics(self.accelerator.device),
            }
            if outcome.grad_norm is not None:
                record["grad_norm"] = outcome.grad_norm
            every = cfg.train.log_every
            periodic = bool(every) and step % every == 0
            record.update(self.loader.log_metrics(with_faults=periodic or step in (1, steps)))
            self.metrics.log(step, record)
            self._periodic_evaluation(step)
            bar.update(g)
            if periodic or step == first:
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    samples_s=f"{g / dt:.0f}",
                    **({"epoch": f"{self.loader.epoch:.2f}"} if self.loader.epoch is not None else {}),
                )
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

    def _due_everywhere(self, due: bool) -> bool:
        """``due`` on any rank, where evaluation is collective under this engine (ZeRO-3 gathers weights)."""
        if self.engine.evaluation_needs_collective and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(due)], device=self.accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            due = bool(flag.item())
        return due

    def _periodic_evaluation(self, step: int) -> None:
        ev = self.evaluation
        if ev is None or not self._due_everywhere(ev.due(step)):
            return
        with self.engine.evaluation_model(self.objective.eval_module(), self.objective.build_plain) as module:
            if metrics := ev.evaluate(step, module, self.accelerator.device):  # metrics on the main process
                self.metrics.log(step, metrics)

    # ---------------------------------------------------------------------------------------------------- state
    def save_checkpoint(self, step: int) -> Path:
        """Checkpoint the current state as step ``step`` (collective); returns its directory."""
        cfg, world = self.cfg, self.world
        data_all = None if cfg.train.global_stream else self.loader.global_state_dict()  # collective
        trainer_state = {
            "version": 1,
            "step": step,
            "objective": self.spec.name,
            "samples_seen": step * self.global_batch,
            "scheduler": self.scheduler.state_dict(),
            "guard": self.guard.state_dict(),
            "scaler": self.engine.scaler_state(),
            "world_size": world.world_size,
            "engine": self.engine.kind,
            "zero_stage": getattr(self.engine, "stage", None),
            "accum_steps": cfg.train.accum_steps,
            "batch_size": cfg.train.batch_size,
            "global_stream": cfg.train.global_stream,
            "data": data_all,
            "config": to_dict(cfg),
            "preset": preset_to_dict(self.preset) if self.preset is not None else None,
        }
        if self.evaluation is not None:
            trainer_state["evaluation"] = self.evaluation.state_dict()
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
            raise ConfigError(
                f"--resume {ckpt}: the checkpoint was written {how}; resume with the same engine "
                "(--deepspeed / accelerate config)"
            )
        if is_ds and state["world_size"] != world.world_size:
            raise ConfigError(
                f"--resume {ckpt}: a DeepSpeed ZeRO checkpoint of {state['world_size']} processes "
                f"cannot be loaded by {world.world_size}; resume with the same number of processes"
            )
        if state.get("global_stream", False) != cfg.train.global_stream:
            raise ConfigError(
                f"--resume {ckpt}: train.global_stream was {state.get('global_stream')} in the "
                "checkpointed run; resume with the same value"
            )
        check_lr_groups(ckpt, state["scheduler"]["base_lrs"], self.scheduler.base_lrs)
        self.engine.load(ckpt)
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.guard.load_state_dict(state["guard"])
        if self.evaluation is not None and state.get("evaluation"):
            self.evaluation.load_state_dict(state["evaluation"])
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
        """Export, run the end-of-run evaluation, write summary.json; returns the summary."""
        cfg, world = self.cfg, self.world
        train_time = self._train_time
        done = len(self.losses)
        summary: dict[str, Any] = {
            "steps": cfg.train.steps,
            "world_size": world.world_size,
            "global_batch": self.global_batch,
            "accum_steps": cfg.train.accum_steps,
            "engine": self.engine.kind,
            "objective": cfg.objective,
            "loss": cfg.image_text_loss if hasattr(cfg, "image_text_loss") else None,
            "first_loss": self.losses[0] if done else None,
            "final_loss": self.losses[-1] if done else None,
            "train_time_s": train_time,
            "samples_per_s": self.global_batch * done / train_time if train_time > 0 else None,
            **self.guard.metrics(),
            **self.loader.log_metrics(with_faults=True),  # collective: data position and skipped data, all ranks
        }
        summary["engine_info"] = self.engine.describe()
        if self.last_checkpoint is not None:
            summary["checkpoint"] = str(self.last_checkpoint)
        if self.evaluation is not None:  # every rank: the evaluation may be collective
            with self.engine.evaluation_model(self.objective.eval_module(), self.objective.build_plain) as module:
                final = self.evaluation.final(module, self.accelerator.device, step=cfg.train.steps)
            summary.update(final)  # summary.json; metrics.jsonl holds the periodic evaluations
        if world.is_main:
            if self.engine.kind == "deepspeed" and self.last_checkpoint is not None:
                state = consolidated_state_dict(self.last_checkpoint)  # fp32 master weights, merged from the shards
            else:
                state = {k: v.detach() for k, v in self.objective.state_dict().items()}
            summary.update(self.objective.export(self.out_dir, state, summary))
            summary.update(self.objective.summary())
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.metrics.close()
        barrier()
        summary["output_dir"] = str(self.out_dir)
        summary["is_main"] = world.is_main
        return summary

    def run(self) -> dict[str, Any]:
        self.train()
        return self.finish()


def run_training(cfg: Any, objective: Objective | None = None) -> dict[str, Any]:
    """Train as configured (``objective``: one already built for ``cfg``); returns the run summary (also written
    to summary.json).

    Raises TrainingDiverged (after checkpointing) when too many consecutive steps were non-finite.
    """
    return Trainer(cfg, objective).run()


run_pretraining = run_training
