"""The embedded synthetic data: deterministic, captions agree with labels, readable as WebDataset shards."""

import hashlib
import json
import multiprocessing as mp

import numpy as np
import webdataset as wds

from data_pipelines.loader import build_eval_samples
from data_pipelines.synthetic import (
    CLASS_FAMILIES,
    PROMPT_TEMPLATES,
    ensure_synthetic_data,
    render_sample,
    write_split,
)


def test_render_is_deterministic_and_caption_mentions_labels():
    a = [render_sample(np.random.default_rng(5)) for _ in range(1)][0]
    b = [render_sample(np.random.default_rng(5)) for _ in range(1)][0]
    assert a[1] == b[1] and a[2] == b[2] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    rng = np.random.default_rng(0)
    for _ in range(200):
        img, caption, labels = render_sample(rng)
        assert img.size == (64, 64) and labels["shape"] in caption
        for fam, value in labels.items():
            assert value in CLASS_FAMILIES[fam]
            if value in caption.split(" ") and fam != "shape":
                assert value in caption


def test_shards_are_byte_identical_for_a_seed(tmp_path):
    write_split(tmp_path / "a", "train", 30, seed=3, shard_size=10)
    write_split(tmp_path / "b", "train", 30, seed=3, shard_size=10)
    for i in range(3):
        ha = hashlib.sha256((tmp_path / "a" / f"train-{i:06d}.tar").read_bytes()).hexdigest()
        hb = hashlib.sha256((tmp_path / "b" / f"train-{i:06d}.tar").read_bytes()).hexdigest()
        assert ha == hb


def test_fixture_shards_read_back(synthetic_data):
    samples = list(build_eval_samples(synthetic_data.eval_shards))
    assert len(samples) == 100
    assert all(s["image"].size == (64, 64) and s["text"] and s["json"]["shape"] in s["text"] for s in samples)
    raw = next(iter(wds.WebDataset(synthetic_data.train_shards, shardshuffle=False)))
    assert set(raw) >= {"__key__", "jpg", "txt", "json"}
    assert json.loads(raw["json"])["color"] in CLASS_FAMILIES["color"]
    assert set(PROMPT_TEMPLATES) == set(CLASS_FAMILIES) == set(synthetic_data.class_families)
    assert sum(1 for _ in wds.WebDataset(synthetic_data.train_shards, shardshuffle=False)) == 400


def _ensure_small(cache_dir: str) -> str:
    return str(ensure_synthetic_data(cache_dir, num_train=300, num_eval=50, shard_size=100).root)


def test_processes_starting_together_share_one_generation(tmp_path):
    """Two runs (or the ranks of one) started at once on a fresh cache: one writes, the others wait for it, and
    every shard is the one a lone process writes (they used to write one temporary file each into the same path)."""
    with mp.get_context("spawn").Pool(3) as pool:
        roots = pool.map(_ensure_small, [str(tmp_path / "shared")] * 3)
    assert len(set(roots)) == 1
    lone = ensure_synthetic_data(tmp_path / "lone", num_train=300, num_eval=50, shard_size=100).root
    for name in ["train-000000.tar", "train-000001.tar", "train-000002.tar", "eval-000000.tar", "classes.json"]:
        assert (lone / name).read_bytes() == (tmp_path / "shared" / lone.name / name).read_bytes(), name
    assert not list((tmp_path / "shared" / lone.name).glob("*.tmp"))
