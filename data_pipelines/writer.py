"""Write image-text data as WebDataset tar shards with metadata: ``scripts/make_shards.py`` is a thin CLI over this.

Inputs: an image folder with same-name ``.txt`` captions, a CSV/TSV or JSONL file with image-path and caption
columns, or a Hugging Face dataset (a ``save_to_disk`` folder, or anything local that ``load_dataset`` reads).
Each input becomes one sample ``{key}.{jpg|png|webp}`` + ``{key}.txt`` + ``{key}.json`` (source, size); images are
copied byte for byte unless they must change (``max_side`` resize, ``jpeg_quality`` re-encode, or a format the
reader does not take), in which case they are re-encoded as RGB JPEG. Inputs that cannot be used (missing or
corrupt image, missing or empty caption) are skipped and listed with the reason in ``{prefix}.skipped.jsonl``.

Inputs are processed in parallel but written in input order into shards of ``samples_per_shard`` samples, with
fixed tar headers, so the same input always gives byte-identical shards.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from data_pipelines.metadata import index_shards, write_shard_metadata
from vlp.config import ConfigError, MakeShardsConfig  # noqa: F401 - MakeShardsConfig re-exported

log = logging.getLogger(__name__)

#: image files the folder reader picks up (anything PIL opens; non-WebDataset formats are re-encoded)
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ------------------------------------------------------------------------------------------------------- inputs
# A record is (source id, image reference, caption or None, skip reason or None). The image reference is a path
# (str) or {"bytes": b, "path": p} from a Hugging Face Image column.
Record = tuple[str, Any, Any, str | None]


def _folder_records(root: Path) -> Iterator[Record]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_SUFFIXES)
    for p in files:
        rel = str(p.relative_to(root))
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            yield rel, str(p), None, "missing_caption"
            continue
        try:
            yield rel, str(p), txt.read_bytes().decode("utf-8"), None
        except UnicodeDecodeError:
            yield rel, str(p), None, "bad_caption"


def _table_rows(path: Path, kind: str, sep: str | None) -> Iterator[tuple[str, dict[str, Any] | None]]:
    with open(path, newline="" if kind == "csv" else None, encoding="utf-8") as f:
        if kind == "csv":
            delimiter = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
            for i, row in enumerate(csv.DictReader(f, delimiter=delimiter)):
                yield f"{path.name}:{i + 2}", row
        else:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                yield f"{path.name}:{i + 1}", row if isinstance(row, dict) else None


def _check_columns(cfg: MakeShardsConfig, path: Path, kind: str) -> None:
    """Fail before writing anything when the first record lacks the configured columns."""
    row = next((r for _, r in _table_rows(path, kind, cfg.csv_separator) if r is not None), None)
    if row is None:
        raise ConfigError(f"{path}: no readable {kind} record in it")
    for col in (cfg.image_column, cfg.caption_column):
        if col not in row:
            raise ConfigError(
                f"{path}: no column {col!r}; columns are {sorted(row)} (set --image-column / --caption-column)"
            )


def _table_records(cfg: MakeShardsConfig, path: Path, kind: str) -> Iterator[Record]:
    for source, row in _table_rows(path, kind, cfg.csv_separator):
        if row is None:
            yield source, None, None, "bad_record"
            continue
        image = row.get(cfg.image_column)
        if not image:
            yield source, None, None, "missing_image"
            continue
        image_path = Path(str(image)).expanduser()
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        yield source, str(image_path), row.get(cfg.caption_column), None


def _load_hf(cfg: MakeShardsConfig):
    import datasets

    path = Path(cfg.input)
    if cfg.hf_builder:
        ds = datasets.load_dataset(cfg.hf_builder, data_dir=str(path), split=cfg.hf_split)
    elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise ConfigError(f"{path}: no split {cfg.hf_split!r}; splits are {sorted(ds)} (set --hf-split)")
            ds = ds[cfg.hf_split]
    else:
        ds = datasets.load_dataset(str(path), split=cfg.hf_split)
    for col in (cfg.image_column, cfg.caption_column):
        if col not in ds.column_names:
            raise ConfigError(
                f"{path}: no column {col!r}; columns are {ds.column_names} (set --image-column / --caption-column)"
            )
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # raw bytes; workers decode
    return ds.select_columns([cfg.image_column, cfg.caption_column])


def _hf_records(cfg: MakeShardsConfig, ds) -> Iterator[Record]:
    for i, row in enumerate(ds):
        image = row[cfg.image_column]
        if image is None or (isinstance(image, dict) and not image.get("bytes") and not image.get("path")):
            yield f"row {i}", None, None, "missing_image"
            continue
        if isinstance(image, (bytes, bytearray)):
            image = {"bytes": bytes(image), "path": None}
        yield f"row {i}", image, row[cfg.caption_column], None


def resolve_input_type(cfg: MakeShardsConfig) -> str:
    """folder, csv, jsonl or hf, from --input-type or from what --input is."""
    path = Path(cfg.input)
    if not path.exists():
        raise ConfigError(f"--input {cfg.input!r} does not exist")
    if cfg.input_type != "auto":
        return cfg.input_type
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        raise ConfigError(
            f"--input {cfg.input!r}: cannot tell its type from '{suffix}'; set --input-type csv|jsonl, or give a folder"
        )
    if cfg.hf_builder or any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
        return "hf"
    return "folder"


def iter_records(cfg: MakeShardsConfig) -> tuple[Iterator[Record], int | None]:
    """The records of the input, in a fixed order, and their number when known."""
    kind = resolve_input_type(cfg)
    path = Path(cfg.input)
    if kind == "folder":
        if not path.is_dir():
            raise ConfigError(f"--input {cfg.input!r} is not a folder")
        n = sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_IMAGE_SUFFIXES)
        return _folder_records(path), n
    if kind in ("csv", "jsonl"):
        if not path.is_file():
            raise ConfigError(f"--input {cfg.input!r} is not a file")
        _check_columns(cfg, path, kind)
        with open(path, encoding="utf-8", errors="replace") as f:
            n = sum(1 for line in f if line.strip()) - (1 if kind == "csv" else 0)
        return _table_records(cfg, path, kind), max(n, 0)
    ds = _load_hf(cfg)
    return _hf_records(cfg, ds), len(ds)


# --------------------------------------------------------------------------------------------------- processing
@dataclass(frozen=True)
class _ImageOptions:
    max_side: int | None
    jpeg_quality: int | None


def _caption_fields(caption: Any) -> tuple[str | None, list[str] | None, str | None]:
    """(txt caption, full caption list or None, skip reason or None)."""
    if isinstance(caption, (list, tuple)):
        captions = [str(c).strip() for c in caption if c is not None and str(c).strip()]
        if not captions:
            return None, None, "empty_caption"
        return captions[0], captions, None
    if caption is None or (isinstance(caption, float) and caption != caption):  # None / NaN from tables
        return None, None, "missing_caption"
    text = str(caption).strip()
    return (text, None, None) if text else (None, None, "empty_caption")


def process_record(record: Record, opts: _ImageOptions) -> tuple[str, Any]:
    """("ok", (members, meta)) or ("skip", reason) for one input; runs in a worker process."""
    source, image_ref, caption, reason = record
    if reason:
        return "skip", reason
    text, captions, reason = _caption_fields(caption)
    if reason:
        return "skip", reason
    try:
        if isinstance(image_ref, dict):
            data = image_ref.get("bytes")
            if data is None:
                data = Path(image_ref["path"]).read_bytes()
        else:
            data = Path(image_ref).read_bytes()
    except OSError:
        return "skip", "missing_image"
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception:  # noqa: BLE001 - any decoder error
        return "skip", "corrupt_image"
    width, height = img.size
    too_big = opts.max_side is not None and max(width, height) > opts.max_side
    if fmt in _FORMAT_EXT and not too_big and opts.jpeg_quality is None:
        ext, out = _FORMAT_EXT[fmt], data
    else:
        if img.mode != "RGB":
            img = (img.convert("RGBA") if img.mode == "P" else img).convert("RGB")
        if too_big:
            scale = opts.max_side / max(width, height)
            img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        quality = opts.jpeg_quality or 95
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else -1)  # full chroma when high
        ext, out = "jpg", buf.getvalue()
        width, height = img.size
    meta: dict[str, Any] = {"source": source, "width": width, "height": height}
    if captions is not None:
        meta["captions"] = captions
    members = {ext: out, "txt": text.encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    return "ok", members


def _process_star(args: tuple[Record, _ImageOptions]) -> tuple[str, Any]:
    return process_record(*args)


# ------------------------------------------------------------------------------------------------------ writing
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """Write one tar shard atomically: each sample is (key, {extension: bytes}), members in the given order."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    os.replace(tmp, path)
    return path


