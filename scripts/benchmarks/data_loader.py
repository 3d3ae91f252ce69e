#!/usr/bin/env python
"""Data loading throughput: vlp's WebDataset pipeline against open_clip_train's ``get_wds_dataset``.

Both read the same shards (written here once: photo-like JPEGs of random size, captions, metadata) with the same
image transform (the model preset's open_clip train transform), the same tokenizer, batch size and number of
DataLoader workers, in one process, in ``--repeats`` interleaved rounds; each round runs both, and the one that goes
first alternates from round to round (vlp first in rounds 0, 2, ...). Each run builds a fresh loader, discards
``--warmup`` batches (worker start, shuffle fill), times the next ``--batches`` batches of one epoch and stops its
workers before the next run starts. Prints one JSON document: samples/s per run, the median of each, their ratio
(vlp / open_clip) overall and per round, the settings, and the machine's 1-minute load average at the start of
every round (CPU-bound: other processes on the machine slow both alike, which is why the runs interleave).

open_clip_train (``open_clip_train.data.get_wds_dataset``) ships inside the ``open_clip_torch`` wheel, which is a
runtime dependency already, so nothing extra is installed for this script; its optional ``[training]`` extras are
not needed for the data loader. A small compatibility shim (:func:`open_clip_compat`) lets it run on the installed
webdataset.

    python scripts/benchmarks/data_loader.py                                  # 2 workers, vit-b-16 transforms
    python scripts/benchmarks/data_loader.py --workers 8 --batch-size 128 --num-samples 8000
    python scripts/benchmarks/data_loader.py --mode resampled
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def photo_like(rng, width: int, height: int):
    """A smooth, JPEG-compressible image with some texture (decodes like a photo of that size)."""
    import numpy as np
    from PIL import Image

    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    arr = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_benchmark_shards(
    out: Path, num_samples: int, shard_size: int, min_side: int, max_side: int, seed: int = 0
) -> str:
    """Shards of photo-like JPEGs (q90, shorter side in [min_side, max_side]) with captions; reused if present."""
    import numpy as np

    from data_pipelines.metadata import write_shard_metadata
    from data_pipelines.writer import write_shard

    num_shards = -(-num_samples // shard_size)
    spec = str(out / f"bench-{{000000..{num_shards - 1:06d}}}.tar")
    if (out / "bench.meta.json").is_file():
        return spec
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    words = ["a", "photo", "of", "the", "red", "blue", "small", "dog", "cat", "house", "tree", "car", "on", "beach"]
    for s in range(num_shards):
        rng = np.random.default_rng([seed, s])
        samples = []
        for i in range(min(shard_size, num_samples - s * shard_size)):
            short = int(rng.integers(min_side, max_side + 1))
            long = int(short * rng.uniform(1.0, 1.6))
            w, h = (long, short) if rng.random() < 0.7 else (short, long)
            buf = io.BytesIO()
            photo_like(rng, w, h).save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(words, size=int(rng.integers(5, 14))))
            samples.append(
                (
                    f"{s:06d}{i:06d}",
                    {"jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps({"w": w, "h": h}).encode()},
                )
            )
        name = f"bench-{s:06d}.tar"
        write_shard(out / name, samples)
        counts[name] = len(samples)
    write_shard_metadata(out, "bench", counts)
    return spec


class Transform:
    """vlp's per-sample transform for the contrastive objective: image tensor + token ids (picklable)."""

    def __init__(self, image_transform, tokenizer) -> None:
        self.image_transform, self.tokenizer = image_transform, tokenizer

    def __call__(self, sample: dict) -> dict:
        return {"image": self.image_transform(sample["image"]), "text": self.tokenizer([sample["text"]])[0]}


def time_batches(loader, warmup: int, batches: int, batch_size: int) -> float:
    it = iter(loader)
    try:
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            b = next(it)
            n += len(b[0]) if isinstance(b, (list, tuple)) else len(b["image"])
        dt = time.perf_counter() - t0
    finally:
        if hasattr(it, "_shutdown_workers"):  # a DataLoader iterator: no workers left running into the next run
            it._shutdown_workers()
    assert n == batches * batch_size
    return n / dt


