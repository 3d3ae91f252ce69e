"""The training data pipeline on shards written here: exact epoch split over ranks x workers, resampling,
source weights, faults skipped and counted, pickle members never loaded, a clear error when nothing is usable."""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.faults import DataError
from data_pipelines.loader import build_eval_samples, build_train_loader
from data_pipelines.metadata import shard_counts, write_shard_metadata
from data_pipelines.shardlists import EpochPlan, ResamplePlan, parse_sources
from data_pipelines.synthetic import render_sample
from data_pipelines.writer import write_shard
from tests.distributed_harness import run_distributed
from vlp.config import ConfigError

_IMAGES: list[bytes] = []


def jpeg_bytes(i: int) -> bytes:
    """One of 16 small synthetic JPEGs (drawn once per process)."""
    if not _IMAGES:
        rng = np.random.default_rng(0)
        for _ in range(16):
            buf = io.BytesIO()
            render_sample(rng)[0].save(buf, format="JPEG", quality=90)
            _IMAGES.append(buf.getvalue())
    return _IMAGES[i % 16]


def write_test_shards(
    root: Path,
    sizes: list[int],
    prefix: str = "t",
    metadata: bool = True,
    extra: dict[tuple[int, int], dict[str, bytes]] | None = None,
) -> tuple[str, list[str]]:
    """Shards ``prefix-000000.tar``... with ``sizes[i]`` samples (jpg + txt); returns (brace spec, all keys).

    ``extra[(shard, i)]`` replaces/adds members of one sample (a value of None removes the member).
    """
    root.mkdir(parents=True, exist_ok=True)
    keys, counts = [], {}
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            key = f"{prefix}{s:03d}_{i:04d}"
            members = {"jpg": jpeg_bytes(s * 1000 + i), "txt": f"caption of {key}".encode()}
            for ext, data in ((extra or {}).get((s, i)) or {}).items():
                if data is None:
                    members.pop(ext, None)
                else:
                    members[ext] = data
            samples.append((key, members))
            keys.append(key)
        name = f"{prefix}-{s:06d}.tar"
        write_shard(root / name, samples)
        counts[name] = n
    if metadata:
        write_shard_metadata(root, prefix, counts)
    return str(root / f"{prefix}-{{000000..{len(sizes) - 1:06d}}}.tar"), keys


def keys_transform(sample: dict) -> dict:
    """A sample transform that keeps what tests check: the key, the epoch, and the caption."""
    return {"key": sample["__key__"], "epoch": sample["__epoch__"], "text": sample["text"]}


def take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ epoch split
def _pairs(batches: list[dict]) -> list[tuple[str, int]]:
    return [(k, e) for b in batches for k, e in zip(b["key"], b["epoch"])]


def _two_ranks(rank: int, world_size: int, spec: str, batches: int, interrupt_at: int) -> dict:
    """On each rank: an uninterrupted run of ``batches`` batches, and one interrupted and resumed from a checkpoint."""

    def stream():
        return build_train_loader(
            spec, keys_transform, 8, seed=3, rank=rank, world_size=world_size, workers=2, shuffle_buffer=16
        )

    full = stream()
    got = take(full, batches)
    faults = full.global_fault_counts()  # collective
    full.close()
    first = stream()
    before = take(first, interrupt_at)
    state = first.global_state_dict()  # collective: every rank's position
    first.close()
    buf = io.BytesIO()
    torch.save({"data": state}, buf)
    buf.seek(0)
    resumed = stream()
    resumed.load_state_dict(torch.load(buf, weights_only=True)["data"])
    after = take(resumed, batches - interrupt_at)
    resumed.close()
    return {
        "pairs": _pairs(got),
        "sizes": [len(b["key"]) for b in got],
        "faults": faults,
        "ranks_in_state": len(state["ranks"]),
        "num_samples": full.num_samples,
        "resumed_pairs": _pairs(before) + _pairs(after),
        "resumed_samples": resumed.samples,
    }


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """437 samples in uneven shards over 2 ranks x 2 workers (shares of 109, 109, 109 and 110 samples)."""
    spec, keys = write_test_shards(tmp_path_factory.mktemp("two_ranks"), [100, 100, 100, 100, 37])
    batches = 2 * 14  # per rank: 14 batches of 8 from each worker = 112 >= its share of epoch 0
    return keys, batches, run_distributed(_two_ranks, 2, args=(spec, batches, 11))


