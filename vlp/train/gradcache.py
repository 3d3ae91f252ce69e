"""One optimiser step over k micro-batches: exact accumulation for contrastive losses (GradCache), or plain.

A contrastive loss couples every sample of a batch to every other, so summing the losses of k micro-batches
(plain accumulation, what a generic trainer does) is a different objective with k times fewer negatives. The
GradCache method (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup")
gets the exact large-batch gradient with the memory of one micro-batch:

1. embed every micro-batch without an autograd graph (remembering each one's RNG state);
2. evaluate the loss once over the whole accumulated batch (across ranks, with the chunked loss if configured)
   and take its gradient with respect to the embeddings and the shared scalars (logit scale and bias);
3. re-run each micro-batch with a graph, replaying its RNG state so dropout and other forward-time randomness
   repeat exactly, and back-propagate the cached embedding gradients through it: ``sum(emb_i * g_i)`` is a
   surrogate whose parameter gradient is exactly the micro-batch's share of dL/dparams.

The gradients of the logit scale and bias (which every micro-batch shares) enter once, on the last micro-batch,
as ``t * dL/dt + b * dL/db``; the other micro-batches carry them with a zero weight so that every backward
touches the same parameters. Every backward goes through the engine (DDP synchronises only on the last
micro-batch; DeepSpeed ZeRO reduces and partitions gradients in its hooks and sees one accumulation boundary).
Micro-batches stay where the loader put them (host memory) and are moved to the device one at a time.

:func:`plain_step` is the reference path (k independent micro-batch losses, averaged), also used for objectives
whose loss does not split into per-sample embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from vlp.train.engine import StepOutcome, TrainEngine


@dataclass
class StepResult:
    """The outcome of one optimiser step's forward/backward work."""

    loss: torch.Tensor
    """Detached loss of the step's (accumulated, global) batch."""
    logs: dict[str, Any] = field(default_factory=dict)
    finite: bool = True
    """False when the loss was non-finite on some rank (the step is then skipped)."""
    backward_done: bool = True
    """Gradients were accumulated (then ``engine.step()`` must run, and discards them when poisoned)."""
    outcome: StepOutcome | None = None
    """Set by the caller after ``engine.step()``."""


class RandomState:
    """The torch RNG state (CPU and the current CUDA device) at construction, replayable later."""

    def __init__(self, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the captured state; the RNG continues afterwards as if the block never ran."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(s, d)
            yield


def all_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank (a collective when torch.distributed is initialised)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def plain_step(
    engine: TrainEngine, micro_batches: list[dict[str, Any]], loss_factor: float = 1.0, grad_factor: float = 1.0
) -> StepResult:
    """Forward/backward of each micro-batch's own loss, scaled by 1/k (exact only for k = 1).

    ``loss_factor``/``grad_factor`` exist for fault-injection tests (NaN makes the loss / the gradients
    non-finite). With k = 1 a non-finite loss is caught before backward; with k > 1 the gradients of the step
    are poisoned instead, so that the engine's own non-finite handling discards everything accumulated.
    """
    k = len(micro_batches)
    losses, logs = [], {}
    finite = True
    for i, batch in enumerate(micro_batches):
        with engine.micro_step(last=i == k - 1):
            loss, logs = engine.forward(batch)
            loss = loss * loss_factor
            ok = all_finite(loss)
            if not ok and k == 1:
                return StepResult(loss.detach(), logs, finite=False, backward_done=False)
            finite = finite and ok
            scale = grad_factor / k if finite else float("nan")
            engine.backward(loss * scale)
        losses.append(loss.detach())
    return StepResult(torch.stack(losses).mean(), logs, finite=finite)


def gradcache_step(
    engine: TrainEngine, micro_batches: list[dict[str, Any]], loss_factor: float = 1.0, grad_factor: float = 1.0
) -> StepResult:
    """Exact accumulation (module docstring): one loss and one embedding gradient over all micro-batches."""
    objective = engine.objective
    frozen = objective.frozen_outputs()
    shared = objective.shared_keys
    states: list[RandomState] = []
    cached: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(RandomState(engine.device))
            emb = engine.forward(batch, mode="embed")
            cached.append({key: v.detach() for key, v in emb.items()})
    keys = list(cached[0])
    per_sample = [key for key in keys if key not in shared]
    sizes = [cached[i][per_sample[0]].shape[0] for i in range(len(cached))]
    leaves: dict[str, torch.Tensor] = {}
    for key in keys:
        value = torch.cat([c[key] for c in cached]) if key in per_sample else cached[0][key].clone()
        leaves[key] = value.float().requires_grad_(key not in frozen)
    with torch.enable_grad():
        loss, logs = objective.loss_from_embeddings(leaves)
        loss = loss * loss_factor
    if not all_finite(loss):
        return StepResult(loss.detach(), logs, finite=False, backward_done=False)
    wrt = [key for key in keys if leaves[key].requires_grad]
    grads = dict(zip(wrt, torch.autograd.grad(loss, [leaves[key] for key in wrt], allow_unused=True)))
    del leaves
    start = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        rows = slice(start, start + sizes[i])
        start += sizes[i]
        reuse = {key: cached[i][key] for key in frozen if key in cached[i]}
        with engine.micro_step(last):
            with states[i].replay():
                emb = engine.forward(batch, mode="embed", reuse=reuse or None)
            terms = []
            for key in per_sample:
                g = grads.get(key)
                if g is not None and key not in reuse and emb[key].requires_grad:
                    terms.append((emb[key].float() * g[rows]).sum())
            for key in shared:
                g = grads.get(key)
                if g is not None and key in emb and emb[key].requires_grad:
                    terms.append((emb[key].float() * g).sum() * (1.0 if last else 0.0))
            if terms:
                engine.backward(torch.stack(terms).sum() * grad_factor)
    return StepResult(loss.detach(), logs, finite=True)


def accumulate_step(
    engine: TrainEngine,
    micro_batches: list[dict[str, Any]],
    method: str,
    loss_factor: float = 1.0,
    grad_factor: float = 1.0,
) -> StepResult:
    """The forward/backward work of one optimiser step: ``method`` 'gradcache' or 'plain' (k = 1: one pass)."""
    if method == "gradcache" and len(micro_batches) > 1:
        return gradcache_step(engine, micro_batches, loss_factor, grad_factor)
    return plain_step(engine, micro_batches, loss_factor, grad_factor)
