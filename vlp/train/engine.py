"""One interface over the ways a training step can run: one process, DDP (accelerate) or DeepSpeed ZeRO 0-3.

The loop and the accumulation strategies (vlp.train.gradcache) only call :class:`TrainEngine` methods:
``forward`` (device placement, autocast or DeepSpeed's dtype), ``micro_step(last)`` (gradient synchronisation only
on the last micro-batch of an optimiser step), ``backward``, ``step`` (clipping, non-finite/overflow detection,
the optimiser update) and ``save``/``load`` of model + optimiser state. Everything DeepSpeed-specific lives here:
filling the ``auto`` fields of its config with the real world size (accelerate under DeepSpeed on CPU reports a
single process), driving the engine directly (``engine.backward``/``engine.step`` with an explicit accumulation
boundary), and two compatibility fixes for zero-dimensional parameters (the logit scale and bias).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from vlp.config import ConfigError
from vlp.distributed import WorldInfo, world_info
from vlp.objectives.base import Objective
from vlp.precision import resolve_precision
from vlp.preflight import DEEPSPEED_CONFIG_NAMES, check_deepspeed_version, resolve_deepspeed_config  # noqa: F401

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Precision and DeepSpeed configuration
# --------------------------------------------------------------------------------------------------------------


def mixed_precision(cfg: Any) -> str:
    """accelerate's mixed_precision value: bf16 on GPU and fp32 ('no') on CPU unless set explicitly.

    fp16 runs with loss scaling (accelerate's GradScaler, or DeepSpeed's dynamic loss scale). Whatever the
    precision, contrastive similarities and their loss are computed in fp32 (see ContrastiveObjective).
    """
    return resolve_precision(cfg.train.precision)[0]


def deepspeed_from_launcher() -> bool:
    """Whether `accelerate launch` was configured for DeepSpeed (distributed_type: DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(cfg: Any) -> Accelerator:
    """The Accelerator for this run: DeepSpeed when ``train.deepspeed`` is set or the launcher asks for it.

    accelerate ignores DeepSpeed when told ``cpu=True``, so on a CPU-only machine DeepSpeed runs with
    ``cpu=False`` and DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, set here when no GPU is visible).
    """
    use_ds = bool(cfg.train.deepspeed) or deepspeed_from_launcher()
    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision(cfg)}
    if use_ds:
        path = resolve_deepspeed_config(cfg.train.deepspeed) if cfg.train.deepspeed else None
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        apply_deepspeed_patches()
        if path is not None:
            from accelerate.utils import DeepSpeedPlugin

            try:
                ds_config = json.loads(path.read_text())
            except ValueError as e:
                raise ConfigError(f"DeepSpeed config {path}: not valid JSON ({e})") from None
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
        # DeepSpeed owns accumulation: its config holds the micro-batch count (never used to scale our losses)
        kwargs["gradient_accumulation_steps"] = cfg.train.accum_steps
    else:
        kwargs["cpu"] = not torch.cuda.is_available()
    return Accelerator(**kwargs)


def is_deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def fill_deepspeed_config(accelerator: Accelerator, cfg: Any, world: WorldInfo, hidden_size: int) -> dict[str, Any]:
    """Fill the ``auto`` fields of the active DeepSpeed config from the run, with torch.distributed's world size.

    Values the user wrote explicitly are kept. Returns the resulting config.
    """
    plugin = accelerator.state.deepspeed_plugin
    h = hidden_size
    micro, k = cfg.train.batch_size, cfg.train.accum_steps
    plugin.deepspeed_config_process(
        must_match=False,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=k,
        train_batch_size=micro * k * world.world_size,
        gradient_clipping=float(cfg.optim.grad_clip or 0.0),
        **{
            "zero_optimization.reduce_bucket_size": h * h,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h),
            "zero_optimization.stage3_param_persistence_threshold": 10 * h,
        },
    )
    conf = plugin.deepspeed_config
    expected = conf["train_micro_batch_size_per_gpu"] * conf["gradient_accumulation_steps"] * world.world_size
    if conf["train_batch_size"] != expected:
        raise ConfigError(
            f"DeepSpeed config: train_batch_size {conf['train_batch_size']} != micro batch "
            f"{conf['train_micro_batch_size_per_gpu']} x accumulation "
            f"{conf['gradient_accumulation_steps']} x {world.world_size} processes; set them to "
            '"auto" to take them from --batch-size and --accum-steps'
        )
    if "optimizer" in conf or "scheduler" in conf:
        raise ConfigError(
            "DeepSpeed config: remove its 'optimizer'/'scheduler' sections; vlp builds AdamW with "
            "its parameter groups and the warmup-cosine schedule itself (--lr, --warmup-steps)"
        )
    return conf