def test_epoch_mode_two_ranks_two_workers_every_sample_exactly_once(two_rank_runs):
    keys, batches, results = two_rank_runs
    pairs = [p for r in results for p in r["pairs"]]
    epoch0 = Counter(k for k, e in pairs if e == 0)
    assert sorted(epoch0) == sorted(keys) and set(epoch0.values()) == {1}  # every sample once in epoch 0
    epoch1 = Counter(k for k, e in pairs if e == 1)
    assert epoch1 and max(epoch1.values()) == 1 and set(epoch1) <= set(keys)  # epoch 1 has begun, no repeats
    assert len(pairs) == 2 * batches * 8 and len(epoch1) == len(pairs) - 437  # tail carried over, nothing lost
    for r in results:
        assert r["sizes"] == [8] * batches  # full batches only: ranks take the same number of steps
        assert sum(r["faults"].values()) == 0 and r["ranks_in_state"] == 2 and r["num_samples"] == 437
    per_rank = [sum(1 for _, e in r["pairs"] if e == 0) for r in results]
    assert sorted(per_rank) == [218, 219]  # shares (109 + 109, 109 + 110) differ by at most one sample


def test_resume_over_two_ranks_continues_the_epoch(two_rank_runs):
    keys, batches, results = two_rank_runs
    for r in results:  # interrupted after 11 steps and resumed: the very same stream on every rank
        assert r["resumed_pairs"] == r["pairs"] and r["resumed_samples"] == batches * 8
    seen = Counter(k for r in results for k, e in r["resumed_pairs"] if e == 0)
    assert sorted(seen) == sorted(keys) and set(seen.values()) == {1}  # union = one uninterrupted epoch


def test_epoch_order_is_seeded_and_changes_every_epoch(tmp_path):
    spec, keys = write_test_shards(tmp_path, [30, 30, 30])

    def epochs(seed):
        stream = build_train_loader(spec, keys_transform, 10, seed=seed, workers=0, shuffle_buffer=20, max_rounds=2)
        seq = [k for b in stream for k in b["key"]]
        assert len(seq) == 180 and stream.samples == 180
        return seq[:90], seq[90:]

    a0, a1 = epochs(0)
    b0, b1 = epochs(0)
    c0, _ = epochs(1)
    assert a0 == b0 and a1 == b1  # deterministic for a seed
    assert sorted(a0) == sorted(a1) == sorted(keys)  # each epoch is a permutation of the data
    assert a0 != a1 and a0 != c0  # reshuffled per epoch and per seed


def test_source_weights_repeat_sources_in_epoch_mode(tmp_path):
    a, ka = write_test_shards(tmp_path / "a", [20, 13], prefix="a")
    b, kb = write_test_shards(tmp_path / "b", [17], prefix="b")
    stream = build_train_loader(
        f"{a}::{b}", keys_transform, 7, weights=[1, 2], workers=2, shuffle_buffer=8, max_rounds=1
    )
    seen = Counter(k for batch in stream for k in batch["key"])
    assert stream.num_samples == 33 + 2 * 17
    assert {k: seen[k] for k in ka} == dict.fromkeys(ka, 1) and {k: seen[k] for k in kb} == dict.fromkeys(kb, 2)
    with pytest.raises(ConfigError, match="whole number"):
        build_train_loader(f"{a}::{b}", keys_transform, 7, weights=[1, 2.5], workers=0)


# ------------------------------------------------------------------------------------------------ resampled
def test_resampled_mode_is_deterministic_for_a_seed(tmp_path):
    spec, keys = write_test_shards(tmp_path, [25, 25, 25, 25])

    def first(seed, workers):
        stream = build_train_loader(
            spec, keys_transform, 8, seed=seed, workers=workers, mode="resampled", shuffle_buffer=16
        )
        out = [k for b in take(stream, 30) for k in b["key"]]
        stream.close()
        return out

    a, b = first(5, 2), first(5, 2)
    assert a == b and len(a) == 240 and set(a) <= set(keys)
    assert first(6, 2) != a
    assert len(set(a)) < 240  # drawn with replacement: some samples repeat within 240 draws of 100


