"""Bad data is skipped and counted by kind, never fatal, unless nothing at all can be read.

Every reader process (a DataLoader worker, or the main process with ``workers=0``) owns one :class:`FaultCounter`.
Its cumulative counts travel to the main process attached to each batch, so they survive worker processes and
can be summed across ranks. A run where every sample fails does not spin forever: after
``max_consecutive_failures`` failures in a row without one good sample, :class:`DataError` stops it with the counts.
"""

from __future__ import annotations

import logging

from vlp.config import ConfigError

log = logging.getLogger(__name__)

#: Kinds of failure, in a fixed order (the order of the vector summed across ranks).
FAILURE_KINDS: tuple[str, ...] = (
    "missing_shard",  # the shard could not be opened or fetched (no such file, host unreachable, HTTP 404)
    "unreadable_shard",  # opened, but no sample could be read (not a tar, empty file)
    "truncated_shard",  # some samples were read, then the tar ended or broke
    "corrupt_image",  # the image member does not decode
    "missing_image",  # a sample with no jpg/jpeg/png/webp member
    "missing_caption",  # no caption member (or json field) where the objective needs text
    "empty_caption",  # a caption that is empty or only whitespace
    "bad_caption",  # a caption that is not UTF-8, or a json member that does not parse
    "malformed_sample",  # two members with the same name in one sample, and the like
    "transform_error",  # the objective's sample transform raised
)
#: Counted but not failures: samples the metadata promised that a broken/missing shard did not deliver, and
#: members with pickle-based extensions that were ignored unread.
INFO_KINDS: tuple[str, ...] = ("missing_samples", "ignored_unsafe_members")
ALL_KINDS: tuple[str, ...] = FAILURE_KINDS + INFO_KINDS


class DataError(ConfigError):
    """The training data cannot be read at all (every recent sample or shard failed)."""


class FaultCounter:
    """Cumulative counts by kind plus the current run of consecutive failures."""

    def __init__(
        self, max_consecutive_failures: int = 1000, initial: dict[str, int] | None = None, where: str = ""
    ) -> None:
        if max_consecutive_failures < 1:
            raise ConfigError(f"data.max_consecutive_failures must be >= 1, got {max_consecutive_failures}")
        self.max_consecutive = max_consecutive_failures
        self.counts: dict[str, int] = {k: int((initial or {}).get(k, 0)) for k in ALL_KINDS}
        self.consecutive = 0
        self.where = where
        self._warned: set[str] = set()

    def fail(self, kind: str, detail: str = "", n: int = 1) -> None:
        """Record ``n`` failures of ``kind``; raise DataError once too many happened in a row."""
        assert kind in FAILURE_KINDS, kind
        self.counts[kind] += n
        self.consecutive += n
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("data%s: skipping %s (%s); further ones are counted silently", self.where, kind, detail)
        else:
            log.debug("data%s: skipping %s (%s)", self.where, kind, detail)
        if self.consecutive >= self.max_consecutive:
            raise DataError(
                f"{self.consecutive} consecutive data failures without one usable sample{self.where} "
                f"(counts so far: {self.summary()}; last: {kind}: {detail}). Check the shard paths and contents, "
                "or raise data.max_consecutive_failures if this much bad data is expected"
            )

    def note(self, kind: str, n: int = 1) -> None:
        """Count an informational event (not a failure)."""
        assert kind in INFO_KINDS, kind
        self.counts[kind] += n

    def ok(self) -> None:
        """A usable sample: the run of consecutive failures ends."""
        self.consecutive = 0

    def snapshot(self) -> dict[str, int]:
        """Nonzero cumulative counts (a small dict to attach to a batch)."""
        return {k: v for k, v in self.counts.items() if v}

    def summary(self) -> str:
        return format_counts(self.counts)


def format_counts(counts: dict[str, int]) -> str:
    """'corrupt_image 3, missing_shard 1' (nonzero kinds only), or 'none'."""
    parts = [f"{k} {v}" for k, v in counts.items() if v]
    return ", ".join(parts) if parts else "none"


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Sum several count dicts over :data:`ALL_KINDS` (missing kinds count 0)."""
    return {k: sum(int(c.get(k, 0)) for c in counts) for k in ALL_KINDS}
