"""Metrics go to metrics.jsonl and through accelerate's trackers, chosen with --report-to."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import reset_accelerate
from vlp.config import PRETRAIN_ALIASES, ConfigError, PretrainConfig, TrainConfig, parse_cli
from vlp.preflight import check_trackers_installed
from vlp.train.metrics import MetricsWriter, read_metrics, tracker_names


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """MetricsWriter creates accelerate's process state when no Accelerator did; later tests start without it."""
    yield
    reset_accelerate()


def test_tensorboard_default_writes_events_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert TrainConfig().report_to == "tensorboard"
    writer = MetricsWriter(tmp_path)
    writer.log(3, {"loss": 1.5, "lr": 0.25, "note": "text is kept in the JSONL only"})
    writer.log(4, {"loss": 1.25})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[0] == {
        "step": 3,
        "loss": 1.5,
        "lr": 0.25,
        "note": "text is kept in the JSONL only",
    }
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 1.5), (4, 1.25)]
    assert "note" not in events.Tags()["scalars"]


def test_none_keeps_only_the_jsonl(tmp_path):
    writer = MetricsWriter(tmp_path, report_to="none")
    writer.log(1, {"loss": 2.0})
    writer.close()
    assert not (tmp_path / "tensorboard").exists() and read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 2.0}
    ]
    assert MetricsWriter(tmp_path / "off", enabled=False, report_to="tensorboard").trackers == []
    assert not (tmp_path / "off").exists()


def test_unknown_tracker_is_one_line_listing_valid_ones():
    with pytest.raises(ConfigError) as e:
        tracker_names("tensorboard,wandbb")
    msg = str(e.value)
    assert "unknown tracker 'wandbb'" in msg and "tensorboard" in msg and "mlflow" in msg and "\n" not in msg
    assert tracker_names("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"train.report_to: unknown tracker 'tb'; valid: none, tensorboard, wandb"):
        parse_cli(PretrainConfig, ["--report-to", "tb"], PRETRAIN_ALIASES)
    assert (
        parse_cli(PretrainConfig, ["--report-to", "wandb,mlflow"], PRETRAIN_ALIASES).train.report_to == "wandb,mlflow"
    )


def test_a_tracker_whose_package_is_missing_is_a_clear_error(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(
        ConfigError,
        match=r"--report-to mlflow: the mlflow package is not installed \(pip install "
        r"mlflow\); installed trackers: tensorboard",
    ):
        MetricsWriter(tmp_path, report_to="tensorboard,mlflow")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb: the wandb package is not installed"):
        check_trackers_installed("tensorboard,wandb")  # before torch, from the script's preflight
    check_trackers_installed("none")
