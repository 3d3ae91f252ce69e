"""One reader's stream of batches: its rounds of shard pieces, read, window-shuffled, decoded, transformed, batched.

This runs inside each DataLoader worker (or the main process with ``workers=0``). The tar reading is webdataset's
own (``gopen``, ``tar_file_iterator``, ``group_by_keys``); what is ours is the composition: a member filter that
never reads pickle-based members and lets a reader start in the middle of a shard, fault counting, and a shuffle
that can be resumed exactly.

Shuffling: the round's samples are cut into windows of ``window`` consecutive positions; each window is read whole
and permuted by an RNG seeded from (seed, reader, round, window). A reader's place is therefore three integers,
(round, window, offset in the window's permutation), and resuming re-reads at most one window (and skips to it
inside its shard without decoding). Positions are planned positions (from the shards' counts) when these are known,
so a shard that breaks does not shift later windows.

Each sample's augmentation RNG (torch's default generator and Python's ``random``) is seeded from (seed, round,
piece, key), so augmentations do not depend on the number of workers or ranks and a resumed run draws the same ones.
Batches are always full: a reader's last samples of an epoch share a batch with its first samples of the next.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from data_pipelines.decoding import decode_sample, is_unsafe, wanted_extensions
from data_pipelines.faults import DataError, FaultCounter
from data_pipelines.shardlists import Piece, Plan

READ_BUFFER = 1 << 20


class _MemberSelector:
    """``select_files`` for webdataset's tar iterator: tracks sample indices, keeps [start, stop), allowed members.

    Members of samples before ``start`` are skipped unread; the first member of sample ``stop`` is let through
    only so that the reader sees ``done`` and stops. Pickle-based members are never read, only counted.
    """

    def __init__(self, start: int, stop: int | None, wanted: frozenset[str], faults: FaultCounter) -> None:
        self.start, self.stop, self.wanted, self.faults = start, stop, wanted, faults
        self.index = -1
        self.last: str | None = None
        self.kept_current = False
        self.done = False
        self.key_index: dict[str, int] = {}
        self.memberless: list[str] = []
        self.memberless_total = 0

    def _close_current(self) -> None:
        if self.index >= self.start and not self.kept_current and (self.stop is None or self.index < self.stop):
            self.memberless.append(str(self.last))
            self.memberless_total += 1

    def __call__(self, fname: str) -> bool:
        prefix, suffix = base_plus_ext(fname)
        if prefix is None:
            return False
        if prefix != self.last:
            self._close_current()
            self.index += 1
            self.last = prefix
            self.kept_current = False
            if self.stop is not None and self.index >= self.stop:
                self.done = True
                return True
        if self.done or self.index < self.start:
            return False
        if is_unsafe(suffix):
            self.faults.note("ignored_unsafe_members")
            return False
        if suffix.lower() not in self.wanted:
            return False
        self.kept_current = True
        self.key_index[prefix] = self.index
        return True

    def finish(self) -> None:
        if not self.done:
            self._close_current()
            self.done = True


def _until_done(files: Iterator[dict], sel: _MemberSelector, url: str) -> Iterator[dict]:
    for f in files:
        if sel.done:
            break
        f["__url__"] = url
        yield f


def _fetch_failure(stream: Any) -> str | None:
    """Why a piped shard (``http(s)://`` through curl, ``pipe:``) could not be fetched, or None.

    Only asked when nothing was read from the shard, so the command has finished (or is about to): a failing exit
    status (curl's 22 for an HTTP error such as 404, 6/7 for a host that cannot be reached) means the shard is
    missing, not a file that was fetched and is not a tar.
    """
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(timeout=10)
    except Exception:  # noqa: BLE001 - still running: not a failed fetch (yet)
        return None
    if status in getattr(stream, "ignore_status", [0]):
        return None
    return f"{proc.args[0] if isinstance(proc.args, list) else 'command'} exited with status {status}"


def read_shard(
    url: str, start: int, stop: int | None, wanted: frozenset[str], faults: FaultCounter
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index in shard, raw sample) for samples ``start <= index < stop`` of one shard; failures are counted."""
    expected = None if stop is None else stop - start
    try:
        stream = gopen(url, bufsize=READ_BUFFER)
    except Exception as e:  # noqa: BLE001 - no such file, unreachable URL
        faults.fail("missing_shard", f"{url}: {e}")
        if expected:
            faults.note("missing_samples", expected)
        return
    sel = _MemberSelector(start, stop, wanted, faults)
    delivered = 0

    def malformed(exn: Exception) -> bool:
        faults.fail("malformed_sample", f"{url}: {exn}")
        return True

    def drain() -> None:
        while sel.memberless:
            faults.fail("missing_image", f"{sel.memberless.pop(0)} in {url} has no image or caption member")

    errors: list[Exception] = []

    def stop_reading(exn: Exception) -> bool:  # a member that cannot be read: keep what came before, stop
        errors.append(exn)
        return False

    try:
        files = tar_file_iterator(stream, handler=stop_reading, select_files=sel)
        for raw in group_by_keys(_until_done(files, sel, url), handler=malformed):
            drain()
            index = sel.key_index.pop(raw["__key__"], None)
            if index is None:  # a key split across non-adjacent members; its index was reassigned
                faults.fail("malformed_sample", f"{raw['__key__']} in {url}: members are not adjacent")
                continue
            delivered += 1
            yield index, raw
        if not errors:
            sel.finish()
        drain()
        if errors:
            raise errors[0]
        if sel.index < 0:
            why = _fetch_failure(stream)
            faults.fail("missing_shard" if why else "unreadable_shard", f"{url}: {why or 'no samples in it'}")
            if expected:
                faults.note("missing_samples", expected)
        elif stop is not None and sel.index + 1 < stop:
            faults.fail("truncated_shard", f"{url}: ended after {sel.index + 1} samples, its metadata says more")
            faults.note("missing_samples", stop - max(sel.index + 1, start))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken tar: skip the rest of this shard
        why = None if sel.index >= 0 else _fetch_failure(stream)
        kind = "truncated_shard" if sel.index >= 0 else "missing_shard" if why else "unreadable_shard"
        faults.fail(kind, f"{url}: {why or repr(e)}"[:300])
        if expected is not None:
            faults.note("missing_samples", max(expected - delivered - sel.memberless_total, 0))
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - closing a broken pipe/file is best effort
            pass


def _round_entries(
    pieces: list[Piece], start_pos: int, wanted: frozenset[str], faults: FaultCounter
) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(position in round, raw sample, piece uid), from position ``start_pos`` on."""
    if all(p.base is not None and p.stop is not None for p in pieces):
        for p in pieces:
            if p.base + p.length <= start_pos:
                continue
            skip = max(0, start_pos - p.base)
            for index, raw in read_shard(p.url, p.start + skip, p.stop, wanted, faults):
                yield p.base + index - p.start, raw, p.uid
    else:  # counts unknown: positions are the order samples arrive in, and skipping means reading
        pos = 0
        for p in pieces:
            for _, raw in read_shard(p.url, p.start, p.stop, wanted, faults):
                if pos >= start_pos:
                    yield pos, raw, p.uid
                pos += 1


def _windows(
    entries: Iterator[tuple[int, dict[str, Any], str]], size: int
) -> Iterator[tuple[int, list[tuple[dict[str, Any], str]]]]:
    current, buf = -1, []
    for pos, raw, uid in entries:
        w = pos // size
        if w != current and buf:
            yield current, buf
            buf = []
        current = w
        buf.append((raw, uid))
    if buf:
        yield current, buf


def _crc(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass
class StreamSpec:
    """Everything a reader needs; pickled into each DataLoader worker."""

    plan: Plan
    rank: int
    world_size: int
    num_workers: int
    sample_transform: Callable[[dict], Any]
    batch_size: int
    collate_fn: Callable[[list], Any]
    seed: int = 0
    window: int = 1000
    caption_key: str = "txt"
    require_text: bool = True
    max_consecutive_failures: int = 1000
    rotate: int = 0
    """Physical worker p plays logical worker (p + rotate) % num_workers (keeps the batch order on resume)."""
    start: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    """Logical worker -> (round, window, offset) to start from."""
    faults: dict[int, dict[str, int]] = field(default_factory=dict)
    """Logical worker -> fault counts so far (a resumed run keeps counting)."""
    max_rounds: int | None = None
    """Stop after this many rounds (epochs in epoch mode), ending with a partial batch; None: infinite."""


class ShardStream(IterableDataset):
    """An infinite IterableDataset of collated batches, each with a ``__data__`` entry (reader, position, faults)."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        assert nw == spec.num_workers, (nw, spec.num_workers)
        logical = (physical + spec.rotate) % nw
        return self._batches(logical, spec.rank * nw + logical, spec.world_size * nw)

    def _batches(self, worker: int, slot: int, num_slots: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        faults = FaultCounter(
            spec.max_consecutive_failures, spec.faults.get(worker), where=f" (rank {spec.rank}, reader {worker})"
        )
        wanted = wanted_extensions(spec.caption_key)
        rnd, first_window, offset = spec.start.get(worker, (0, 0, 0))
        gen = torch.default_generator
        batch: list[Any] = []
        while spec.max_rounds is None or rnd < spec.max_rounds:
            pieces = spec.plan.pieces(rnd, slot, num_slots)
            entries = _round_entries(pieces, first_window * spec.window, wanted, faults)
            for w, items in _windows(entries, spec.window):
                order = list(range(len(items)))
                random.Random(f"vlp-window:{spec.seed}:{slot}:{rnd}:{w}").shuffle(order)
                skip = offset if w == first_window else 0
                for j in range(skip, len(order)):
                    raw, uid = items[order[j]]
                    sample = decode_sample(raw, spec.caption_key, spec.require_text, faults, salt=(spec.seed, rnd, uid))
                    if sample is not None:
                        sample["__epoch__"] = rnd
                        sample["__url__"] = raw.get("__url__")
                        s = _crc(spec.seed, rnd, uid, sample["__key__"])
                        gen.manual_seed(s)
                        random.seed(s)
                        try:
                            batch.append(spec.sample_transform(sample))
                            faults.ok()
                        except DataError:
                            raise
                        except Exception as e:  # noqa: BLE001 - a sample the transform cannot handle
                            faults.fail("transform_error", f"{sample['__key__']}: {e!r}"[:300])
                    if len(batch) == spec.batch_size:
                        out = spec.collate_fn(batch)
                        batch = []
                        position = (rnd, w, j + 1) if j + 1 < len(order) else (rnd, w + 1, 0)
                        out["__data__"] = {"worker": worker, "position": position, "faults": faults.snapshot()}
                        yield out
            first_window, offset = 0, 0
            rnd += 1
        # finite stream: the remainder as a last partial batch, then a trailer carrying the final counts
        position = (rnd, 0, 0)
        if batch:
            out = spec.collate_fn(batch)
            out["__data__"] = {"worker": worker, "position": position, "faults": faults.snapshot()}
            yield out
        yield {"__data__": {"worker": worker, "position": position, "faults": faults.snapshot(), "final": True}}
