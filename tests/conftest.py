"""Shared fixtures: small synthetic shards written once per session, deterministic torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """400 train / 100 held-out synthetic captioned images in 100-sample shards."""
    from data_pipelines.synthetic import ensure_synthetic_data

    return ensure_synthetic_data(
        tmp_path_factory.mktemp("synthetic"), num_train=400, num_eval=100, seed=0, shard_size=100
    )


@pytest.fixture(scope="session")
def two_process_launch(tmp_path_factory):
    """One real ``accelerate launch --num_processes 2 scripts/pretrain.py`` run (SigLIP, 4 steps of 2 x 8, evaluated
    every 2 steps, first batch of each rank saved), shared by the tests that check what a 2-process launch does
    (tests/test_pretrain.py, tests/test_eval_training.py): a launch costs ~18 s of start-up on 2 cores.
    Returns (completed process, run directory)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("launch2")
    out = tmp / "run"
    args = [
        *("--loss", "siglip", "--steps", "4", "--batch-size", "8", "--workers", "0", "--output-dir", str(out)),
        *("--data.synthetic_dir", str(tmp / "syn"), "--data.synthetic_train_samples", "200"),
        *("--data.synthetic_eval_samples", "50", "--warmup-steps", "1", "--eval-every", "2"),
        *("--eval.batch_size", "32", "--train.save_first_batch", "true"),
    ]
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(root / "scripts" / "pretrain.py"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for in-process work: the tensors are small, and on a shared 2-core machine threads spin
    against each other (and against the multi-process tests' workers) far more than they gain."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
