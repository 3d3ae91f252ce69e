"""Checkpoints that survive a crash: commit protocol, `latest`, keep-last-N, resume resolution, and real SIGKILLs.

The must-show runs are real 2-process DeepSpeed launches on CPU (`accelerate launch --config_file
configs/accelerate/zero2.yaml|zero3.yaml --num_processes 2`), killed with SIGKILL through the VLP_FAULTS hook:

* killed at step 15 (after its step-10 checkpoint), resumed with ``--resume latest``: steps 11-20 have the losses
  of an uninterrupted run (1e-5 relative);
* killed while writing its step-10 checkpoint: ``latest`` still names the complete step-5 checkpoint, whose
  consolidated weights load without DeepSpeed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import losses_after_last_resume
from vlp.checkpointing import (
    TRAINER_STATE,
    list_checkpoints,
    load_trained_model,
    read_latest,
    resolve_resume,
    write_latest,
)
from vlp.config import ConfigError
from vlp.train.checkpoint import CheckpointManager
from vlp.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def fake_save(manager: CheckpointManager, step: int) -> Path:
    def write_shared(d: Path) -> None:
        torch.save({"w": torch.full((3,), float(step))}, d / "objective.pt")

    return manager.save(step, write_shared, {"rank": 0}, {"step": step})


def test_save_commits_updates_latest_and_keeps_last_n(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, rank=0, barrier=lambda: None)
    for step in (5, 10, 15):
        path = fake_save(manager, step)
        assert read_latest(tmp_path / "checkpoints") == path and (path / TRAINER_STATE).is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000010", "step-00000015"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_prune_never_deletes_the_checkpoint_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        fake_save(CheckpointManager(tmp_path, keep=4, rank=0, barrier=lambda: None), step)
    write_latest(root, "step-00000001")  # e.g. resumed from an older checkpoint by hand
    CheckpointManager(tmp_path, keep=1, rank=0, barrier=lambda: None).prune()
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001", "step-00000004"]
    assert read_latest(root).name == "step-00000001"


class SimulatedCrash(Exception):
    pass


def test_crash_before_commit_leaves_latest_on_the_previous_checkpoint(tmp_path):
    crashes = [20]

    def crash(step: int) -> None:
        if step in crashes:
            crashes.remove(step)
            raise SimulatedCrash("while writing")

    manager = CheckpointManager(tmp_path, keep=3, rank=0, barrier=lambda: None, before_commit=crash)
    fake_save(manager, 10)
    with pytest.raises(SimulatedCrash):
        fake_save(manager, 20)
    root = tmp_path / "checkpoints"
    assert read_latest(root).name == "step-00000010" and (root / ".tmp-step-00000020").is_dir()
    assert resolve_resume("latest", tmp_path).name == "step-00000010"
    fake_save(manager, 20)  # the next save clears the leftover
    assert read_latest(root).name == "step-00000020" and not (root / ".tmp-step-00000020").exists()


def test_same_step_saved_again_gets_a_new_name(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5, rank=0, barrier=lambda: None)
    first, again = fake_save(manager, 10), fake_save(manager, 10)
    assert (first.name, again.name) == ("step-00000010", "step-00000010.r1")
    assert read_latest(tmp_path / "checkpoints") == again


def test_resolve_resume(tmp_path):
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: a fresh start
    manager = CheckpointManager(tmp_path, keep=2, rank=0, barrier=lambda: None)
    path = fake_save(manager, 7)
    assert resolve_resume("latest", tmp_path) == path
    assert resolve_resume(str(tmp_path), None) == path and resolve_resume(str(path), None) == path
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path / "nope"), None)
    with pytest.raises(ConfigError, match="needs --output-dir"):
        resolve_resume("latest", None)


# ---------------------------------------------------------------------------------------------------------------
# Real crashes: 2-process DeepSpeed launches killed with SIGKILL
# ---------------------------------------------------------------------------------------------------------------


def launch(config: str, args: list[str], faults: str | None = None, timeout: int = 1800):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("VLP_FAULTS", None)
    if faults:
        env["VLP_FAULTS"] = faults
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / config),
        "--num_processes",
        "2",
        str(ROOT / "scripts" / "pretrain.py"),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_args(shards: str, out: Path, steps: int, every: int) -> list[str]:
    return [
        "--loss",
        "siglip",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--train-shards",
        shards,
        "--output-dir",
        str(out),
        "--warmup-steps",
        "3",
        "--eval.zeroshot",
        "false",
        "--checkpoint-every",
        str(every),
        "--checkpoint.keep",
        "2",
        "--seed",
        "0",
        "--model",
        "tiny",
    ]


@pytest.mark.slow
def test_sigkill_at_step_15_then_resume_matches_an_uninterrupted_run_zero2(synthetic_data, tmp_path):
    shards = synthetic_data.train_shards
    ref_run, crash_run = tmp_path / "uninterrupted", tmp_path / "crashed"
    ref = launch("zero2.yaml", run_args(shards, ref_run, 20, 10))
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = launch("zero2.yaml", run_args(shards, crash_run, 20, 10), faults="sigkill@15")
    assert crashed.returncode != 0
    assert read_latest(crash_run / "checkpoints").name == "step-00000010"
    assert max(r["step"] for r in read_metrics(crash_run / "metrics.jsonl") if "loss" in r) == 15
    resumed = launch("zero2.yaml", run_args(shards, crash_run, 20, 10) + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expect, got = losses_after_last_resume(ref_run), losses_after_last_resume(crash_run)
    assert sorted(got) == list(range(1, 21)) and sorted(expect) == list(range(1, 21))
    rel = max(abs(got[s] - expect[s]) / abs(expect[s]) for s in range(11, 21))
    print(f"resumed steps 11-20 vs uninterrupted: max relative loss difference {rel:.2e}")
    assert rel <= 1e-5
    assert read_latest(crash_run / "checkpoints").name == "step-00000020"
    a, _ = load_trained_model(ref_run)
    b, _ = load_trained_model(crash_run)
    sa, sb = a.state_dict(), b.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 1e-5


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_latest_on_the_previous_one_zero3(synthetic_data, tmp_path):
    run = tmp_path / "run"
    proc = launch("zero3.yaml", run_args(synthetic_data.train_shards, run, 10, 5), faults="sigkill-checkpoint@10")
    assert proc.returncode != 0
    root = run / "checkpoints"
    assert read_latest(root).name == "step-00000005"
    assert (root / ".tmp-step-00000010").is_dir() and not (root / "step-00000010").exists()
    assert any((root / ".tmp-step-00000010" / "ds").iterdir())  # the shards were being written
    model, cfg = load_trained_model(run)  # consolidates the ZeRO-3 shards of step 5, without DeepSpeed's engine
    assert cfg.train.steps == 10 and torch.isfinite(model.logit_scale).item()
    assert resolve_resume("latest", run).name == "step-00000005"
