"""Export a run to transformers or open_clip, or import a transformers CLIP/SigLIP folder or an open_clip checkpoint.

python scripts/export_hf.py --checkpoint RUN_OR_FILE --output DIR --format hf-vision|hf-full|open_clip
python scripts/export_hf.py --checkpoint HF_DIR --output RUN_DIR --format import-hf [--preset NAME] [--loss clip]
python scripts/export_hf.py --checkpoint OPEN_CLIP_DIR_OR_WEIGHTS --output RUN_DIR --format import-open_clip
    [--model-config ViT-B-32|CONFIG.json]
"""

from __future__ import annotations

from vlp.cli import run_cli
from vlp.entrypoints import export_main as main  # also the console script `vlp-export`

if __name__ == "__main__":
    run_cli(main)
