"""Which shards each reader reads, round by round: the epoch plan and the resampling plan.

A *reader* (slot) is one DataLoader worker of one rank: slot = rank * workers + worker, of S = world_size * workers.
Its stream is a sequence of *rounds*, each a list of :class:`Piece` (a shard, or a contiguous part of one).

- Epoch mode: round r is epoch r. The shards of all sources (each repeated by its integer weight) are put in an
  order drawn from (seed, epoch); their samples, concatenated, are cut into S contiguous shares whose sizes differ
  by at most one, and reader s reads share s. Every sample is read exactly once per epoch, by exactly one reader,
  whatever the shard sizes and counts; a reader opens at most two partial shards per epoch. This needs the
  per-shard sample counts (see :mod:`data_pipelines.metadata`).
- Resampled mode: round r of reader s is a few shards drawn with replacement from an RNG seeded by
  (seed, s, r), each shard with probability proportional to its source's weight. A draw yields all of the shard's
  samples, so every sample of a source is equally frequent whatever its shard's size, and a source's share of the
  samples is weight x its sample count: weights act as per-sample upsampling factors, as in epoch mode.
  Infinite; no counts needed.

Rounds are pure functions of (seed, round, slot): nothing about them needs saving except where a reader is.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from itertools import accumulate

from webdataset.shardlists import expand_urls

from vlp.config import ConfigError


@dataclass
class Source:
    """One '::'-separated part of the shard spec: its expanded URLs, weight and per-shard counts."""

    spec: str
    urls: list[str]
    weight: float = 1.0
    counts: list[int | None] | None = None

    @property
    def num_samples(self) -> int | None:
        if self.counts is None or any(c is None for c in self.counts):
            return None
        return sum(self.counts)


def parse_sources(spec: str, weights: list[float] | None = None) -> list[Source]:
    """Split '::'-separated sources, expand braces (``/data/cc3m-{000000..000331}.tar``) and attach weights."""
    if not spec or not spec.strip():
        raise ConfigError("data.train_shards is empty; give a shard spec such as /data/shard-{000000..000099}.tar")
    parts = [p.strip() for p in spec.split("::")]
    if weights is not None and len(weights) != len(parts):
        raise ConfigError(
            f"data.source_weights has {len(weights)} value(s) but data.train_shards has {len(parts)} "
            f"'::'-separated source(s); give one weight per source"
        )
    sources = []
    for i, part in enumerate(parts):
        if not part:
            raise ConfigError(f"data.train_shards: source {i + 1} of {spec!r} is empty")
        urls = expand_urls(part)
        if not urls:
            raise ConfigError(f"data.train_shards: source {part!r} expands to no shard")
        w = 1.0 if weights is None else float(weights[i])
        if not w > 0 or math.isinf(w):
            raise ConfigError(f"data.source_weights: weight {weights[i]!r} for {part!r} must be a positive number")
        sources.append(Source(part, urls, w))
    return sources


@dataclass(frozen=True)
class Piece:
    """Samples ``start <= i < stop`` of one shard (``stop`` None: to its end).

    ``base`` is the planned position of sample ``start`` within the round (None when counts are unknown), and
    ``uid`` identifies the piece in seeds.
    """

    url: str
    start: int
    stop: int | None
    base: int | None
    uid: str

    @property
    def length(self) -> int | None:
        return None if self.stop is None else self.stop - self.start


def _mix(*parts: object) -> str:
    return ":".join(map(str, parts))


class EpochPlan:
    """Epoch mode: every sample of the data (x integer source weights) once per epoch, split into S shares."""

    mode = "epoch"

    def __init__(self, sources: list[Source], seed: int) -> None:
        self.seed = seed
        self.entries: list[tuple[str, int]] = []
        for src in sources:
            if not float(src.weight).is_integer():
                raise ConfigError(
                    f"data.source_weights: epoch mode repeats each source a whole number of times per "
                    f"epoch, but {src.spec!r} has weight {src.weight}; use integers, or "
                    "data.mode=resampled for fractional mixing"
                )
            assert src.counts is not None and len(src.counts) == len(src.urls)
            for _ in range(int(src.weight)):
                self.entries.extend((u, int(c)) for u, c in zip(src.urls, src.counts) if c)
        self.total = sum(c for _, c in self.entries)
        if self.total == 0:
            raise ConfigError("data.train_shards: the shards hold no samples (according to their metadata)")

    def order(self, epoch: int) -> list[int]:
        """The shard order of ``epoch`` (indices into ``entries``)."""
        order = list(range(len(self.entries)))
        random.Random(_mix("vlp-epoch", self.seed, epoch)).shuffle(order)
        return order

    def share(self, slot: int, num_slots: int) -> tuple[int, int]:
        """[lo, hi): the positions of the epoch's sample sequence that reader ``slot`` reads."""
        return slot * self.total // num_slots, (slot + 1) * self.total // num_slots

    def pieces(self, epoch: int, slot: int, num_slots: int) -> list[Piece]:
        lo, hi = self.share(slot, num_slots)
        order = self.order(epoch)
        starts = [0, *accumulate(self.entries[k][1] for k in order)]
        first = bisect.bisect_right(starts, lo) - 1
        out = []
        for j in range(max(first, 0), len(order)):
            c0 = starts[j]
            if c0 >= hi:
                break
            url, count = self.entries[order[j]]
            start, stop = max(lo - c0, 0), min(hi - c0, count)
            if stop > start:
                out.append(Piece(url, start, stop, c0 + start - lo, _mix("e", epoch, j)))
        return out


class ResamplePlan:
    """Resampled mode: shards drawn with replacement, P(shard) proportional to its source's weight."""

    mode = "resampled"

    def __init__(self, sources: list[Source], seed: int, window: int) -> None:
        self.seed = seed
        self.urls: list[str] = []
        self.counts: list[int | None] = []
        weights: list[float] = []
        known = [c for s in sources for c in (s.counts or []) if c]
        for src in sources:
            counts = src.counts or [None] * len(src.urls)
            for u, c in zip(src.urls, counts):
                if c == 0:
                    continue  # an empty shard can never give a sample
                self.urls.append(u)
                self.counts.append(c)
                weights.append(src.weight)  # a draw yields all of a shard's samples: uniform draws = uniform samples
        if not self.urls:
            raise ConfigError("data.train_shards: every shard is empty according to its metadata")
        self.cum_weights = list(accumulate(weights))
        self.counts_known = all(c is not None for c in self.counts)
        mean = sum(known) / len(known) if known else None
        # enough shards per round for a few shuffle windows; without counts, few (a resume re-reads <= one round)
        self.draws_per_round = max(1, min(64, math.ceil(4 * window / mean))) if self.counts_known and mean else 4

    def pieces(self, rnd: int, slot: int, num_slots: int) -> list[Piece]:
        rng = random.Random(_mix("vlp-resample", self.seed, slot, rnd))
        picks = rng.choices(range(len(self.urls)), cum_weights=self.cum_weights, k=self.draws_per_round)
        out, base = [], 0
        for d, i in enumerate(picks):
            c = self.counts[i]
            out.append(Piece(self.urls[i], 0, c, base if self.counts_known else None, _mix("r", slot, rnd, d)))
            if c is not None:
                base += c
        return out


Plan = EpochPlan | ResamplePlan
