"""Tiny stand-ins for real checkpoints: randomly initialised Hugging Face vision towers written to local folders.

They load exactly as a downloaded CLIPVisionModel / SiglipVisionModel folder would, so tests and smoke runs
exercise the same code paths as real towers without any download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.vision import default_image_processor


def save_tiny_hf_vision(
    folder: str | Path,
    kind: str = "clip",
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 32,
    layers: int = 3,
    seed: int = 0,
) -> Path:
    """Write a random CLIPVisionModel (``kind='clip'``) or SiglipVisionModel (``'siglip'``) and its processor."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    shape = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    if kind == "clip":
        config, cls = CLIPVisionConfig(**shape), CLIPVisionModel
    elif kind == "siglip":
        config, cls = SiglipVisionConfig(**shape), SiglipVisionModel
    else:
        raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    default_image_processor(config).save_pretrained(folder)
    return folder
