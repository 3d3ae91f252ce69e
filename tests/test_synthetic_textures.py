"""The second embedded synthetic set (--data.synthetic textures): deterministic, captions agree with labels, classes
look different, and a run on it trains and evaluates its own label families (SSL monitor included)."""

import hashlib
import itertools
import json

import numpy as np
import pytest

from data_pipelines import synthetic_textures as tex
from data_pipelines.loader import build_eval_samples
from data_pipelines.synthetic import ensure_synthetic_data, generators, write_split
from vlp.config import PRETRAIN_ALIASES, ConfigError, PretrainConfig, parse_cli


@pytest.fixture(scope="module")
def textures_data(tmp_path_factory):
    return ensure_synthetic_data(
        tmp_path_factory.mktemp("tex"), num_train=64, num_eval=40, seed=0, shard_size=32, kind="textures"
    )


def test_same_seed_same_bytes_and_a_cache_directory_per_set(tmp_path, textures_data):
    a, b = tex.render_sample(np.random.default_rng(7)), tex.render_sample(np.random.default_rng(7))
    assert a[1:] == b[1:] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    render = generators()["textures"].render_sample
    for d in ("a", "b"):
        write_split(tmp_path / d, "train", 20, seed=3, shard_size=10, render=render)
    for i in range(2):
        ha = hashlib.sha256((tmp_path / "a" / f"train-{i:06d}.tar").read_bytes()).hexdigest()
        hb = hashlib.sha256((tmp_path / "b" / f"train-{i:06d}.tar").read_bytes()).hexdigest()
        assert ha == hb
    # the set's name is in its cache directory; the demo set keeps its old name so existing caches stay valid
    assert textures_data.root.name == "textures-v1-seed0-train64-eval40-shard32"
    shapes = ensure_synthetic_data(tmp_path / "c", num_train=4, num_eval=2, shard_size=4)
    assert shapes.root.name == "v2-seed0-train4-eval2-shard4" and "shape" in shapes.class_families


def test_captions_name_the_object_and_only_the_true_attributes():
    rng = np.random.default_rng(0)
    named = {f: 0 for f in tex.CLASS_FAMILIES}
    n = 600
    for _ in range(n):
        img, caption, labels = tex.render_sample(rng)
        assert img.size == (64, 64) and img.mode == "RGB"
        assert set(labels) == set(tex.CLASS_FAMILIES) and all(labels[f] in tex.CLASS_FAMILIES[f] for f in labels)
        said = tex.caption_mentions(caption)
        assert said["object"] == {labels["object"]}, caption
        for fam in ("pattern", "hue", "count"):
            assert said[fam] <= {labels[fam]}, (caption, labels)
            named[fam] += bool(said[fam])
        # plural object noun exactly when there are several (fish is its own plural)
        words = caption.lower().replace(",", " ").replace(".", " ").split()
        if labels["object"] != "fish":
            assert (tex.PLURALS[labels["object"]] in words) == (
                labels["count"] != "one" and labels["object"] not in words
            )
    # every attribute besides the object is in some captions, none in most: hue alone cannot match most pairs
    for fam in ("pattern", "hue", "count"):
        assert 0.2 < named[fam] / n < 0.5, (fam, named[fam])


