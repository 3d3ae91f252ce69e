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
