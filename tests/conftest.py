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

    return ensure_synthetic_data(tmp_path_factory.mktemp("synthetic"), num_train=400, num_eval=100, seed=0,
                                 shard_size=100)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
