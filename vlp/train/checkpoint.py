"""Writing checkpoints during training: commit, keep-N pruning, all ranks together.

The layout and the reading side (resume resolution, consolidation, the model export) live in
:mod:`vlp.checkpointing`, below the engine.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlp.checkpointing import (
    CHECKPOINTS,
    TRAINER_STATE,
    fsync_path,
    fsync_tree,
    list_checkpoints,
    read_latest,
    write_latest,
)
from vlp.distributed import broadcast_object

log = logging.getLogger(__name__)


class CheckpointManager:
    """Writes, commits and prunes the checkpoints of one run (every rank holds one; writes are collective)."""

    def __init__(
        self,
        run_dir: Path,
        keep: int,
        rank: int,
        barrier: Callable[[], None],
        before_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        self.before_commit = before_commit

    def _name(self, step: int) -> str:
        name = f"step-{step:08d}"
        n = 0
        while (self.root / name).exists():  # an earlier incarnation of this run reached the same step
            n += 1
            name = f"step-{step:08d}.r{n}"
        return name

    def save(
        self, step: int, write_shared: Callable[[Path], None], rank_state: dict[str, Any], trainer_state: dict[str, Any]
    ) -> Path:
        """Write checkpoint ``step``; returns its directory. Collective.

        ``write_shared(dir)`` writes the model and optimiser (every rank, e.g. DeepSpeed's sharded save);
        ``rank_state`` is this rank's RNG and data position; ``trainer_state`` is written by the main process.
        """
        is_main = self.rank == 0
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            name = self._name(step)
            tmp = self.root / f".tmp-{name}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        else:
            name = ""
        name = broadcast_object(name)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        self.barrier()
        write_shared(tmp)
        torch.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        if self.before_commit is not None:
            self.before_commit(step)
        self.barrier()
        if is_main:
            torch.save(trainer_state, tmp / TRAINER_STATE)
            fsync_tree(tmp)
            os.rename(tmp, final)
            fsync_path(self.root)
            write_latest(self.root, name)
            self.prune()
            log.info("checkpoint step %d saved in %s", step, final)
        self.barrier()
        return final

    def prune(self) -> None:
        """Delete leftovers of interrupted saves and all but the newest ``keep`` complete checkpoints."""
        for d in self.root.iterdir():
            if d.name.startswith(".tmp-") and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        try:
            latest = read_latest(self.root)
        except FileNotFoundError:
            latest = None
        complete = list_checkpoints(self.root)
        for d in complete[: -self.keep]:
            if latest is None or d.resolve() != latest.resolve():
                shutil.rmtree(d, ignore_errors=True)
