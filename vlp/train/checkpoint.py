"""Atomic checkpoint files: written to a temporary name in the same folder, then renamed."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    # plain containers and tensors only, so checkpoints load with torch.load(weights_only=True)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` so that a crash never leaves a partial file under that name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_trained_model(path: str | Path, map_location: str = "cpu"):
    """Rebuild a trained DualTower and its PretrainConfig from a run directory or checkpoint file.

    Accepts a run directory (``checkpoint.pt`` or ``model.safetensors`` beside ``config.yaml``), a ``.pt``
    checkpoint holding ``model`` and ``config``, or a ``.safetensors`` file with ``config.yaml`` beside it.
    """
    from vlp.config import ConfigError, PretrainConfig, from_dict, load_yaml
    from vlp.model import build_model, load_preset

    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "checkpoint.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: no checkpoint.pt or model.safetensors in this run directory")
        path = found
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=map_location)
        cfg_file = path.with_name("config.yaml")
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: expected config.yaml beside the weights")
        cfg_dict = load_yaml(cfg_file)
    else:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if "model" not in ckpt or "config" not in ckpt:
            raise ConfigError(f"{path}: not a vlp checkpoint (needs 'model' and 'config' entries)")
        state, cfg_dict = ckpt["model"], ckpt["config"]
    cfg = from_dict(PretrainConfig, cfg_dict)
    model = build_model(load_preset(cfg.model.name), cfg.loss)
    model.load_state_dict(state)
    return model, cfg
