"""scripts/make_shards.py and its library: image folder, JSONL and Hugging Face datasets round-trip through shards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.loader import build_eval_samples, build_train_loader
from data_pipelines.writer import MakeShardsConfig, make_shards
from tests.test_data_pipeline import keys_transform, write_test_shards
from vlp.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def picture(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    """A smooth photo-like test image: colour gradients plus soft noise."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    base = c0 + np.einsum("hw,c->hwc", xx, c1 - c0) + np.einsum("hw,c->hwc", yy, c2 - c0) * 0.5
    base = base + rng.normal(0, 3, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert(mode)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def raw_members(shard_spec: str) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with tarfile directly."""
    import braceexpand

    out: dict[str, dict[str, bytes]] = {}
    for path in braceexpand.braceexpand(shard_spec):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def by_source(shard_spec: str) -> dict[str, dict]:
    return {s["json"]["source"]: s for s in build_eval_samples(shard_spec)}


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i.convert("RGB"), dtype=np.float32) for i in (a, b))
    return float(np.abs(x - y).mean())


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    files = {
        "a.jpg": (encoded(picture(1), "JPEG", quality=90), "a dog on a sofa"),
        "sub/b.png": (encoded(picture(2, mode="RGBA"), "PNG"), "ünïcode: 猫 and\nsecond line"),
        "c.webp": (encoded(picture(3), "WEBP", quality=90), "a webp image"),
        "d.bmp": (encoded(picture(4), "BMP"), "bitmaps are re-encoded"),
        "e.jpg": (b"\xff\xd8\xff\xe0 not really a jpeg", "corrupt image"),
        "f.jpg": (encoded(picture(5), "JPEG"), None),  # no caption file
        "g.jpg": (encoded(picture(6), "JPEG"), "  \n "),  # empty caption
    }
    for name, (data, caption) in files.items():
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return root, files


def test_image_folder_round_trip(image_folder, tmp_path):
    root, files = image_folder
    cfg = MakeShardsConfig(
        input=str(root), output_dir=str(tmp_path / "out"), prefix="photos", samples_per_shard=2, workers=2
    )
    report = make_shards(cfg)
    assert report["num_samples"] == 4 and report["num_shards"] == 2 and report["input_type"] == "folder"
    assert report["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1}
    skipped = [json.loads(line) for line in (tmp_path / "out" / "photos.skipped.jsonl").read_text().splitlines()]
    assert {(s["input"], s["reason"]) for s in skipped} == {
        ("e.jpg", "corrupt_image"),
        ("f.jpg", "missing_caption"),
        ("g.jpg", "empty_caption"),
    }
    meta = json.loads((tmp_path / "out" / "photos.meta.json").read_text())
    assert meta["num_samples"] == 4 and [s["num_samples"] for s in meta["shards"]] == [2, 2]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"photos-000000.tar": 2, "photos-000001.tar": 2}
    samples = by_source(report["shards"])
    assert sorted(samples) == ["a.jpg", "c.webp", "d.bmp", "sub/b.png"]
    for source, s in samples.items():
        data, caption = files[source]
        assert s["text"] == caption.strip()  # captions exactly
        original = Image.open(io.BytesIO(data))
        if source == "d.bmp":  # re-encoded as JPEG q95
            assert mean_abs_diff(s["image"], original) < 3.0
        else:  # copied byte for byte
            assert np.array_equal(np.asarray(s["image"]), np.asarray(original.convert("RGB")))
    raw = raw_members(report["shards"])
    copied = {json.loads(m["json"])["source"]: m for m in raw.values()}
    assert copied["a.jpg"]["jpg"] == files["a.jpg"][0] and copied["sub/b.png"]["png"] == files["sub/b.png"][0]
    assert "jpg" in copied["d.bmp"]
    assert build_train_loader(report["shards"], keys_transform, 2, workers=0).num_samples == 4  # from metadata


def test_rerun_gives_identical_shards_and_refuses_to_clobber(image_folder, tmp_path):
    root, _ = image_folder

    def digests(out, workers, overwrite=False):
        make_shards(
            MakeShardsConfig(
                input=str(root),
                output_dir=str(out),
                samples_per_shard=3,
                workers=workers,
                max_side=32,
                overwrite=overwrite,
            )
        )
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).glob("*.tar"))}

    a = digests(tmp_path / "a", workers=1)
    assert len(a) == 2 and a == digests(tmp_path / "b", workers=2) == digests(tmp_path / "a", 2, overwrite=True)
    with pytest.raises(ConfigError, match="already holds 2 shard-\\*.tar"):
        digests(tmp_path / "a", workers=1)


def test_jsonl_round_trip_through_the_script(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "img").mkdir(parents=True)
    rows, originals = [], {}
    for i in range(5):
        img = picture(10 + i, size=(48, 36))
        (data_dir / "img" / f"{i}.png").write_bytes(encoded(img, "PNG"))
        originals[f"img/{i}.png"] = img
        rows.append(json.dumps({"path": f"img/{i}.png", "text": f'caption number {i} — "quoted"'}))
    rows.insert(2, "{not json")
    rows.append(json.dumps({"path": "img/missing.png", "text": "its file does not exist"}))
    jsonl = data_dir / "pairs.jsonl"
    jsonl.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "make_shards.py"),
        "--input",
        str(jsonl),
        "--output-dir",
        str(out),
        "--prefix",
        "pairs",
        "--image-column",
        "path",
        "--caption-column",
        "text",
        "--samples-per-shard",
        "4",
        "--max-side",
        "24",
        "--jpeg-quality",
        "92",
        "--workers",
        "2",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["num_samples"] == 5 and report["num_shards"] == 2
    assert report["skipped"] == {"bad_record": 1, "missing_image": 1}
    samples = by_source(report["shards"])
    assert len(samples) == 5
    for i in range(5):
        s = next(v for k, v in samples.items() if k == f"pairs.jsonl:{i + 1 + (i >= 2)}")
        assert s["text"] == f'caption number {i} — "quoted"'  # captions exactly
        assert s["image"].size == (24, 18) and (s["json"]["width"], s["json"]["height"]) == (24, 18)
        resized = originals[f"img/{i}.png"].resize((24, 18), Image.Resampling.LANCZOS)
        assert mean_abs_diff(s["image"], resized) < 4.0  # images up to the JPEG re-encode


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_round_trip_with_named_columns_and_a_progress_bar_of_inputs(tmp_path, monkeypatch, suffix):
    import csv

    import data_pipelines.writer as writer

    bars = []
    real_tqdm = writer.tqdm

    def recording_tqdm(*args, **kwargs):  # shown (not disabled for want of a terminal) so that it counts
        bars.append(real_tqdm(*args, **{**kwargs, "disable": False}))
        return bars[-1]

    monkeypatch.setattr(writer, "tqdm", recording_tqdm)
    (tmp_path / "img").mkdir()
    images = {}
    for i in range(4):
        images[f"img/{i}.jpg"] = encoded(picture(30 + i), "JPEG", quality=90)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(images[f"img/{i}.jpg"])
    captions = ["a caption, with a comma", 'and "quotes"', "tab-free ünïcode", "  padded  "]
    rows = [{"file": f"img/{i}.jpg", "alt": captions[i]} for i in range(4)]
    rows.insert(1, {"file": "", "alt": "no image path"})
    rows.insert(3, {"file": "img/2.jpg", "alt": ""})
    table = tmp_path / f"pairs{suffix}"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["file", "alt"], delimiter="\t" if suffix == ".tsv" else ",")
        w.writeheader()
        w.writerows(rows)
    report = make_shards(
        MakeShardsConfig(
            input=str(table),
            output_dir=str(tmp_path / "out"),
            image_column="file",
            caption_column="alt",
            samples_per_shard=3,
            workers=1,
        )
    )
    assert report["input_type"] == "csv" and report["num_samples"] == 4 and report["num_shards"] == 2
    assert report["skipped"] == {"empty_caption": 1, "missing_image": 1}
    raw = {json.loads(m["json"])["source"]: m for m in raw_members(report["shards"]).values()}
    # rows are numbered as lines of the file (header = line 1)
    expected = {f"pairs{suffix}:{line}": i for i, line in enumerate((2, 4, 6, 7))}
    assert sorted(raw) == sorted(expected)
    for source, i in expected.items():
        assert raw[source]["txt"].decode() == captions[i].strip()  # captions exactly (stripped)
        assert raw[source]["jpg"] == images[f"img/{i}.jpg"]  # images byte for byte
    bar = next(b for b in bars if b.desc.startswith("shards "))
    assert (bar.unit, bar.total, bar.n) == ("img", 6, 6)  # one tick per input row, skipped ones included


def test_script_reports_user_mistakes_in_one_line(tmp_path, capsys):
    import runpy

    from vlp.cli import run_cli

    main = runpy.run_path(str(ROOT / "scripts" / "make_shards.py"), run_name="make_shards")["main"]
    table = tmp_path / "t.csv"
    table.write_text("file,caption\na.jpg,hello\n")
    for argv, fragment in (
        (["--input", str(table), "--output-dir", str(tmp_path / "o")], "no column 'image'"),
        (["--output-dir", "x"], "--input is required"),
        (["--input", str(tmp_path / "nope"), "--output-dir", "x"], "does not exist"),
        (["--input", str(table), "--output-dir", "x", "--jpeg-quality", "0"], "--jpeg-quality"),
    ):
        with pytest.raises(SystemExit) as code:
            run_cli(main, argv)
        err = capsys.readouterr().err
        assert code.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.tar"))


def test_hugging_face_datasets_round_trip(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    images = [picture(20 + i, size=(30 + i, 20)) for i in range(6)]
    captions = [f"hf caption {i}" for i in range(5)] + [""]
    ds = datasets.Dataset.from_dict(
        {"image": images, "caption": captions, "other": list(range(6))},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string"), "other": datasets.Value("int32")}
        ),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    report = make_shards(
        MakeShardsConfig(input=str(tmp_path / "saved"), output_dir=str(tmp_path / "o1"), samples_per_shard=4, workers=2)
    )
    assert report["input_type"] == "hf" and report["num_samples"] == 5 and report["skipped"] == {"empty_caption": 1}
    samples = by_source(report["shards"])
    for i in range(5):
        s = samples[f"row {i}"]
        assert s["text"] == captions[i] and np.array_equal(np.asarray(s["image"]), np.asarray(images[i]))

    folder = tmp_path / "imagefolder"  # a local load_dataset builder: imagefolder with metadata.jsonl
    folder.mkdir()
    for i in range(3):
        images[i].save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"folder {i}"}) + "\n" for i in range(3))
    )
    report = make_shards(
        MakeShardsConfig(
            input=str(folder),
            output_dir=str(tmp_path / "o2"),
            hf_builder="imagefolder",
            caption_column="text",
            workers=1,
        )
    )
    samples = {s["text"]: s for s in build_eval_samples(report["shards"])}
    assert sorted(samples) == ["folder 0", "folder 1", "folder 2"]
    for i in range(3):
        assert np.array_equal(np.asarray(samples[f"folder {i}"]["image"]), np.asarray(images[i]))


def test_index_writes_metadata_for_existing_shards(tmp_path):
    spec, keys = write_test_shards(tmp_path, [9, 4, 11], prefix="laion", metadata=False)
    report = make_shards(MakeShardsConfig(input=spec, index=True, prefix="laion"))
    assert report["num_samples"] == 24 and report["num_shards"] == 3
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "laion-000000.tar": 9,
        "laion-000001.tar": 4,
        "laion-000002.tar": 11,
    }
    assert build_train_loader(spec, keys_transform, 4, workers=0).num_samples == 24
    with pytest.raises(ConfigError, match="--input is required"):
        MakeShardsConfig(output_dir="x")
