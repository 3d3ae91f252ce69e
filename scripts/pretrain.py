"""Pretrain a CLIP/SigLIP dual tower: `accelerate launch scripts/pretrain.py --loss siglip`.

DeepSpeed: `accelerate launch --config_file configs/accelerate/zero2.yaml scripts/pretrain.py ...` (or
`--deepspeed zero2` under any launcher); see docs/training.md.
"""

from __future__ import annotations

from vlp.cli import run_cli
from vlp.entrypoints import pretrain_main as main  # also the console script `vlp-pretrain`

if __name__ == "__main__":
    run_cli(main)
