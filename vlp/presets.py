"""Model presets: the YAML files in configs/models/ that name a dual tower's shapes and its preprocessing.

Reading them needs no torch, so command lines can check a preset name before the heavy imports; building the
model from a preset is vlp.model's job.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlp.config import ConfigError, load_yaml


def configs_dir() -> Path:
    """The shipped configs: models/, ssl/, adapter/, deepspeed/, accelerate/ (override with VLP_CONFIG_DIR).

    They live once, in the top-level ``configs/`` of the source tree; an installed package carries the same files as
    package data ``vlp/configs`` (pyproject.toml maps the one onto the other). Running from a checkout (editable
    install, or the checkout on PYTHONPATH) reads the checkout's folder, an installed wheel its package data.
    """
    env = os.environ.get("VLP_CONFIG_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs" / "models").is_dir():
        return checkout / "configs"
    return Path(str(importlib.resources.files("vlp") / "configs"))


def available_presets() -> list[str]:
    """Names of the model presets in configs/models/."""
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))


@dataclass
class ModelPreset:
    """A tower preset: open_clip-style model config plus the preprocessing that matches it."""

    name: str
    embed_dim: int
    vision_cfg: dict[str, Any]
    text_cfg: dict[str, Any]
    custom_text: bool = False
    quick_gelu: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    """None: open_clip's BPE tokenizer. ``{"hf": FOLDER}``: the transformers tokenizer saved in FOLDER (an imported
    checkpoint's own, e.g. SigLIP's SentencePiece or SigLIP 2's Gemma tokenizer); a relative FOLDER is relative to
    the preset file. ``open_clip: {...}`` (an imported open_clip model's ``text_cfg.tokenizer_kwargs``): call it
    through open_clip's HFTokenizer with those arguments (its text cleaning), as open_clip does."""

    @property
    def image_size(self) -> int:
        size = self.vision_cfg.get("image_size", 224)
        return size if isinstance(size, int) else int(size[0])

    @property
    def context_length(self) -> int:
        return int(self.text_cfg.get("context_length", 77))

    def open_clip_config(self) -> dict[str, Any]:
        """The preset as an open_clip model config dict (as in open_clip's model_configs/*.json)."""
        cfg = {
            "embed_dim": self.embed_dim,
            "vision_cfg": copy.deepcopy(self.vision_cfg),
            "text_cfg": copy.deepcopy(self.text_cfg),
        }
        if self.quick_gelu:
            cfg["quick_gelu"] = True
        if self.custom_text:
            cfg["custom_text"] = True
        return cfg


PRESET_FILE = "preset.yaml"
_PRESET_KEYS = ("name", "embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu", "preprocess", "tokenizer")


def preset_from_dict(
    data: dict[str, Any], source: str, default_name: str, base_dir: str | Path | None = None
) -> ModelPreset:
    """A preset from its YAML mapping (``name`` optional); unknown or missing keys are a ConfigError naming
    ``source``. A relative tokenizer folder is taken relative to ``base_dir`` (the preset file's folder)."""
    unknown = set(data) - set(_PRESET_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown preset keys {sorted(unknown)}; valid: {sorted(_PRESET_KEYS)}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in data:
            raise ConfigError(f"{source}: preset is missing {key!r}")
    data = copy.deepcopy(data)
    tok = data.get("tokenizer")
    if tok is not None:
        if not (
            isinstance(tok, dict)
            and "hf" in tok
            and set(tok) <= {"hf", "open_clip"}
            and isinstance(tok["hf"], str)
            and isinstance(tok.get("open_clip", {}), dict)
        ):
            raise ConfigError(
                f"{source}: tokenizer {tok!r}; valid: omit it (open_clip BPE), {{hf: FOLDER}} or "
                "{hf: FOLDER, open_clip: {HFTokenizer kwargs}}"
            )
        folder = Path(tok["hf"])
        if not folder.is_absolute() and base_dir is not None:  # relative to the preset file
            data["tokenizer"] = {**tok, "hf": str((Path(base_dir) / folder).resolve())}
    return ModelPreset(**{"name": default_name, **data})


def preset_to_dict(preset: ModelPreset) -> dict[str, Any]:
    """The preset as plain data (YAML, and torch.load(weights_only=True) in checkpoints)."""
    return copy.deepcopy(dataclasses.asdict(preset))


def load_preset(name_or_path: str) -> ModelPreset:
    """Read a preset by name (configs/models/NAME.yaml) or from a YAML path (a run's preset.yaml too)."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = configs_dir() / "models" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown model preset {name_or_path!r}; valid: {', '.join(available_presets())} "
            "(or a path to a preset .yaml)"
        )
    return preset_from_dict(load_yaml(path), str(path), path.stem, path.parent)


def save_run_preset(preset: ModelPreset, run_dir: str | Path) -> Path:
    """Write the resolved preset (architecture and preprocessing) as ``run_dir/preset.yaml``, so that the run
    reloads as it was trained whatever configs/models/ holds later. Atomic (temp file, then rename)."""
    path = Path(run_dir) / PRESET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PRESET_FILE}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(preset_to_dict(preset), sort_keys=False))
    os.replace(tmp, path)
    return path


def load_run_preset(path: str | Path) -> ModelPreset:
    """The preset a run was trained with: ``path`` is its preset.yaml or the run directory holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / PRESET_FILE
    if not p.is_file():
        raise ConfigError(f"{p}: no run preset (a run directory written by this project holds {PRESET_FILE})")
    return preset_from_dict(load_yaml(p), str(p), p.parent.name if p.name == PRESET_FILE else p.stem, p.parent)