def test_resampled_weights_are_per_sample_upsampling_factors(tmp_path):
    # source a: 4 shards x 10 samples, source b: 1 shard x 20 samples, weight 3 -> share of b = 3 x 20 / (40 + 60)
    a, _ = write_test_shards(tmp_path / "a", [10, 10, 10, 10], prefix="a")
    b, _ = write_test_shards(tmp_path / "b", [20], prefix="b")
    sources = parse_sources(f"{a}::{b}", [1, 3])
    counts = shard_counts([u for s in sources for u in s.urls])
    sources[0].counts, sources[1].counts = counts[:4], counts[4:]
    plan = ResamplePlan(sources, seed=0, window=10)
    drawn = Counter()
    for rnd in range(3000):
        for p in plan.pieces(rnd, slot=0, num_slots=1):
            drawn["b" if "/b/" in p.url else "a"] += p.stop
    assert drawn["b"] / sum(drawn.values()) == pytest.approx(0.6, abs=0.02)
    stream = build_train_loader(f"{a}::{b}", keys_transform, 10, weights=[1, 3], mode="resampled", workers=0)
    got = Counter(k[0] for batch in take(stream, 40) for k in batch["key"])
    assert got["a"] > 0 and got["b"] > got["a"]
    assert stream.num_samples == 40 + 3 * 20


def test_epoch_plan_shares_cover_every_position_once():
    sources = parse_sources("s-{0..6}.tar")
    sources[0].counts = [5, 0, 17, 1, 9, 30, 2]
    plan = EpochPlan(sources, seed=1)
    for num_slots in (1, 3, 4, 7, 64):
        covered = Counter()
        lengths = []
        for slot in range(num_slots):
            pieces = plan.pieces(2, slot, num_slots)
            lengths.append(sum(p.length for p in pieces))
            for p in pieces:
                covered.update((p.url, i) for i in range(p.start, p.stop))
        assert sum(covered.values()) == len(covered) == 64 and max(lengths) - min(lengths) <= 1


# ------------------------------------------------------------------------------------------------ faults
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_members_are_ignored_never_executed(tmp_path, caplog):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    pickle.loads(payload)  # the payload is live: loading it runs the command
    assert marker.exists()
    marker.unlink()
    extra = {(0, i): {"pyd": payload, "pickle": payload, "pth": payload} for i in range(3)}
    spec, keys = write_test_shards(tmp_path / "s", [10], extra=extra)
    stream = build_train_loader(spec, keys_transform, 5, workers=0, max_rounds=1)
    got = [k for b in stream for k in b["key"]]
    with caplog.at_level(logging.WARNING):
        held_out = list(build_eval_samples(spec))
    assert sorted(got) == sorted(keys) and len(held_out) == 10  # the samples themselves are fine
    assert all(set(s) == {"__key__", "image", "text", "json"} for s in held_out)
    assert stream.fault_counts()["ignored_unsafe_members"] == 9
    assert f"held-out data {spec}: skipped ignored_unsafe_members 9" in caplog.text  # skipped unread there too
    assert not marker.exists()


def _corrupt_jpeg() -> bytes:
    data = jpeg_bytes(0)
    return data[:200] + b"\x00" * 50  # a JPEG header, then garbage and an early end


