"""Training batches from sharded WebDataset tars (epoch or resampled), and held-out samples for evaluation.

:func:`build_train_loader` returns a :class:`TrainStream`: an infinite iterator of collated batches (dicts of
tensors) with the bookkeeping a long run needs: the epoch length, the data position for checkpoints
(:meth:`TrainStream.state_dict` / :meth:`TrainStream.load_state_dict`) and the counts of skipped bad data
(:meth:`TrainStream.fault_counts`). See docs/data.md for the semantics (epoch split, tail, mixing, resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data_pipelines.collate import collate
from data_pipelines.decoding import IMAGE_EXTENSIONS, caption_member, decode_image_text, safe_members
from data_pipelines.faults import ALL_KINDS, DataError, add_counts, format_counts
from data_pipelines.metadata import is_local, local_path, shard_counts
from data_pipelines.shardlists import EpochPlan, Plan, ResamplePlan, Source, parse_sources
from data_pipelines.stream import ShardStream, StreamSpec
from vlp.config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "TrainStream", "build_eval_samples", "build_train_loader", "decode_image_text"]

STATE_VERSION = 1


def _fingerprint(plan: Plan, sources: list[Source]) -> str:
    """Identifies the data a position refers to (shards, counts, weights, mode)."""
    desc = {"mode": plan.mode, "sources": [[s.urls, s.counts, s.weight] for s in sources]}
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


class TrainStream:
    """Infinite full batches for one rank, with data position, epoch accounting and fault counts.

    Iterate it (``next(stream)``) for batches. Everything about the data position is per rank; see
    :meth:`state_dict` (this rank, no communication) and :meth:`global_state_dict` (all ranks, collective).
    """

    def __init__(
        self,
        spec: StreamSpec,
        sources: list[Source],
        *,
        workers: int,
        num_samples: int | None,
        pin_memory: bool,
        timeout_s: float,
        plan_faults: dict[str, int] | None = None,
    ) -> None:
        self.spec = spec
        self.sources = sources
        self.workers = workers
        self.num_samples = num_samples
        self.pin_memory = pin_memory
        self.timeout_s = timeout_s
        self.fingerprint = _fingerprint(spec.plan, sources)
        self._plan_faults = dict(plan_faults or {})
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._faults: dict[int, dict[str, int]] = {}
        self._next_worker = 0
        self.batches = 0
        self.samples = 0
        self._loader: DataLoader | None = None
        self._it: Iterator | None = None

    # ------------------------------------------------------------------------------------------------ iteration
    @property
    def mode(self) -> str:
        return self.spec.plan.mode

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def epoch(self) -> float | None:
        """Passes over the data so far, counting every rank's batches (ranks step together)."""
        if not self.num_samples:
            return None
        return self.samples * self.spec.world_size / self.num_samples

    def steps_for_epochs(self, epochs: float, global_batch: int) -> int:
        """Optimiser steps (global batches) that cover ``epochs`` passes over the data, rounded up."""
        if not self.num_samples:
            raise ConfigError(
                "data.epochs needs the number of samples per epoch: write shard metadata with "
                "scripts/make_shards.py --index, or pass --train-num-samples"
            )
        return max(1, math.ceil(epochs * self.num_samples / global_batch))

    def _start(self) -> None:
        nw = self.spec.num_workers
        self.spec.rotate = self._next_worker
        self.spec.start = dict(self._positions)
        self.spec.faults = {w: dict(c) for w, c in self._faults.items()}
        dataset = ShardStream(self.spec)
        kw: dict[str, Any] = {}
        if self.workers > 0:
            kw.update(timeout=self.timeout_s, prefetch_factor=2, persistent_workers=False)
            if sys.platform.startswith("linux"):  # cheap worker start, also inside spawned processes
                kw["multiprocessing_context"] = "fork"
        generator = torch.Generator()  # worker seeds from (seed, rank); the global RNG is left alone
        generator.manual_seed(self.spec.seed * 1_000_003 + self.spec.rank)
        self._loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            generator=generator,
            collate_fn=_as_is,
            **kw,
        )
        self._it = iter(self._loader)
        assert nw == max(1, self.workers)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        try:
            if self.workers == 0:  # samples reseed the global RNGs: keep the training RNG apart from the data's
                saved = (torch.get_rng_state(), random.getstate())
                try:
                    batch = next(self._it)
                finally:
                    torch.set_rng_state(saved[0])
                    random.setstate(saved[1])
            else:
                batch = next(self._it)
        except DataError as e:  # re-raised from a worker with its traceback: keep the message only
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            msg = lines[-1] if lines else str(e)
            raise DataError(msg.split("DataError: ", 1)[-1]) from None
        info = batch.pop("__data__")
        worker = int(info["worker"])
        self._positions[worker] = tuple(int(v) for v in info["position"])
        self._faults[worker] = dict(info["faults"])
        if info.get("final"):  # a finite stream's reader is done: it only reported its counts
            return self.__next__()
        self._next_worker = (worker + 1) % self.spec.num_workers
        self.batches += 1
        self.samples += _batch_len(batch)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts them again from the current position)."""
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    # ------------------------------------------------------------------------------------------------ faults
    def fault_counts(self) -> dict[str, int]:
        """Skipped data on this rank so far, by kind (cumulative, including before a resume)."""
        return add_counts(self._plan_faults, *self._faults.values())

    def global_fault_counts(self) -> dict[str, int]:
        """Skipped data summed over all ranks. Collective: every rank must call it at the same point."""
        local = self.fault_counts()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        vec = torch.tensor([local[k] for k in ALL_KINDS], dtype=torch.float64, device=device)
        dist.all_reduce(vec)
        return {k: int(v) for k, v in zip(ALL_KINDS, vec.tolist())}

    def log_metrics(self, with_faults: bool) -> dict[str, float]:
        """Scalars for the metrics file: epochs and samples so far, plus (``with_faults``) skipped data by kind.

        With ``with_faults`` it is collective (sums over ranks): call it on every rank at the same steps. A log
        line reports the counts whenever they grew since the last call.
        """
        out: dict[str, float] = {"data/samples": float(self.samples * self.spec.world_size)}
        if self.epoch is not None:
            out["data/epoch"] = self.epoch
        if with_faults:
            counts = self.global_fault_counts()
            out.update({f"data/skipped/{k}": float(v) for k, v in counts.items()})
            if counts != getattr(self, "_last_logged", None) and any(counts.values()):
                log.warning("data: skipped so far (all ranks): %s", format_counts(counts))
            self._last_logged = counts
        return out

    # ------------------------------------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """This rank's data position: plain ints/strings/lists, safe for ``torch.load(weights_only=True)``.

        Holds, per logical reader (DataLoader worker), the next (round, window, offset) to read (round = epoch in
        epoch mode, a block of shard draws in resampled mode) and its fault counts; plus which reader gives the
        next batch, batches/samples consumed, and what identifies the data (mode, seed, shard fingerprint).
        """
        nw = self.spec.num_workers
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seed": self.spec.seed,
            "fingerprint": self.fingerprint,
            "rank": self.spec.rank,
            "world_size": self.spec.world_size,
            "num_workers": nw,
            "batches": self.batches,
            "samples": self.samples,
            "next_worker": self._next_worker,
            "plan_faults": dict(self._plan_faults),
            "workers": [
                {"round": r, "window": w, "offset": o, "faults": dict(self._faults.get(i, {}))}
                for i, (r, w, o) in ((i, self._position(i)) for i in range(nw))
            ],
        }

    def _position(self, worker: int) -> tuple[int, int, int]:
        return self._positions.get(worker, self.spec.start.get(worker, (0, 0, 0)))

    def global_state_dict(self) -> dict[str, Any]:
        """Every rank's :meth:`state_dict` as ``{"version", "world_size", "ranks": [...]}``. Collective."""
        import torch.distributed as dist

        local = self.state_dict()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {"version": STATE_VERSION, "world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: this rank's :meth:`state_dict`, or :meth:`global_state_dict`.

        Call before iterating (a running stream is stopped and restarts from the loaded position). The same data
        (shards, counts, weights), mode and seed are required. With the same world size and workers the stream
        continues exactly where it stopped; with a different layout the readers' shares change, so the stream
        restarts at the beginning of the earliest unfinished epoch (epoch mode; samples of that epoch already
        seen are seen again) or at fresh resampling rounds (resampled mode), with a warning.
        """
        entries = state["ranks"] if "ranks" in state else [state]
        if not entries or any(e.get("version") != STATE_VERSION for e in entries):
            raise ConfigError(f"data position: unsupported state version (expected {STATE_VERSION})")
        first = entries[0]
        for key, mine in (("mode", self.mode), ("seed", self.spec.seed), ("fingerprint", self.fingerprint)):
            if first.get(key) != mine:
                what = "shards/metadata/weights" if key == "fingerprint" else key
                raise ConfigError(
                    f"cannot resume the data stream: the checkpoint's data {what} differs "
                    f"({first.get(key)!r} vs {mine!r} now); resume with the same data settings"
                )
        self.close()
        nw = self.spec.num_workers
        mine = next((e for e in entries if e.get("rank") == self.spec.rank), None)
        same_layout = (
            mine is not None
            and first.get("world_size") == self.spec.world_size
            and first.get("num_workers") == nw
            and ("ranks" not in state or len(entries) == self.spec.world_size)
        )
        if same_layout:
            self._positions = {
                w: (int(d["round"]), int(d["window"]), int(d["offset"])) for w, d in enumerate(mine["workers"])
            }
            self._faults = {w: dict(d.get("faults", {})) for w, d in enumerate(mine["workers"])}
            self._next_worker = int(mine["next_worker"]) % nw
            self.batches, self.samples = int(mine["batches"]), int(mine["samples"])
            self._plan_faults = dict(mine.get("plan_faults", self._plan_faults))
            return
        rounds = [int(d["round"]) for e in entries for d in e["workers"]]
        restart = min(rounds) if self.mode == "epoch" else max(rounds) + 1
        log.warning(
            "data position saved with world_size=%s x workers=%s, resuming with %s x %s: readers' shares "
            "differ, so the data stream restarts at %s %d",
            first.get("world_size"),
            first.get("num_workers"),
            self.spec.world_size,
            nw,
            "the start of epoch" if self.mode == "epoch" else "resampling round",
            restart,
        )
        self._positions = {w: (restart, 0, 0) for w in range(nw)}
        totals = add_counts(*[d.get("faults", {}) for e in entries for d in e["workers"]])
        self._faults = {0: totals} if self.spec.rank == 0 else {}
        self._next_worker = 0
        total_samples = sum(int(e.get("samples", 0)) for e in entries)
        self.samples = total_samples // self.spec.world_size
        self.batches = self.samples // self.spec.batch_size


def _as_is(batch: Any) -> Any:
    """DataLoader's collate_fn: batches are collated by the readers already (no default_convert pass)."""
    return batch


def _batch_len(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
        if isinstance(v, (list, tuple)) and v:
            return int(v[0].shape[0]) if isinstance(v[0], torch.Tensor) else len(v)
    return 0


def _resolve_counts(sources: list[Source], mode: str, metadata: str | None) -> dict[str, int]:
    """Fill ``source.counts``; returns plan-time fault counts (local shards missing with no metadata)."""
    all_urls = [u for s in sources for u in s.urls]
    counts = shard_counts(all_urls, metadata=metadata, scan_local=True)
    plan_faults: dict[str, int] = {}
    i = 0
    for s in sources:
        s.counts = counts[i : i + len(s.urls)]
        i += len(s.urls)
    unknown = [(s, u) for s in sources for u, c in zip(s.urls, s.counts) if c is None]
    missing_local = [u for _, u in unknown if is_local(u)]
    if missing_local:
        from pathlib import Path

        gone = [u for u in missing_local if not Path(local_path(u)).is_file()]
        if gone:
            log.warning(
                "%d shard(s) are missing and have no metadata; they are skipped (first: %s)", len(gone), gone[0]
            )
            plan_faults["missing_shard"] = len(gone)
    if mode == "epoch" and unknown:
        remote = [u for _, u in unknown if not is_local(u)]
        if remote:
            raise ConfigError(
                f"data.mode=epoch needs each shard's sample count, and {len(remote)} remote shard(s) have no metadata "
                f"(first: {remote[0]}); put a sizes.json or *.meta.json next to them (scripts/make_shards.py --index "
                "writes one), pass --data.train_metadata FILE, or use --data.mode resampled with --train-num-samples"
            )
        for s in sources:  # local shards that could not be opened: treated as empty in the plan
            s.counts = [0 if c is None else c for c in s.counts]
    return plan_faults


def build_train_loader(
    shards: str,
    sample_transform: Callable[[dict], dict],
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    shuffle_buffer: int = 1000,
    caption_key: str = "txt",
    require_text: bool = True,
    collate_fn: Callable[[list[dict]], dict] | None = None,
    mode: str = "epoch",
    weights: list[float] | None = None,
    num_samples: int | None = None,
    metadata: str | None = None,
    max_consecutive_failures: int = 1000,
    pin_memory: bool | None = None,
    timeout_s: float = 600.0,
    max_rounds: int | None = None,
) -> TrainStream:
    """The training batch stream of one rank (see the module and docs/data.md).

    ``shards``: brace patterns, local paths or URLs, '::' between sources, ``weights`` one per source.
    ``mode``: "epoch" (each sample once per epoch, split exactly over ranks x workers) or "resampled".
    ``num_samples``: samples per epoch; default from the shards' metadata (required for epoch mode's split).
    ``sample_transform`` maps a decoded sample {"__key__", "image", "text", "json", "__epoch__"} to tensors;
    ``collate_fn`` (default :func:`data_pipelines.collate.collate`, the objective's rules) stacks them.
    ``max_rounds``: stop after this many epochs (resampled: rounds of shard draws), each reader ending with a
    partial batch; None (training): infinite, full batches, epochs carried over into each other.
    """
    if mode not in ("epoch", "resampled"):
        raise ConfigError(f"data.mode {mode!r} is not valid; valid: epoch, resampled")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
    if workers < 0:
        raise ConfigError(f"data.workers must be >= 0, got {workers}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    caption_member(caption_key)
    sources = parse_sources(shards, weights)
    plan_faults = _resolve_counts(sources, mode, metadata)
    nw = max(1, workers)
    if mode == "epoch":
        plan: Plan = EpochPlan(sources, seed)
        total = plan.total
        if total < world_size * nw:
            raise ConfigError(
                f"{total} training samples cannot feed {world_size} rank(s) x {nw} worker(s); use fewer "
                "workers or more data"
            )
        if num_samples is not None and num_samples != total:
            raise ConfigError(
                f"--train-num-samples {num_samples} disagrees with the shards' metadata ({total} "
                f"samples per epoch in {len(plan.entries)} shard(s)); drop the flag or fix the metadata"
            )
    else:
        plan = ResamplePlan(sources, seed, shuffle_buffer)
        known = [s.num_samples for s in sources]
        total = (
            num_samples
            if num_samples is not None
            else (int(sum(n * s.weight for n, s in zip(known, sources))) if all(n is not None for n in known) else None)
        )
    if plan_faults and rank != 0:
        plan_faults = {}  # reported once, by rank 0
    spec = StreamSpec(
        plan=plan,
        rank=rank,
        world_size=world_size,
        num_workers=nw,
        sample_transform=sample_transform,
        batch_size=batch_size,
        collate_fn=collate_fn or collate,
        seed=seed,
        window=shuffle_buffer,
        caption_key=caption_key,
        require_text=require_text,
        max_consecutive_failures=max_consecutive_failures,
        max_rounds=max_rounds,
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    stream = TrainStream(
        spec,
        sources,
        workers=workers,
        num_samples=total,
        pin_memory=pin_memory,
        timeout_s=timeout_s,
        plan_faults=plan_faults,
    )
    log.info(
        "training data: %s mode, %d source(s), %d shard(s), %s samples per epoch, %d reader(s) per rank",
        mode,
        len(sources),
        sum(len(s.urls) for s in sources),
        total if total is not None else "unknown",
        nw,
    )
    return stream


def build_eval_samples(shards: str, caption_key: str = "txt", require_text: bool = True) -> Iterator[dict]:
    """Every sample of a held-out shard set once, in order, decoded (image, text, json labels).

    Bad samples are skipped; their counts are logged once the shards are exhausted. Pickle-based members are
    skipped unread, as in training.
    """
    stage = decode_image_text(caption_key, require_text=require_text)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.tarfile_to_samples(handler=wds.warn_and_continue, select_files=safe_members(stage.faults)),
        stage,
    )

    def run() -> Iterator[dict]:
        yield from pipeline
        if any(stage.faults.counts.values()):
            log.warning("held-out data %s: skipped %s", shards, format_counts(stage.faults.counts))

    return run()
