"""Zero-shot classification and retrieval of a vlp run or an open_clip model.

python scripts/eval_zeroshot.py --checkpoint runs/RUN                      # the run's held-out data
python scripts/eval_zeroshot.py --checkpoint runs/RUN --image-folder DIR --templates openai
python scripts/eval_zeroshot.py --open-clip-model ViT-B-32 --pretrained weights.pt --hf-dataset DIR
"""

from __future__ import annotations

from vlp.cli import run_cli
from vlp.entrypoints import eval_main as main  # also the console script `vlp-eval`

if __name__ == "__main__":
    run_cli(main)