def test_bad_data_is_skipped_and_counted_by_kind(tmp_path):
    extra = {
        (0, 1): {"jpg": _corrupt_jpeg()},
        (0, 4): {"jpg": b"not an image"},
        (0, 6): {"txt": b"   "},
        (0, 7): {"txt": None},
        (0, 9): {"jpg": None, "png": None},
        (1, 2): {"txt": b"\xff\xfe bad utf-8"},
    }
    spec, keys = write_test_shards(tmp_path, [12, 12, 12, 12], extra=extra)
    # shard 2: truncated in the middle of its 6th sample's image; shard 3: deleted (its metadata remains)
    path2 = tmp_path / "t-000002.tar"
    data = path2.read_bytes()
    cut = data.index(b"t002_0005.jpg") + 512 + 300
    path2.write_bytes(data[:cut])
    (tmp_path / "t-000003.tar").unlink()
    for workers in (0, 2):
        stream = build_train_loader(spec, keys_transform, 4, workers=workers, shuffle_buffer=8, max_rounds=1)
        got = [k for b in stream for k in b["key"]]
        good = {k for k in keys if k.startswith(("t000", "t001"))} - {
            "t000_0001",
            "t000_0004",
            "t000_0006",
            "t000_0007",
            "t000_0009",
            "t001_0002",
        } | {f"t002_{i:04d}" for i in range(5)}
        assert sorted(got) == sorted(good) and len(got) == 18 + 5
        counts = stream.fault_counts()
        assert {k: v for k, v in counts.items() if v} == {
            "corrupt_image": 2,
            "empty_caption": 1,
            "missing_caption": 1,
            "missing_image": 1,
            "bad_caption": 1,
            "truncated_shard": 1,
            "missing_shard": 1,
            "missing_samples": 7 + 12,
        }, workers
        assert stream.log_metrics(with_faults=True)["data/skipped/missing_shard"] == 1.0


def test_training_stream_continues_past_bad_shards(tmp_path):
    extra = {(0, i): {"jpg": b"garbage"} for i in range(0, 10, 2)}
    spec, keys = write_test_shards(tmp_path, [10, 10, 10], extra=extra)
    (tmp_path / "t-000001.tar").write_bytes(b"this is not a tar file at all" * 40)
    stream = build_train_loader(spec, keys_transform, 5, workers=2, shuffle_buffer=4)
    got = take(stream, 20)  # 100 samples: more than six epochs of the 15 usable ones
    assert all(len(b["key"]) == 5 for b in got)
    assert Counter(k for b in got for k in b["key"]).keys() <= {
        k for k in keys if k[1:4] == "002" or (k[1:4] == "000" and int(k[-1]) % 2)
    }
    counts = stream.fault_counts()
    assert counts["unreadable_shard"] >= 5 and counts["corrupt_image"] >= 5 * 5 and counts["missing_samples"] >= 50


def test_nothing_usable_stops_with_a_clear_error(tmp_path):
    extra = {(s, i): {"jpg": b"garbage"} for s in range(2) for i in range(30)}
    spec, _ = write_test_shards(tmp_path, [30, 30], extra=extra)
    for workers, mode in ((0, "epoch"), (2, "resampled")):
        stream = build_train_loader(spec, keys_transform, 4, workers=workers, mode=mode, max_consecutive_failures=50)
        with pytest.raises(DataError, match=r"50 consecutive data failures .*corrupt_image") as err:
            next(stream)
        # bounded: the reader gave up after exactly 50 attempts (no hang, no retry loop), in a one-line message
        assert "(counts so far: corrupt_image 50;" in str(err.value) and "\n" not in str(err.value).strip()
        assert "Traceback" not in str(err.value)
        stream.close()
    missing = str(tmp_path / "gone-{000..003}.tar")
    stream = build_train_loader(missing, keys_transform, 4, workers=0, mode="resampled", max_consecutive_failures=8)
    with pytest.raises(DataError, match="missing_shard 8"):
        next(stream)


