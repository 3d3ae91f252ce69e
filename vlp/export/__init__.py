"""Conversion of trained dual towers to Hugging Face transformers and open_clip folders, and import from both.

``run_export(ExportConfig)`` is what ``scripts/export_hf.py`` calls; the format functions are usable directly.
"""

from vlp.export.card import model_card, write_model_card
from vlp.export.hf import (
    export_hf_full,
    export_hf_vision,
    hf_full_config,
    hf_full_state,
    hf_vision_config,
    hf_vision_state,
    import_hf,
    load_hf_weights,
    preset_from_hf,
    save_imported,
)
from vlp.export.keymaps import KeyMapError, hf_to_ours, ours_to_hf
from vlp.export.open_clip_format import export_open_clip, import_open_clip
from vlp.export.run import FORMATS, ExportConfig, run_export
from vlp.export.towers import NotRepresentableError

__all__ = [
    "FORMATS",
    "ExportConfig",
    "KeyMapError",
    "NotRepresentableError",
    "export_hf_full",
    "export_hf_vision",
    "export_open_clip",
    "hf_full_config",
    "hf_full_state",
    "hf_to_ours",
    "hf_vision_config",
    "hf_vision_state",
    "import_hf",
    "import_open_clip",
    "load_hf_weights",
    "model_card",
    "ours_to_hf",
    "preset_from_hf",
    "run_export",
    "save_imported",
    "write_model_card",
]
