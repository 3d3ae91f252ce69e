"""Shared helpers for the evaluation tests: one set of labelled images written as an image folder, WebDataset
shards and a Hugging Face dataset (same images, same order, same class indices), and a fixed tiny model."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from data_pipelines.synthetic import SHAPES

CLASSES = sorted(SHAPES)  # the image folder's class order (sorted sub-folders)


@dataclass
class LabelledCopies:
    folder: Path
    shards: str
    hf_dir: Path
    classnames_file: Path
    keys: list[str]
    labels: list[int]
    captions: list[list[str]]
    jpegs: list[bytes]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_labelled_copies(eval_shards: str, root: Path) -> LabelledCopies:
    """The synthetic held-out images labelled by shape, sorted by (class, key), in three formats.

    Every image also gets two captions in its json (its own caption and a shape/colour one), for retrieval.
    """
    import datasets

    samples = []
    for s in wds.DataPipeline(wds.SimpleShardList(eval_shards), wds.tarfile_to_samples()):
        labels = json.loads(s["json"])
        caps = [s["txt"].decode(), f"a {labels['color']} {labels['shape']}"]
        samples.append((CLASSES.index(labels["shape"]), s["__key__"], s["jpg"], caps))
    samples.sort(key=lambda x: (x[0], x[1]))
    folder = root / "folder"
    paths = []
    for idx, key, jpg, _ in samples:
        d = folder / CLASSES[idx]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.jpg").write_bytes(jpg)
        paths.append(str(d / f"{key}.jpg"))
    shard_dir = root / "wds"
    shard_dir.mkdir(parents=True)
    half = len(samples) // 2
    for n, part in enumerate((samples[:half], samples[half:])):
        with tarfile.open(shard_dir / f"labelled-{n:06d}.tar", "w") as tar:
            for idx, key, jpg, caps in part:
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.cls", str(idx).encode())
                _add(tar, f"{key}.json", json.dumps({"shape": CLASSES[idx], "captions": caps}).encode())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"image": paths, "label": [s[0] for s in samples]}, features=features)
    ds = ds.cast_column("image", datasets.Image())
    hf_dir = root / "hf"
    ds.save_to_disk(str(hf_dir))
    classnames_file = root / "classnames.txt"
    classnames_file.write_text("\n".join(CLASSES) + "\n")
    return LabelledCopies(
        folder,
        str(shard_dir / "labelled-{000000..000001}.tar"),
        hf_dir,
        classnames_file,
        [s[1] for s in samples],
        [s[0] for s in samples],
        [s[3] for s in samples],
        [s[2] for s in samples],
    )


def tiny_model(loss: str = "siglip", seed: int = 0):
    """A fixed, randomly initialised tiny dual tower (the same weights for the same seed)."""
    from vlp.config import LossConfig
    from vlp.model import build_model

    torch.manual_seed(seed)
    model = build_model("tiny", LossConfig(name=loss))
    model.eval()
    return model