class _ShardSink:
    """Collects samples in order and writes a shard every ``size`` samples."""

    def __init__(self, out_dir: Path, prefix: str, size: int) -> None:
        self.out_dir, self.prefix, self.size = out_dir, prefix, size
        self.pending: list[tuple[str, dict[str, bytes]]] = []
        self.counts: dict[str, int] = {}

    def add(self, key: str, members: dict[str, bytes]) -> None:
        self.pending.append((key, members))
        if len(self.pending) == self.size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.prefix}-{len(self.counts):06d}.tar"
        write_shard(self.out_dir / name, self.pending)
        self.counts[name] = len(self.pending)
        self.pending = []


def make_shards(cfg: MakeShardsConfig) -> dict[str, Any]:
    """Convert ``cfg.input`` into shards; returns the report (also in the metadata and skipped files)."""
    if cfg.index:
        return _index(cfg)
    records, total = iter_records(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        p
        for p in out.glob(f"{cfg.prefix}-*.tar")
        if re.fullmatch(
            rf"{re.escape(cfg.prefix)}-\d{{6}}"
            r"\.tar",
            p.name,
        )
    )
    if existing:
        if not cfg.overwrite:
            raise ConfigError(
                f"{out} already holds {len(existing)} {cfg.prefix}-*.tar shard(s); pass --overwrite to "
                "replace them or choose another --prefix/--output-dir"
            )
        for p in existing:
            p.unlink()
    opts = _ImageOptions(cfg.max_side, cfg.jpeg_quality)
    workers = cfg.workers or os.cpu_count() or 1
    sink = _ShardSink(out, cfg.prefix, cfg.samples_per_shard)
    skipped: Counter[str] = Counter()
    skipped_path = out / f"{cfg.prefix}.skipped.jsonl"
    index = 0
    with (
        open(skipped_path, "w", encoding="utf-8") as skipped_file,
        tqdm(total=total, desc=f"shards {out}/{cfg.prefix}", unit="img", disable=None) as bar,
    ):
        sources: deque[str] = deque()  # filled by the pool's feeder thread, consumed here in the same order

        def tagged() -> Iterator[tuple[Record, _ImageOptions]]:
            for rec in records:
                sources.append(rec[0])
                yield rec, opts

        if workers > 1:
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap(_process_star, tagged(), chunksize=8)
        else:
            pool = None
            results = map(_process_star, tagged())
        try:
            for status, value in results:
                source = sources.popleft()
                if status == "ok":
                    sink.add(f"{index:09d}", value)
                    index += 1
                else:
                    skipped[value] += 1
                    skipped_file.write(json.dumps({"input": source, "reason": value}) + "\n")
                bar.update(1)
                bar.set_postfix(written=index, skipped=sum(skipped.values()))
            sink.flush()
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    report = {
        "input": str(cfg.input),
        "input_type": resolve_input_type(cfg),
        "num_inputs": index + sum(skipped.values()),
        "num_samples": index,
        "num_shards": len(sink.counts),
        "skipped": dict(sorted(skipped.items())),
        "skipped_list": skipped_path.name,
        "options": {
            k: v
            for k, v in asdict(cfg).items()
            if k in ("samples_per_shard", "max_side", "jpeg_quality", "image_column", "caption_column", "hf_split")
        },
    }
    meta = write_shard_metadata(
        out, cfg.prefix, sink.counts, {k: v for k, v in report.items() if k not in ("num_samples", "num_shards")}
    )
    report["metadata"] = str(meta)
    report["shards"] = str(out / f"{cfg.prefix}-{{000000..{len(sink.counts) - 1:06d}}}.tar") if sink.counts else None
    return report


def _index(cfg: MakeShardsConfig) -> dict[str, Any]:
    from webdataset.shardlists import expand_urls

    urls = expand_urls(cfg.input)
    if not urls:
        raise ConfigError(f"--input {cfg.input!r} names no shard")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise ConfigError(f"--index: {len(missing)} shard(s) do not exist (first: {missing[0]})")
    out = Path(cfg.output_dir) if cfg.output_dir else Path(local[0]).parent if local else Path(".")
    meta = index_shards(tqdm(urls, desc="counting samples", unit="shard", disable=None), out, cfg.prefix)
    data = json.loads(meta.read_text())
    return {"metadata": str(meta), "num_samples": data["num_samples"], "num_shards": data["num_shards"]}
