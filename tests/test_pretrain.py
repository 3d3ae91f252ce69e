"""The pretraining entry point: a short in-process run, the 2-process CPU launch, and one-line user errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.helpers import reset_accelerate
from vlp.checkpointing import load_trained_model
from vlp.config import PRETRAIN_ALIASES, LossConfig, PretrainConfig, parse_cli
from vlp.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def small_run_args(tmp_path, out, steps=3, loss="siglip"):
    return [
        "--loss",
        loss,
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--output-dir",
        str(out),
        "--data.synthetic_dir",
        str(tmp_path / "syn"),
        "--data.synthetic_train_samples",
        "200",
        "--data.synthetic_eval_samples",
        "50",
        "--warmup-steps",
        "1",
    ]


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_short_run_writes_outputs_and_summary(tmp_path, loss):
    from vlp.train.trainer import run_pretraining

    out = tmp_path / "run"
    cfg = parse_cli(PretrainConfig, small_run_args(tmp_path, out, loss=loss), PRETRAIN_ALIASES)
    summary = run_pretraining(cfg)
    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    on_disk = json.loads((out / "summary.json").read_text())
    for fam, n in (("shape", 10), ("color", 8), ("size", 3), ("position", 9)):
        assert on_disk[f"zeroshot/{fam}/chance"] == pytest.approx(1 / n)
        assert 0.0 <= on_disk[f"zeroshot/{fam}/top1"] <= 1.0
    assert on_disk["zeroshot/num_images"] == 50 and summary["final_loss"] == losses[-1]
    assert (out / "config.yaml").is_file() and any((out / "tensorboard").iterdir())
    model, cfg2 = load_trained_model(out)
    assert cfg2 == cfg and (model.logit_bias is None) == (loss == "clip")


def test_auto_priors_start_at_the_batch_prior_and_are_recorded(tmp_path):
    """--loss.init_logit_bias/init_logit_scale auto with a global batch of 8: step 1 uses b = -ln(7) and
    t = ln(7); config.yaml holds the numbers."""
    import math

    import yaml

    from vlp.train.trainer import run_pretraining

    out = tmp_path / "run"
    args = small_run_args(tmp_path, out, steps=1) + ["--loss.init_logit_bias", "auto", "--eval.zeroshot", "false"]
    args += ["--loss.init_logit_scale", "auto"]
    run_pretraining(parse_cli(PretrainConfig, args, PRETRAIN_ALIASES))
    first = next(r for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    assert first["logit_bias"] == pytest.approx(-math.log(7), abs=1e-6)
    assert math.exp(first["logit_scale"]) == pytest.approx(math.log(7), abs=1e-6)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["loss"]["init_logit_bias"] == pytest.approx(-math.log(7))
    assert saved["loss"]["init_logit_scale"] == pytest.approx(math.log(math.log(7)))


def run_script(args, env_extra=None, launcher=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "scripts" / "pretrain.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _chunked_and_naive(rank: int, world: int, shards: str, root: str) -> dict[str, list[float]]:
    """Per loss and impl, the per-step losses of 3 training steps in this process group (the default impl unnamed)."""
    from vlp.train.trainer import Trainer

    curves: dict[str, list[float]] = {}
    for loss in ("siglip", "clip"):
        for impl in ("chunked", "naive"):
            reset_accelerate()
            args = [
                "--loss",
                loss,
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--workers",
                "0",
                "--train-shards",
                shards,
                "--output-dir",
                f"{root}/{loss}-{impl}",
                "--warmup-steps",
                "1",
                "--eval.zeroshot",
                "false",
                "--checkpoint.export",
                "false",
                "--seed",
                "0",
            ]
            cfg = parse_cli(
                PretrainConfig, args + (["--loss.impl", "naive"] if impl == "naive" else []), PRETRAIN_ALIASES
            )
            assert cfg.loss.impl == impl
            trainer = Trainer(cfg)
            assert trainer.world.world_size == 2
            assert type(trainer.objective.loss_fn).__name__.startswith(impl.capitalize())  # ChunkedClipLoss, ...
            trainer.train()
            trainer.finish()
            curves[f"{loss}/{impl}"] = list(trainer.losses)
    reset_accelerate()
    return curves


def test_two_process_training_defaults_to_chunked_losses_equal_to_naive(synthetic_data, tmp_path):
    """The trainer on 2 gloo processes: the default (chunked) loss gives the naive one's per-step losses over 3
    updates, for SigLIP and CLIP. (All four runs share one process group; the launch through ``accelerate launch``
    is the test above.)"""
    assert LossConfig().impl == "chunked"
    res = run_distributed(_chunked_and_naive, 2, (synthetic_data.train_shards, str(tmp_path)), timeout=1200)
    for loss in ("siglip", "clip"):
        chunked, naive = res[0][f"{loss}/chunked"], res[0][f"{loss}/naive"]
        assert len(chunked) == len(naive) == 3, (chunked, naive)
        assert chunked == pytest.approx(naive, rel=1e-5, abs=0), (loss, chunked, naive)
        assert naive[0] != naive[-1]  # the parameters were updated between the steps
        assert res[1][f"{loss}/chunked"] == chunked  # both ranks log the same global loss


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--bach-size", "3"], "did you mean --batch-size"),
        (["--model", "vit-z", "--steps", "1"], "unknown model preset 'vit-z'; valid:"),
        (["--train-shards", "/nonexistent/x-{000..003}.tar", "--steps", "1"], "no shards found for"),
        (["--deepspeed", "zero9", "--steps", "1"], "DeepSpeed config 'zero9' not found"),
    ],
)
def test_user_mistakes_print_one_line_without_traceback(tmp_path, args, fragment):
    proc = run_script(args + ["--output-dir", str(tmp_path / "bad")])
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(err_lines) == 1 and fragment in err_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
