"""Guard rails (one process): non-finite loss or gradient skips the update and is counted, K in a row stops the run
with a clear message and a checkpoint of the last good state; throughput and memory are logged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import reset_accelerate
from vlp.checkpointing import TRAINER_STATE, consolidated_state_dict, dualtower_state, read_latest
from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
from vlp.train.guards import FaultInjector, NonFiniteGuard, TrainingDiverged
from vlp.train.metrics import read_metrics


def args(shards: str, out, steps: int, *extra: str) -> list[str]:
    return [
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
        "1",
        "--eval.zeroshot",
        "false",
        *extra,
    ]


@pytest.mark.parametrize(
    "accum",
    [["--accum-steps", "1"], ["--accum-steps", "2"], ["--accum-steps", "2", "--train.accumulation", "plain"]],
    ids=["single-batch", "gradcache", "plain-accumulation"],
)
def test_nonfinite_loss_and_gradient_skip_the_update(synthetic_data, tmp_path, monkeypatch, accum):
    from vlp.train.trainer import Trainer

    reset_accelerate()
    monkeypatch.setenv("VLP_FAULTS", "nan-loss@2,nan-grad@3")
    trainer = Trainer(
        parse_cli(PretrainConfig, args(synthetic_data.train_shards, tmp_path, 4, *accum), PRETRAIN_ALIASES)
    )
    seen = []
    for step in (1, 2, 3, 4):
        before = [p.clone() for p in trainer.engine.local_parameters()]
        opt_steps = [float(s["step"]) for s in trainer.engine.optimizer.state_dict()["state"].values()][:1]
        _, outcome, _ = trainer.train_step(trainer.next_micro_batches(), step)
        trainer.guard.record(step, outcome.applied, outcome.reason)
        moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.engine.local_parameters()))
        opt_after = [float(s["step"]) for s in trainer.engine.optimizer.state_dict()["state"].values()][:1]
        seen.append((outcome.applied, outcome.reason, moved, opt_steps == opt_after))
    assert seen[1] == (False, "nonfinite_loss", False, True)
    assert seen[2] == (False, "nonfinite_grad", False, True)
    assert [s[0] for s in seen] == [True, False, False, True] and seen[3][2]
    assert trainer.guard.skipped_nonfinite == 2 and trainer.guard.consecutive == 0
    reset_accelerate()


def test_k_consecutive_nonfinite_steps_stop_with_a_checkpoint_of_the_last_good_state(
    synthetic_data, tmp_path, monkeypatch
):
    from vlp.train.trainer import run_pretraining

    shards = synthetic_data.train_shards
    reset_accelerate()
    run_pretraining(parse_cli(PretrainConfig, args(shards, tmp_path / "one", 1), PRETRAIN_ALIASES))
    after_step_1 = load_file(str(tmp_path / "one" / "model.safetensors"))

    reset_accelerate()
    monkeypatch.setenv("VLP_FAULTS", "nan-loss@2,nan-grad@3,nan-loss@4")
    cfg = parse_cli(
        PretrainConfig, args(shards, tmp_path / "bad", 10, "--train.max_nonfinite_steps", "3"), PRETRAIN_ALIASES
    )
    with pytest.raises(TrainingDiverged) as info:
        run_pretraining(cfg)
    msg = str(info.value)
    assert "stopping at step 4: 3 consecutive steps had a non-finite loss or gradient" in msg
    ckpt = read_latest(tmp_path / "bad" / "checkpoints")
    assert ckpt.name == "step-00000004" and str(ckpt) in msg and "--resume latest" in msg
    state = torch.load(ckpt / TRAINER_STATE, weights_only=True)
    assert state["guard"]["last_good_step"] == 1 and state["guard"]["skipped_nonfinite"] == 3
    saved = dualtower_state(consolidated_state_dict(ckpt))
    assert all(torch.equal(saved[k], after_step_1[k]) for k in after_step_1)  # no update since step 1
    records = [r for r in read_metrics(tmp_path / "bad" / "metrics.jsonl") if "loss" in r]
    assert [r["step_applied"] for r in records] == [1.0, 0.0, 0.0, 0.0]
    assert records[-1]["guard/consecutive_nonfinite"] == 3.0
    for key in ("samples_per_s", "samples_per_s_per_device", "step_time_s", "data_time_s", "mem/peak_rss_gb"):
        assert records[0][key] > 0
    reset_accelerate()


def test_guard_counts_and_overflow_does_not_count_towards_the_stop():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.record(1, True, None)
    guard.record(2, False, "overflow")
    guard.record(3, False, "overflow")
    assert not guard.diverged and guard.skipped_overflow == 2
    guard.record(4, False, "nonfinite_grad")
    guard.record(5, True, None)
    guard.record(6, False, "nonfinite_loss")
    assert not guard.diverged and guard.last_good_step == 5
    guard.record(7, False, "nonfinite_loss")
    assert guard.diverged and guard.skipped_nonfinite == 3
    restored = NonFiniteGuard(2)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_fault_spec_is_validated():
    assert FaultInjector("sigkill@15, nan-grad@3").faults == {("sigkill", 15), ("nan-grad", 3)}
    with pytest.raises(ValueError, match="KIND@STEP"):
        FaultInjector("explode@3")
