"""Per-shard sample counts: written beside the shards, read back to size epochs exactly (never guessed).

Two files are written in the shard directory by :func:`write_shard_metadata` (used by ``scripts/make_shards.py``
and the synthetic data):

``{prefix}.meta.json``
    ``{"format": "vlp-webdataset-shards", "version": 1, "prefix": ..., "num_samples": total, "num_shards": n,
    "shards": [{"name": "prefix-000000.tar", "num_samples": 1000}, ...], ...}`` plus whatever the writer adds
    (options, skipped inputs).
``sizes.json``
    ``{"prefix-000000.tar": 1000, ...}``, the format open_clip_train reads, merged with entries already there.

Reading (:func:`shard_counts`) looks, for each shard, at an explicit metadata file if one is given, then the
shard directory's ``sizes.json`` (local, or fetched next to a URL), its ``*.meta.json`` files, and img2dataset's
``{stem}_stats.json``; local shards with no metadata at all are counted by reading their tar headers.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

META_FORMAT = "vlp-webdataset-shards"
META_SUFFIX = ".meta.json"
SIZES_FILE = "sizes.json"
_META_NAME = re.compile(r"__[^/]*__($|/)")


def is_local(url: str) -> bool:
    """A plain filesystem path (or file:// URL), as opposed to http(s)://, s3://, pipe: and the like."""
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    return (
        url[len("file://") :] if url.startswith("file://") else url[len("file:") :] if url.startswith("file:") else url
    )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard_metadata(
    out_dir: str | Path, prefix: str, shard_counts: dict[str, int], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``{prefix}.meta.json`` and merge the counts into ``sizes.json``; returns the meta file path.

    ``shard_counts`` maps shard file names (no directory) to their number of samples, in shard order.
    """
    out = Path(out_dir)
    meta = {
        "format": META_FORMAT,
        "version": 1,
        "prefix": prefix,
        "num_samples": int(sum(shard_counts.values())),
        "num_shards": len(shard_counts),
        "shards": [{"name": name, "num_samples": int(n)} for name, n in shard_counts.items()],
        **(extra or {}),
    }
    meta_path = out / f"{prefix}{META_SUFFIX}"
    _atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    sizes_path = out / SIZES_FILE
    sizes: dict[str, int] = {}
    if sizes_path.is_file():
        try:
            sizes = {k: int(v) for k, v in json.loads(sizes_path.read_text()).items()}
        except (ValueError, AttributeError, TypeError):
            log.warning("%s is not a {shard: count} mapping; rewriting it", sizes_path)
    sizes.update({k: int(v) for k, v in shard_counts.items()})
    _atomic_write_text(sizes_path, json.dumps(dict(sorted(sizes.items())), indent=0) + "\n")
    return meta_path


def parse_counts(data: Any) -> dict[str, int]:
    """Shard name (or URL) -> count from either metadata format; {} when ``data`` is neither."""
    if isinstance(data, dict) and isinstance(data.get("shards"), list):
        out = {}
        for entry in data["shards"]:
            if isinstance(entry, dict) and "name" in entry and "num_samples" in entry:
                out[str(entry["name"])] = int(entry["num_samples"])
        return out
    if isinstance(data, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        return {str(k): int(v) for k, v in data.items()}
    return {}


def _read_json(url: str) -> Any:
    if is_local(url):
        return json.loads(Path(local_path(url)).read_text())
    with gopen(url) as f:
        return json.loads(f.read().decode("utf-8"))


def _dirname(url: str) -> str | None:
    if url.startswith("pipe:"):
        return None
    return os.path.dirname(local_path(url)) if is_local(url) else posixpath.dirname(url)


class _DirectoryIndex:
    """Counts known for the shards of one directory (metadata files read once)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.counts: dict[str, int] = {}
        self.sources: list[str] = []
        local = is_local(directory) if directory else True
        sizes_url = os.path.join(directory, SIZES_FILE) if local else f"{directory}/{SIZES_FILE}"
        try:
            if not local or Path(sizes_url).is_file():
                self.counts.update(parse_counts(_read_json(sizes_url)))
                self.sources.append(sizes_url)
        except Exception as e:  # noqa: BLE001 - absent or unreadable metadata just means "unknown"
            log.debug("no usable %s: %s", sizes_url, e)
        if local and os.path.isdir(directory or "."):
            for meta in sorted(Path(directory or ".").glob(f"*{META_SUFFIX}")):
                try:
                    self.counts.update(parse_counts(json.loads(meta.read_text())))
                    self.sources.append(str(meta))
                except (OSError, ValueError) as e:
                    log.warning("ignoring unreadable shard metadata %s: %s", meta, e)

    def lookup(self, name: str) -> int | None:
        if name in self.counts:
            return self.counts[name]
        if self.directory is not None and is_local(self.directory or "."):
            stem = name.split(".")[0]
            stats = Path(self.directory or ".") / f"{stem}_stats.json"  # img2dataset
            if stats.is_file():
                try:
                    return int(json.loads(stats.read_text())["successes"])
                except (OSError, ValueError, KeyError, TypeError):
                    return None
        return None


def count_shard_samples(url: str) -> int:
    """Samples in one shard, counted from its member names exactly as the reader groups them.

    Local plain tars are scanned header by header (data is skipped by seeking); anything else is streamed.
    """
    if is_local(url):
        tf = tarfile.open(local_path(url), mode="r:*")
        close = None
    else:
        close = gopen(url)
        tf = tarfile.open(fileobj=close, mode="r|*")
    count, last = 0, None
    try:
        for info in tf:
            name = info.name
            if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            if _META_NAME.match(name):
                continue
            prefix, _ = base_plus_ext(name)
            if prefix is not None and prefix != last:
                count += 1
                last = prefix
            tf.members = []
    finally:
        tf.close()
        if close is not None:
            close.close()
    return count


def shard_counts(urls: Sequence[str], metadata: str | None = None, scan_local: bool = True) -> list[int | None]:
    """The number of samples of each shard, or None where it cannot be known without downloading the shard.

    ``metadata`` names explicit metadata files ('::'-separated; either format) that take precedence.
    """
    explicit: dict[str, int] = {}
    for meta in metadata.split("::") if metadata else []:
        try:
            counts = parse_counts(_read_json(meta))
        except Exception as e:
            from vlp.config import ConfigError

            raise ConfigError(f"data.train_metadata: cannot read {meta!r} ({e})") from e
        if not counts:
            from vlp.config import ConfigError

            raise ConfigError(
                f"data.train_metadata: {meta!r} is neither a {{shard: count}} mapping nor a {META_FORMAT} file"
            )
        explicit.update(counts)
    indexes: dict[str | None, _DirectoryIndex | None] = {}
    out: list[int | None] = []
    to_scan: list[int] = []
    for i, url in enumerate(urls):
        name = os.path.basename(local_path(url)) if is_local(url) else posixpath.basename(url)
        if url in explicit or name in explicit:
            out.append(explicit.get(url, explicit.get(name)))
            continue
        d = _dirname(url)
        if d not in indexes:
            indexes[d] = _DirectoryIndex(d) if d is not None else None
        idx = indexes[d]
        n = idx.lookup(name) if idx is not None else None
        out.append(n)
        if n is None and scan_local and is_local(url):
            to_scan.append(i)
    if to_scan:
        log.info(
            "counting the samples of %d local shard(s) without metadata (write it once with "
            "`scripts/make_shards.py --index SHARDS` to skip this)",
            len(to_scan),
        )
        for i in to_scan:
            try:
                out[i] = count_shard_samples(urls[i])
            except (OSError, tarfile.TarError, EOFError) as e:
                log.warning("cannot count samples of %s: %s", urls[i], e)
    return out


def index_shards(urls: Iterable[str], out_dir: str | Path, prefix: str) -> Path:
    """Count existing shards (e.g. LAION/DataComp/CC3M tars) and write their metadata into ``out_dir``."""
    counts = {
        os.path.basename(local_path(u)) if is_local(u) else posixpath.basename(u): count_shard_samples(u) for u in urls
    }
    return write_shard_metadata(out_dir, prefix, counts, {"indexed_from": "existing shards"})
