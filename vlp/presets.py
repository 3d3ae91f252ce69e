"""Model presets: the YAML files in configs/models/ that name a dual tower's shapes and its preprocessing.

Reading them needs no torch, so command lines can check a preset name before the heavy imports; building the
model from a preset is vlp.model's job.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp.config import ConfigError, load_yaml


def configs_dir() -> Path:
    """The repository's configs/ folder (override with VLP_CONFIG_DIR)."""
    env = os.environ.get("VLP_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


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
        cfg = {"embed_dim": self.embed_dim, "vision_cfg": copy.deepcopy(self.vision_cfg),
               "text_cfg": copy.deepcopy(self.text_cfg)}
        if self.quick_gelu:
            cfg["quick_gelu"] = True
        if self.custom_text:
            cfg["custom_text"] = True
        return cfg


def load_preset(name_or_path: str) -> ModelPreset:
    """Read a preset by name (configs/models/NAME.yaml) or from a YAML path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = configs_dir() / "models" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name_or_path!r}; valid: {', '.join(available_presets())} "
                          "(or a path to a preset .yaml)")
    data = load_yaml(path)
    known = {"embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu", "preprocess", "tokenizer"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown preset keys {sorted(unknown)}; valid: {sorted(known)}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in data:
            raise ConfigError(f"{path}: preset is missing {key!r}")
    tok = data.get("tokenizer")
    if tok is not None:
        if not (isinstance(tok, dict) and "hf" in tok and set(tok) <= {"hf", "open_clip"} and isinstance(tok["hf"], str)
                and isinstance(tok.get("open_clip", {}), dict)):
            raise ConfigError(f"{path}: tokenizer {tok!r}; valid: omit it (open_clip BPE), {{hf: FOLDER}} or "
                              "{hf: FOLDER, open_clip: {HFTokenizer kwargs}}")
        folder = Path(tok["hf"])
        data["tokenizer"] = {**tok, "hf": str(folder if folder.is_absolute() else (path.parent / folder).resolve())}
    return ModelPreset(name=path.stem, **data)