def run_vlp(spec, tf, tok, args) -> float:
    from data_pipelines.loader import build_train_loader

    stream = build_train_loader(
        spec,
        Transform(tf, tok),
        args.batch_size,
        seed=0,
        workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        mode=args.mode,
    )
    try:
        return time_batches(stream, args.warmup, args.batches, args.batch_size)
    finally:
        stream.close()


def open_clip_compat() -> None:
    """Let open_clip_train's reader run on webdataset >= 0.2.90.

    webdataset's ``tar_file_expander`` now yields an empty dict at the end of each shard, which open_clip_train's
    ``group_by_keys_nothrow`` does not expect (KeyError: 'fname'). We give it the same webdataset function with
    that end-of-shard marker turned off; nothing else about its pipeline changes.
    """
    import functools

    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def run_open_clip(spec, tf, tok, args) -> float:
    from open_clip_train.data import get_wds_dataset

    open_clip_compat()

    ns = SimpleNamespace(
        train_data=spec,
        val_data=None,
        dataset_resampled=args.mode == "resampled",
        train_num_samples=None,
        train_data_upsampling_factors=None,
        batch_size=args.batch_size,
        workers=args.workers,
        world_size=1,
        seed=0,
    )
    info = get_wds_dataset(ns, tf, is_train=True, epoch=0, tokenizer=tok)
    loader = info.dataloader
    try:
        return time_batches(loader, args.warmup, args.batches, args.batch_size)
    finally:
        del loader, info


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit-b-16-clip", help="preset whose train transform and tokenizer are used")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--min-side", type=int, default=320, help="shorter image side, drawn in [min, max]")
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batches", type=int, default=40, help="timed batches per run (within one epoch)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds (each runs both loaders; the one that goes first alternates)",
    )
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="vlp's shuffle window")
    p.add_argument("--mode", choices=["epoch", "resampled"], default="epoch")
    p.add_argument("--data-dir", default=None, help="where the benchmark shards are cached")
    args = p.parse_args(argv)
    if (args.warmup + args.batches) * args.batch_size > args.num_samples:
        p.error("--num-samples must cover (warmup + batches) x batch-size samples (one epoch is measured)")

    import open_clip
    import torch
    import webdataset

    from vlp.model import build_tokenizer, build_transforms, load_preset

    torch.set_num_threads(1)
    preset = load_preset(args.model)
    tf = build_transforms(preset, is_train=True)
    tok = build_tokenizer(preset)
    base = Path(args.data_dir) if args.data_dir else Path(os.environ.get("VLP_CACHE", Path.home() / ".cache/vlp"))
    data = base / (f"bench-shards-n{args.num_samples}-s{args.shard_size}-{args.min_side}-{args.max_side}")
    t0 = time.perf_counter()
    spec = write_benchmark_shards(data, args.num_samples, args.shard_size, args.min_side, args.max_side)
    write_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {"vlp": [], "open_clip": []}
    round_load: list[float] = []
    runners = {"vlp": run_vlp, "open_clip": run_open_clip}
    for r in range(args.repeats):
        round_load.append(round(os.getloadavg()[0], 2))
        order = ["vlp", "open_clip"] if r % 2 == 0 else ["open_clip", "vlp"]
        for name in order:
            runs[name].append(runners[name](spec, tf, tok, args))
        print(
            f"round {r} ({order[0]} first, load {round_load[-1]}): vlp {runs['vlp'][-1]:.1f} samples/s, "
            f"open_clip {runs['open_clip'][-1]:.1f} samples/s",
            file=sys.stderr,
        )
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "benchmark": "data_loader",
        "mode": args.mode,
        "model_transform": args.model,
        "image_size": preset.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "num_samples": args.num_samples,
        "shard_size": args.shard_size,
        "image_shorter_side": [args.min_side, args.max_side],
        "warmup_batches": args.warmup,
        "timed_batches": args.batches,
        "repeats": args.repeats,
        "samples_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "median_samples_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_vlp_over_open_clip": round(med["vlp"] / med["open_clip"], 3),
        "ratio_per_repeat": [round(a / b, 3) for a, b in zip(runs["vlp"], runs["open_clip"])],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_1min_per_round": round_load,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "webdataset": webdataset.__version__,
            "open_clip": open_clip.__version__,
        },
        "shard_write_s": round(write_s, 1),
        "shards": spec,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