def test_captions_fit_the_tiny_text_context():
    """The tiny presets' text towers read 16 tokens (with start and end): the longest caption must fit."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()

    def longest(words):  # BPE works word by word, so the longest filling of each slot gives the longest caption
        return max(words, key=lambda w: len(tok.encode(w)))

    fill = {
        "tag": longest(tex.OBJECTS),
        "obj": longest(tex.OBJECTS + list(tex.PLURALS.values())),
        "Obj": "an " + longest(tex.OBJECTS + list(tex.PLURALS.values())),
        "pat": longest(tex.PATTERNS),
        "patn": longest(list(tex.PATTERN_NOUNS.values())),
        "hue": longest(list(tex.HUES)),
        "count": longest(tex.COUNTS),
    }
    longest = max(len(tok.encode(t.format(**fill))) for t in tex.CAPTION_TEMPLATES)
    assert 8 <= longest <= 14


def test_classes_look_different():
    s = tex.IMAGE_SIZE
    masks = {o: np.asarray(tex._object_mask(o, s / 2, s / 2, 18, False)) > 0 for o in tex.OBJECTS}
    for a, b in itertools.combinations(tex.OBJECTS, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.75, (a, b, iou)
    pats = {p: tex._pattern(p, np.random.default_rng(1)) for p in tex.PATTERNS}
    for p, m in pats.items():
        assert 0.25 < m.mean() < 0.75, (p, m.mean())  # ink and gaps both visible
    for a, b in itertools.combinations(tex.PATTERNS, 2):
        assert (pats[a] == pats[b]).mean() < 0.8, (a, b)
    hues = np.array(list(tex.HUES.values()), dtype=float)
    dist = np.abs(hues[:, None] - hues[None]).sum(-1)
    assert dist[~np.eye(len(hues), dtype=bool)].min() > 100
    # rendered images: the mean pixel differs by hue (same-hue images closer than different-hue ones)
    rng = np.random.default_rng(3)
    by_hue: dict[str, list[np.ndarray]] = {}
    for _ in range(120):
        img, _, labels = tex.render_sample(rng)
        by_hue.setdefault(labels["hue"], []).append(np.asarray(img, dtype=float))
    assert (
        set(by_hue) == set(tex.HUES)
        and len({tuple(np.mean(v, axis=0).mean((0, 1)).round()) for v in by_hue.values()}) == 6
    )


def test_invalid_set_name_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_cli(PretrainConfig, ["--data.synthetic", "stripes"], PRETRAIN_ALIASES)
    assert "data.synthetic: invalid value 'stripes'; valid: shapes, textures, silhouettes" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"invalid value 'stripes'; valid: shapes, textures, silhouettes$"):
        ensure_synthetic_data(tmp_path, 4, 2, kind="stripes")


def test_held_out_split_reads_back_and_feeds_the_ssl_monitor(textures_data):
    from vlp.model import build_transforms, load_preset
    from vlp.objectives import run_config_class
    from vlp.ssl.monitor import RepresentationMonitor

    samples = list(build_eval_samples(textures_data.eval_shards))
    assert len(samples) == 40 and all(
        tex.caption_mentions(s["text"])["object"] == {s["json"]["object"]} for s in samples
    )
    meta = json.loads((textures_data.root / "classes.json").read_text())
    assert meta["kind"] == "textures" and meta["class_families"] == tex.CLASS_FAMILIES
    assert textures_data.templates == tex.PROMPT_TEMPLATES and set(tex.PROMPT_TEMPLATES) == set(tex.CLASS_FAMILIES)
    cfg = parse_cli(run_config_class(), ["--ssl.monitor.every", "5"], PRETRAIN_ALIASES)
    mon = RepresentationMonitor.from_config(
        cfg, textures_data.eval_shards, build_transforms(load_preset("tiny"), False), True
    )
    # the k-NN classes default to the family every caption names: the object
    assert mon is not None and len(mon.images) == 40 and set(mon.classes) <= set(tex.OBJECTS) and len(mon.classes) >= 6


def test_pretrain_on_textures_evaluates_its_families(tmp_path):
    """A 2-step run through the script's command line; its summary and eval_zeroshot's resolution use textures."""
    from vlp.checkpointing import load_trained_model
    from vlp.eval.during_training import run_heldout_data
    from vlp.train.trainer import run_pretraining

    out = tmp_path / "run"
    args = ["--data.synthetic", "textures", "--loss", "clip", "--steps", "2", "--batch-size", "8", "--workers", "0"]
    args += ["--output-dir", str(out), "--data.synthetic_dir", str(tmp_path / "syn"), "--warmup-steps", "1"]
    args += ["--data.synthetic_train_samples", "64", "--data.synthetic_eval_samples", "24"]
    run_pretraining(parse_cli(PretrainConfig, args, PRETRAIN_ALIASES))
    summary = json.loads((out / "summary.json").read_text())
    for fam, n in (("object", 8), ("pattern", 6), ("hue", 6), ("count", 3)):
        assert summary[f"zeroshot/{fam}/chance"] == pytest.approx(1 / n)
        assert 0.0 <= summary[f"zeroshot/{fam}/top1"] <= 1.0
    assert summary["zeroshot/num_images"] == 24 and not any(k.startswith("zeroshot/shape/") for k in summary)
    assert [p.name for p in (tmp_path / "syn").iterdir()] == ["textures-v1-seed0-train64-eval24-shard2000"]
    _, saved = load_trained_model(out)
    assert saved.data.synthetic == "textures"
    shards, families, templates = run_heldout_data(saved)
    assert "textures-v1" in shards and families == tex.CLASS_FAMILIES and templates == tex.PROMPT_TEMPLATES


def test_ssl_run_on_textures_monitors_the_object(tmp_path):
    """A 2-step SimCLR run on the textures set: its k-NN monitor reads the object family of the held-out split."""
    from vlp.objectives import run_config_class
    from vlp.train.metrics import read_metrics
    from vlp.train.trainer import run_pretraining

    out = tmp_path / "ssl"
    args = ["--objective", "simclr", "--data.synthetic", "textures", "--steps", "2", "--batch-size", "8"]
    args += ["--workers", "0", "--output-dir", str(out), "--data.synthetic_dir", str(tmp_path / "syn")]
    args += ["--data.synthetic_train_samples", "32", "--data.synthetic_eval_samples", "24", "--warmup-steps", "1"]
    args += ["--ssl.monitor.every", "2", "--eval.zeroshot", "false"]
    run_pretraining(parse_cli(run_config_class(), args, PRETRAIN_ALIASES))
    knn = [r for r in read_metrics(out / "metrics.jsonl") if "monitor/knn_chance" in r]
    (eval_dir,) = (tmp_path / "syn").glob("textures-v1-*")
    objects = {s["json"]["object"] for s in build_eval_samples(str(eval_dir / "eval-000000.tar"))}
    assert len(knn) == 1 and knn[0]["monitor/knn_chance"] == pytest.approx(1 / len(objects)) and len(objects) >= 5