_PATCHED = False


def apply_deepspeed_patches() -> None:
    """Let DeepSpeed handle zero-dimensional parameters (open_clip's logit_scale and logit_bias), and run on CPU
    without compiling anything.

    DeepSpeed broadcasts every parameter as ``p.data.view(torch.uint8)`` when it wraps a model (and, under ZeRO-3,
    when it partitions one), which raises for 0-d tensors. The patched versions broadcast a 1-element view of the
    same storage instead; everything else is DeepSpeed's own code. Idempotent.
    """
    global _PATCHED
    if _PATCHED:
        return
    check_deepspeed_version()  # outside the tested releases the private methods below may differ: stop at start
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import partition_parameters

    original_broadcast = DeepSpeedEngine._broadcast_model

    def _broadcast_model(self) -> None:
        zero_dim = [(p, p.data) for p in self.module.parameters() if p.dim() == 0]
        for p, data in zero_dim:
            p.data = data.view(1)
        try:
            original_broadcast(self)
        finally:
            for p, data in zero_dim:
                p.data = data  # same storage: holds the broadcast value

    original_init_param = partition_parameters.Init._zero_init_param

    def _zero_init_param(self, param) -> None:
        if param.dim() != 0:
            return original_init_param(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if ds_comm.get_world_group() == group else ds_comm.get_global_rank(group, 0)
        ds_comm.broadcast(param.data.reshape(1).view(torch.uint8), src, group)
        param.partition()

    DeepSpeedEngine._broadcast_model = _broadcast_model
    partition_parameters.Init._zero_init_param = _zero_init_param
    if not torch.cuda.is_available():
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce kernel when its communication backend starts
        # (needs a C++ toolchain and AVX2/AVX-512, and faults without them); gloo's collectives do the same job.
        import importlib

        # (not `import deepspeed.comm.torch as m`: that name resolves to the torch package deepspeed.comm imports)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _PATCHED = True


# --------------------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StepOutcome:
    """What happened at an optimiser step."""

    applied: bool
    """The parameters were updated."""
    grad_norm: float | None = None
    """Global gradient norm before clipping (None where the engine does not report it)."""
    reason: str | None = None
    """Why the update was skipped: 'nonfinite_grad' or 'overflow' (fp16 loss scaling at work)."""


def frozen_parameter_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that do not train."""
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor (and list of tensors) of a batch to ``device``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients (non-finite if any element is)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


class TrainEngine:
    """Common interface (see the module docstring); build with :func:`build_engine`."""

    kind: str = "base"

    def __init__(
        self, accelerator: Accelerator, objective: Objective, wrapped: Any, optimizer: Any, grad_clip: float | None
    ) -> None:
        self.accelerator = accelerator
        self.objective = objective
        self.wrapped = wrapped
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.device = accelerator.device

    # -- forward / backward ------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], **kwargs: Any) -> Any:
        raise NotImplementedError

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; gradients are synchronised only when ``last``."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> StepOutcome:
        """Clip, check and apply the accumulated gradients (or skip them), then clear them."""
        raise NotImplementedError

    def discard_gradients(self) -> None:
        """Drop accumulated gradients without updating (a skipped step)."""
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Model + optimiser state into ``directory`` (collective: every rank calls it)."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def local_parameters(self) -> list[torch.Tensor]:
        """This process's share of the trainable parameters' values (whole tensors, or ZeRO-3 partitions)."""
        return [p.detach() for p in self.objective.parameters() if p.requires_grad]

    def scaler_state(self) -> dict[str, Any] | None:
        return None

    def describe(self) -> dict[str, Any]:
        """What actually trains (for summary.json): the wrapped model's and the optimiser's types, and under
        DeepSpeed the ZeRO stage and how many fp32 master weights this rank holds (its partition)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper -> the real one
        info: dict[str, Any] = {
            "kind": self.kind,
            "model": type(self.wrapped).__name__,
            "optimizer": type(inner).__name__,
        }
        if hasattr(self.wrapped, "zero_optimization_stage"):
            info["zero_stage"] = int(self.wrapped.zero_optimization_stage())
            groups = getattr(inner, "single_partition_of_fp32_groups", None)
            if groups is not None:  # ZeRO-1/2: this rank's slice of the flattened fp32 parameters
                info["fp32_partition_numel"] = int(sum(g.numel() for g in groups))
        return info

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        pass

    # -- evaluation --------------------------------------------------------------------------------------------
    #: whether :meth:`evaluation_model` is collective (every rank must enter it at the same steps)
    evaluation_needs_collective: bool = False

    @contextlib.contextmanager
    def evaluation_model(
        self, model: torch.nn.Module, build_plain: Callable[[], torch.nn.Module]
    ) -> Iterator[torch.nn.Module]:
        """A model to evaluate (any subset of ranks may run it): ``model`` itself where its weights are whole
        and fp32 on every rank, else an fp32 replica ``build_plain()`` loaded with the gathered weights."""
        yield model


class NativeEngine(TrainEngine):
    """One process or DDP through accelerate; fp16 uses accelerate's GradScaler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = "ddp" if self.wrapped is not self.objective else "single"

    def forward(self, batch: dict[str, Any], **kwargs: Any) -> Any:
        with self.accelerator.autocast():
            return self.wrapped(to_device(batch, self.device), **kwargs)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.objective.parameters() if p.requires_grad]

    def step(self) -> StepOutcome:
        params = self._params()
        if self.grad_clip:
            norm = self.accelerator.clip_grad_norm_(params, self.grad_clip)  # unscales fp16 gradients first
        else:
            self.accelerator.unscale_gradients()
            norm = total_norm([p.grad for p in params if p.grad is not None])
        norm_value = float(norm)
        scaler = self.accelerator.scaler
        if scaler is not None:  # fp16: the scaler skips non-finite steps and lowers its scale
            self.optimizer.step()
            skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(not skipped, norm_value, "overflow" if skipped else None)
        if not math.isfinite(norm_value):
            self.discard_gradients()
            return StepOutcome(False, norm_value, "nonfinite_grad")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(True, norm_value)

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> None:
        if world_info().is_main:  # one copy (DDP replicas are identical)
            state = self.objective.state_dict()
            if self.objective.exclude_frozen_from_checkpoints:
                frozen = frozen_parameter_names(self.objective)
                state = {k: v for k, v in state.items() if k not in frozen}
            torch.save(state, directory / "objective.pt")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "objective.pt", map_location="cpu", weights_only=True)
        if self.objective.exclude_frozen_from_checkpoints:
            missing, unexpected = self.objective.load_state_dict(state, strict=False)
            frozen = frozen_parameter_names(self.objective)
            if unexpected or set(missing) - frozen:
                raise ConfigError(
                    f"{directory}: checkpoint does not fit the objective (missing "
                    f"{sorted(set(missing) - frozen)[:3]}, unexpected {unexpected[:3]})"
                )
        else:
            self.objective.load_state_dict(state)
        opt = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt)

    def scaler_state(self) -> dict[str, Any] | None:
        return self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if state is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state)


class DeepSpeedTrainEngine(TrainEngine):
    """A DeepSpeed engine driven directly: explicit accumulation boundary, one ``engine.step()`` per update."""

    kind = "deepspeed"
    TAG = "ds"

    @property
    def engine(self):
        return self.wrapped

    @property
    def stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def forward(self, batch: dict[str, Any], **kwargs: Any) -> Any:
        batch = to_device(batch, self.device)
        dtype = (
            torch.bfloat16
            if self.engine.bfloat16_enabled()
            else (torch.float16 if self.engine.fp16_enabled() else None)
        )
        if dtype is not None:  # DeepSpeed holds 16-bit weights: feed 16-bit images (tokens stay integers)
            batch = {
                k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()
            }
        return self.engine(batch, **kwargs)

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # our losses are already the accumulated batch's

    def step(self) -> StepOutcome:
        e = self.engine
        if self.stage == 0 and not e.fp16_enabled():
            # no ZeRO optimizer (which detects non-finite norms itself): check the reduced gradients here
            grads = [p.grad for p in e.module.parameters() if p.grad is not None]
            if grads and not torch.isfinite(total_norm(grads)):
                self.discard_gradients()
                return StepOutcome(False, float("nan"), "nonfinite_grad")
        e.step()
        applied = bool(e.was_step_applied())
        norm = e.get_global_grad_norm()
        norm_value = None if norm is None else float(norm)
        reason = None if applied else ("overflow" if e.fp16_enabled() else "nonfinite_grad")
        return StepOutcome(applied, norm_value, reason)

    def discard_gradients(self) -> None:
        self.engine.zero_grad()
        if hasattr(self.engine.optimizer, "zero_grad"):
            self.engine.optimizer.zero_grad()

    def local_parameters(self) -> list[torch.Tensor]:
        params = [p for p in self.objective.parameters() if p.requires_grad]
        if self.stage == 3:
            return [p.ds_tensor.detach() for p in params]
        return [p.detach() for p in params]

    @property
    def evaluation_needs_collective(self) -> bool:  # type: ignore[override]
        return self.stage == 3

    @contextlib.contextmanager
    def evaluation_model(
        self, model: torch.nn.Module, build_plain: Callable[[], torch.nn.Module]
    ) -> Iterator[torch.nn.Module]:
        e = self.engine
        if self.stage < 3 and not (e.bfloat16_enabled() or e.fp16_enabled()):
            yield model
            return
        replica = build_plain()
        if self.stage == 3:  # partitioned weights: gather them (collective), copy, let DeepSpeed re-partition
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                replica.load_state_dict(model.state_dict())
        else:
            replica.load_state_dict(model.state_dict())
        yield replica.to(self.device)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(
            str(directory),
            tag=self.TAG,
            client_state={},
            save_latest=False,
            exclude_frozen_parameters=self.objective.exclude_frozen_from_checkpoints,
        )

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=self.TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=not self.objective.exclude_frozen_from_checkpoints,
        )
        if path is None:
            raise ConfigError(f"{directory}: DeepSpeed could not load its checkpoint (tag {self.TAG!r})")


def apply_speed_features(objective: torch.nn.Module, cfg: Any) -> None:
    """``--model.patch_dropout`` and ``--train.compile`` on the dual tower(s) the objective trains (not on copies
    made earlier, such as an EMA teacher)."""
    from vlp.model import DualTower

    patch_dropout = getattr(getattr(cfg, "model", None), "patch_dropout", 0.0)
    towers = [m for m in objective.modules() if isinstance(m, DualTower)]
    held = getattr(objective, "tower", None)  # a standalone SSL objective holds its DualTower by reference
    if isinstance(held, DualTower) and held not in towers:
        towers.append(held)
    for tower in towers:
        if patch_dropout:  # 0 leaves the tower as built (a preset may set its own)
            tower.set_patch_dropout(patch_dropout)
        if cfg.train.compile:
            tower.compile_towers()
            log.info("torch.compile: image trunk and text transformer of %s", tower.preset.name)


def build_engine(
    accelerator: Accelerator,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    cfg: Any,
    world: WorldInfo,
    hidden_size: int,
) -> TrainEngine:
    """accelerate.prepare the objective and optimiser, under DeepSpeed when the accelerator uses it."""
    apply_speed_features(objective, cfg)
    if is_deepspeed(accelerator):
        conf = fill_deepspeed_config(accelerator, cfg, world, hidden_size)
        wrapped, opt = accelerator.prepare(objective, optimizer)
        log.info(
            "DeepSpeed ZeRO stage %d, micro batch %d x %d accumulation x %d processes, bf16=%s fp16=%s",
            wrapped.zero_optimization_stage(),
            conf["train_micro_batch_size_per_gpu"],
            conf["gradient_accumulation_steps"],
            world.world_size,
            wrapped.bfloat16_enabled(),
            wrapped.fp16_enabled(),
        )
        return DeepSpeedTrainEngine(accelerator, objective, wrapped, opt, cfg.optim.grad_clip)
    wrapped, opt = accelerator.prepare(objective, optimizer)
    return NativeEngine(accelerator, objective, wrapped, opt, cfg.optim.grad_clip)
