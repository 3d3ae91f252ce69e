"""Bad data through the training loop: training goes on, the skipped data is counted in the logs, metrics.jsonl and
summary.json, the progress bar counts samples, and a run where nothing is usable stops with a one-line error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from data_pipelines.faults import format_counts
from data_pipelines.loader import build_train_loader
from tests.helpers import reset_accelerate as _reset_accelerate
from tests.test_data_pipeline import write_test_shards
from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
from vlp.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _broken_shards(root):
    """4 shards x 12 samples: shard 0 has 2 corrupt images and an empty caption, shard 2 is cut inside its 6th
    sample, shard 3 is gone (its metadata remains). Usable per epoch: 9 + 12 + 5 = 26 of 48."""
    extra = {(0, 1): {"jpg": b"\xff\xd8\xff\xe0 not a jpeg"}, (0, 4): {"jpg": b"not an image"}, (0, 6): {"txt": b"  "}}
    spec, keys = write_test_shards(root, [12, 12, 12, 12], extra=extra)
    path2 = root / "t-000002.tar"
    data = path2.read_bytes()
    path2.write_bytes(data[: data.index(b"t002_0005.jpg") + 512 + 300])
    (root / "t-000003.tar").unlink()
    return spec


def test_training_continues_over_bad_data_and_reports_the_counts(tmp_path, monkeypatch, caplog):
    import vlp.train.trainer as pretrain

    spec = _broken_shards(tmp_path / "shards")
    bars = []
    real_tqdm = pretrain.tqdm

    def recording_tqdm(*args, **kwargs):
        bars.append(real_tqdm(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(pretrain, "tqdm", recording_tqdm)
    out = tmp_path / "run"
    # a 64-sample shuffle window holds the whole 48-position epoch, so each epoch's shards are read (and their
    # faults met) before its first sample is used; a window's samples are decoded as they are used. 5 steps x 8 =
    # 40 samples: 24 of epoch 0 in steps 1-3, then its last 2 and 6 of epoch 1 in step 4, 8 more in step 5
    args = [
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--train-shards",
        spec,
        "--data.shuffle_buffer",
        "64",
        "--output-dir",
        str(out),
        "--warmup-steps",
        "1",
        "--eval.zeroshot",
        "false",
        "--train.log_every",
        "1",
    ]
    cfg = parse_cli(PretrainConfig, args, PRETRAIN_ALIASES)
    _reset_accelerate()
    with caplog.at_level(logging.WARNING):
        summary = pretrain.run_pretraining(cfg)
    _reset_accelerate()

    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # training went on over the bad data, into epoch 1
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
    skipped = [
        {k[len("data/skipped/") :]: int(v) for k, v in r.items() if k.startswith("data/skipped/") and v}
        for r in records
    ]
    # the same stream outside the trainer: the counts it logs are the pipeline's, step by step
    stream = build_train_loader(
        spec, lambda x: {"key": x["__key__"]}, 8, seed=cfg.train.seed, workers=0, shuffle_buffer=64
    )
    direct = []
    for _ in range(5):
        next(stream)
        direct.append({k: v for k, v in stream.fault_counts().items() if v})
    assert skipped == direct
    shard_level = {"missing_shard": 1, "truncated_shard": 1, "missing_samples": 7 + 12}  # met when a window is read
    sample_level = {"corrupt_image": 2, "empty_caption": 1}  # met as samples are decoded
    for step, counts in enumerate(skipped, 1):
        epochs_read = 1 if step <= 3 else 2  # epoch 1's window is read in step 4
        assert {k: counts.get(k, 0) for k in shard_level} == {k: v * epochs_read for k, v in shard_level.items()}
        for k, v in sample_level.items():
            assert (epochs_read - 1) * v <= counts.get(k, 0) <= epochs_read * v, (step, k)
    assert skipped[3]["corrupt_image"] >= 2 and skipped[3]["empty_caption"] >= 1  # all of epoch 0 decoded by step 4
    assert records[-1]["data/samples"] == 40 and records[-1]["data/epoch"] == pytest.approx(40 / 48)
    on_disk = json.loads((out / "summary.json").read_text())
    for s in (summary, on_disk):
        assert {k: int(s[f"data/skipped/{k}"]) for k in skipped[-1]} == skipped[-1]
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipped so far")]
    grew = [c for i, c in enumerate(skipped) if i == 0 or c != skipped[i - 1]]
    assert warnings == [f"data: skipped so far (all ranks): {format_counts(c)}" for c in grew]  # logged as they grow
    assert warnings[0].startswith("data: skipped so far (all ranks): missing_shard 1, truncated_shard 1, ")
    bar = next(b for b in bars if b.desc == "pretrain")
    assert (bar.unit, bar.total, bar.n) == ("sample", 5 * 8, 5 * 8)  # samples of a known total, not batches


def test_a_run_where_every_sample_fails_stops_with_a_one_line_error(tmp_path, capsys):
    import runpy

    from vlp.cli import run_cli

    extra = {(s, i): {"jpg": b"garbage"} for s in range(2) for i in range(30)}
    spec, _ = write_test_shards(tmp_path / "shards", [30, 30], extra=extra)
    main = runpy.run_path(str(ROOT / "scripts" / "pretrain.py"), run_name="pretrain")["main"]
    _reset_accelerate()
    with pytest.raises(SystemExit) as code:
        run_cli(
            main,
            [
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--workers",
                "0",
                "--train-shards",
                spec,
                "--output-dir",
                str(tmp_path / "run"),
                "--eval.zeroshot",
                "false",
                "--data.max_consecutive_failures",
                "20",
            ],
        )
    _reset_accelerate()
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert code.value.code == 2 and len(errors) == 1, err
    assert (
        "error: 20 consecutive data failures without one usable sample (rank 0, reader 0) (counts so far: "
        "corrupt_image 20;" in errors[0]
    )
    assert not any(line.startswith("Traceback") for line in err)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.is_file() or not [r for r in read_metrics(metrics) if "loss" in r]  # not one step ran
