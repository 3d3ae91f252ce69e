"""What a dual-tower run evaluates: its held-out sets (zero-shot per label family, each configured labelled set,
caption retrieval) every ``--eval-every`` steps and at the end, through the same evaluator that
``scripts/eval_zeroshot.py`` uses, and the SSL representation monitor (k-NN, collapse) of the image backbone."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from vlp.distributed import world_info
from vlp.eval.during_training import heldout_sets
from vlp.eval.engine import EvalOptions, EvalSet, ZeroShotModel, evaluate, flatten_metrics
from vlp.model import ModelPreset, build_tokenizer, build_transforms
from vlp.objectives.base import RunData, RunEvaluation

log = logging.getLogger(__name__)


class DualTowerEvaluation(RunEvaluation):
    """Zero-shot/retrieval on ``sets`` every ``every`` steps and at the end (all ranks), and the representation
    monitor every ``monitor.every`` steps and at the end (main process)."""

    def __init__(self, every: int, sets: list[EvalSet], options: EvalOptions, tokenizer, transform, monitor) -> None:
        self.sets, self.options, self.tokenizer, self.transform = sets, options, tokenizer, transform
        self.every = every if sets else 0
        self.monitor = monitor
        self._monitor_step = 0
        self._last: tuple[int, dict[str, Any]] | None = None  # (step, metrics) of the latest periodic evaluation
        if every and not sets:
            log.warning(
                "eval.every=%d but there is no held-out data to evaluate (set data.eval_shards or "
                "eval.classification); periodic evaluation is off",
                every,
            )

    @classmethod
    def from_config(
        cls, cfg: Any, data: RunData, preset: ModelPreset, zeroshot: bool, ssl: bool
    ) -> DualTowerEvaluation:
        """Resolve the held-out sets once, before training (a bad set fails before the first step)."""
        from vlp.objectives.registry import section
        from vlp.ssl.monitor import RepresentationMonitor

        transform = build_transforms(preset, is_train=False)
        sets = (
            heldout_sets(cfg, data.eval_shards, data.class_families, data.templates)
            if zeroshot and cfg.eval.zeroshot
            else []
        )
        monitor = (
            RepresentationMonitor.from_config(section(cfg, "ssl.monitor"), data.eval_shards, transform, is_ssl_run=ssl)
            if world_info().is_main
            else None
        )
        options = EvalOptions(batch_size=cfg.eval.batch_size, workers=cfg.eval.workers)
        return cls(cfg.eval.every, sets, options, build_tokenizer(preset), transform, monitor)

    def due(self, step: int) -> bool:
        """Whether :meth:`evaluate` has work at ``step`` on this process."""
        if self.every and step % self.every == 0:
            return True
        return self.monitor is not None and self.monitor.every > 0 and step % self.monitor.every == 0

    def zeroshot(self, model: nn.Module) -> dict[str, Any]:
        """Every set, now (collective); flat metrics on the main process."""
        if not self.sets:
            return {}
        t0 = time.perf_counter()
        out = evaluate(ZeroShotModel.from_dual_tower(model, self.tokenizer, self.transform), self.sets, self.options)
        if out.results is None:
            return {}
        flat = flatten_metrics(out.results)
        heldout = [s for s in out.results["sources"] if s.get("name") == "heldout"] or out.results["sources"]
        flat["zeroshot/num_images"] = int(heldout[0]["num_images"])
        flat["eval_time_s"] = time.perf_counter() - t0
        return flat

    def evaluate(self, step: int, model: nn.Module, device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.every and step % self.every == 0:
            out.update(self.zeroshot(model))
            self._last = (step, dict(out))
        if self.monitor is not None and self.monitor.every > 0 and step % self.monitor.every == 0:
            out.update(self.monitor.run(model.visual, device))
            self._monitor_step = step
        return out

    def final(self, model: nn.Module, device: torch.device, step: int | None = None) -> dict[str, Any]:
        """Every set after the last step: the periodic evaluation's figures when it just ran, else a new one."""
        if self._last is not None and self._last[0] == step:
            out = dict(self._last[1])
        else:
            out = self.zeroshot(model)
        if self.monitor is not None:
            fresh = step is not None and self._monitor_step == step and self.monitor.last
            out.update(self.monitor.last if fresh else self.monitor.run(model.visual, device))
        return out