def test_shards_over_http_with_remote_metadata_and_a_404(tmp_path):
    import functools
    import http.server
    import threading

    spec, keys = write_test_shards(tmp_path, [10, 7, 12])
    (tmp_path / "t-000001.tar").unlink()  # the server answers 404; sizes.json still promises its 7 samples

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/t-{{000000..000002}}.tar"
        for workers in (0, 2):
            stream = build_train_loader(url, keys_transform, 4, workers=workers, shuffle_buffer=8, max_rounds=1)
            assert stream.num_samples == 29  # from the sizes.json fetched next to the URLs, not counted or guessed
            seen = Counter(k for b in stream for k in b["key"])
            assert sorted(seen) == sorted(k for k in keys if not k.startswith("t001")) and set(seen.values()) == {1}
            plan = stream.spec.plan
            readers = sum(
                any(p.url.endswith("t-000001.tar") for p in plan.pieces(0, s, max(1, workers)))
                for s in range(max(1, workers))
            )  # readers whose share includes the missing shard
            assert {k: v for k, v in stream.fault_counts().items() if v} == {
                "missing_shard": readers,
                "missing_samples": 7,
            }, workers
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------ decoding
def test_captions_from_json_lists_and_image_formats(tmp_path):
    def img(fmt, mode):
        buf = io.BytesIO()
        Image.new(mode, (20, 12), 7 if mode == "P" else None).save(buf, format=fmt)
        return buf.getvalue()

    captions = b'{"caps": ["first", "second", "third"]}'
    extra = {
        (0, 0): {"jpg": None, "png": img("PNG", "RGBA")},
        (0, 1): {"jpg": None, "webp": img("WEBP", "RGB")},
        (0, 2): {"jpg": None, "png": img("PNG", "P")},
        (0, 3): {"jpg": None, "jpeg": img("JPEG", "L")},
    }
    extra = {k: {**v, "json": captions} for k, v in extra.items()}
    spec, keys = write_test_shards(tmp_path, [4], extra=extra)

    def tf(s):
        return {"key": s["__key__"], "text": s["text"], "mode": s["image"].mode, "size": s["image"].size}

    def one_epoch(seed, epoch):
        stream = build_train_loader(spec, tf, 4, seed=seed, caption_key="json:caps", workers=0, max_rounds=epoch + 1)
        batches = list(stream)
        return dict(zip(batches[-1]["key"], batches[-1]["text"])), batches[-1]

    texts, batch = one_epoch(0, 0)
    assert set(texts.values()) <= {"first", "second", "third"} and set(texts) == set(keys)
    assert set(batch["mode"]) == {"RGB"} and set(batch["size"]) == {(20, 12)}
    assert one_epoch(0, 0)[0] == texts  # the draw is seeded
    draws = [one_epoch(s, e)[0] for s in range(3) for e in range(3)]
    assert len({t for d in draws for t in d.values()}) == 3  # and varies with seed and epoch


def test_image_only_samples_pass_when_text_is_not_required(tmp_path):
    spec, keys = write_test_shards(tmp_path, [6], extra={(0, i): {"txt": None} for i in range(3)})
    stream = build_train_loader(spec, keys_transform, 6, require_text=False, workers=0, max_rounds=1)
    batch = next(stream)
    assert sorted(batch["key"]) == sorted(keys) and sum(t is None for t in batch["text"]) == 3
    assert sum(stream.fault_counts().values()) == 0


def test_augmentations_are_seeded_per_sample_not_per_worker(tmp_path):
    from torchvision.transforms import v2

    spec, _ = write_test_shards(tmp_path, [12, 12])
    tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(32, scale=(0.3, 1.0)), v2.RandomHorizontalFlip()])

    def images(workers):
        stream = build_train_loader(
            spec, lambda s: {"key": s["__key__"], "image": tf(s["image"])}, 4, workers=workers, max_rounds=1
        )
        return {k: img for b in stream for k, img in zip(b["key"], b["image"])}

    torch.manual_seed(123)
    before = torch.rand(3)
    a = images(0)
    after_state = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before) and torch.equal(torch.rand(3), after_state)  # training RNG untouched
    b = images(2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ metadata
def test_epoch_length_comes_from_metadata_or_counting_never_guessing(tmp_path):
    spec, _ = write_test_shards(tmp_path / "m", [7, 9])
    assert build_train_loader(spec, keys_transform, 2, workers=0).num_samples == 16
    with pytest.raises(ConfigError, match="disagrees with the shards' metadata"):
        build_train_loader(spec, keys_transform, 2, workers=0, num_samples=20)
    spec2, _ = write_test_shards(tmp_path / "n", [7, 9, 5], metadata=False)  # local, no metadata: counted
    assert build_train_loader(spec2, keys_transform, 2, workers=0).num_samples == 21
    remote = "http://127.0.0.1:9/shards/x-{0..3}.tar"
    with pytest.raises(ConfigError, match="remote shard.*no metadata.*make_shards.py --index"):
        build_train_loader(remote, keys_transform, 2, workers=0)
    resampled = build_train_loader(remote, keys_transform, 2, workers=0, mode="resampled", num_samples=1000)
    assert resampled.num_samples == 1000 and resampled.steps_for_epochs(2, 64) == 32
