"""Resuming the data stream from a checkpointed position: it continues, it does not restart the epoch."""

from __future__ import annotations

import io
import logging
from collections import Counter

import pytest
import torch
from torchvision.transforms import v2

from data_pipelines.loader import build_train_loader
from tests.test_data_pipeline import take, write_test_shards
from vlp.config import ConfigError

_AUG = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(24, scale=(0.3, 1.0)), v2.RandomHorizontalFlip()])


def augmented(sample: dict) -> dict:
    return {"key": sample["__key__"], "image": _AUG(sample["image"])}


def checkpoint_roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save({"data": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["data"]  # plain data: loads without unpickling code


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["key"] == y["key"] and torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupt_after_k_steps_and_resume_gives_one_uninterrupted_epoch(tmp_path, workers):
    spec, keys = write_test_shards(tmp_path, [40, 40, 40, 17])

    def stream():
        return build_train_loader(spec, augmented, 6, seed=1, workers=workers, shuffle_buffer=16, max_rounds=1)

    full = list(stream())
    assert sorted(k for b in full for k in b["key"]) == sorted(keys)
    first = stream()
    before = take(first, 7)
    state = checkpoint_roundtrip(first.state_dict())
    first.close()
    resumed = stream()
    resumed.load_state_dict(state)
    after = list(resumed)
    assert same_batches(before + after, full)  # same samples, same order, same augmentations
    seen = Counter(k for b in before + after for k in b["key"])
    assert sorted(seen) == sorted(keys) and set(seen.values()) == {1}
    assert resumed.samples == len(keys) and state["batches"] == 7


def test_resume_in_resampled_mode_continues_the_draws(tmp_path):
    spec, _ = write_test_shards(tmp_path, [30, 30, 30])

    def stream():
        return build_train_loader(spec, augmented, 5, seed=2, workers=2, mode="resampled", shuffle_buffer=8)

    s = stream()
    full = take(s, 25)
    s.close()
    first = stream()
    before = take(first, 9)
    state = checkpoint_roundtrip(first.state_dict())
    first.close()
    resumed = stream()
    resumed.load_state_dict(state)
    assert same_batches(before + take(resumed, 16), full)
    resumed.close()


def test_resume_twice_and_fault_counts_carry_over(tmp_path):
    spec, keys = write_test_shards(tmp_path, [20, 20], extra={(1, 3): {"jpg": b"broken"}})

    def stream():
        return build_train_loader(spec, augmented, 4, seed=0, workers=2, shuffle_buffer=8)

    full = stream()
    expected = take(full, 18)
    full.close()
    got, state = [], None
    for chunk in (5, 6, 7):
        s = stream()
        if state is not None:
            s.load_state_dict(state)
        got += take(s, chunk)
        state = checkpoint_roundtrip(s.state_dict())
        s.close()
    assert same_batches(got, expected)
    assert s.fault_counts()["corrupt_image"] == full.fault_counts()["corrupt_image"] >= 1


def test_resume_with_another_layout_restarts_the_unfinished_epoch(tmp_path, caplog):
    spec, keys = write_test_shards(tmp_path, [30, 30])
    s = build_train_loader(spec, augmented, 4, workers=2, shuffle_buffer=8)
    take(s, 18)  # 72 samples: epoch 0 done for both readers, epoch 1 begun
    state = checkpoint_roundtrip(s.state_dict())
    s.close()
    assert {w["round"] for w in state["workers"]} == {1}
    one = build_train_loader(
        spec, lambda x: {"key": x["__key__"], "epoch": x["__epoch__"]}, 4, workers=1, shuffle_buffer=8, max_rounds=2
    )
    with caplog.at_level(logging.WARNING):
        one.load_state_dict(state)
    assert "restarts at the start of epoch 1" in caplog.text
    rest = list(one)
    assert Counter(k for b in rest for k in b["key"]) == Counter(keys)  # all of epoch 1, once
    assert {e for b in rest for e in b["epoch"]} == {1}


def test_resume_refuses_a_position_from_other_data(tmp_path):
    spec, _ = write_test_shards(tmp_path / "a", [10, 10])
    other, _ = write_test_shards(tmp_path / "b", [10, 11])
    s = build_train_loader(spec, augmented, 4, workers=0)
    take(s, 2)
    state = s.state_dict()
    with pytest.raises(ConfigError, match="seed differs"):
        build_train_loader(spec, augmented, 4, workers=0, seed=9).load_state_dict(state)
    with pytest.raises(ConfigError, match="shards/metadata/weights differs"):
        build_train_loader(other, augmented, 4, workers=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="mode differs"):
        build_train_loader(spec, augmented, 4, workers=0, mode="resampled").load_state_dict(state)
