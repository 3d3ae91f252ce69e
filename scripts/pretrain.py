"""Pretrain a CLIP/SigLIP dual tower: `accelerate launch scripts/pretrain.py --loss siglip`.

DeepSpeed: `accelerate launch --config_file configs/accelerate/zero2.yaml scripts/pretrain.py ...` (or
`--deepspeed zero2` under any launcher); see docs/training.md.
"""

from __future__ import annotations

import sys

from vlp.cli import run_cli, setup_logging
from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
from vlp.launch import relaunch_on_cpu_if_requested
from vlp.preflight import check_pretrain_inputs


def main(argv: list[str]) -> int:
    cfg = parse_cli(PretrainConfig, argv, PRETRAIN_ALIASES, prog="pretrain.py")
    check_pretrain_inputs(cfg)  # a wrong preset, shard path or DeepSpeed config fails here, before torch is imported
    relaunch_on_cpu_if_requested(__file__, argv)
    setup_logging()
    from vlp.train.guards import TrainingDiverged
    from vlp.train.pretrain import run_pretraining

    try:
        summary = run_pretraining(cfg)
    except TrainingDiverged as e:
        print(f"pretrain.py: {e}", file=sys.stderr)
        return 3
    if not summary["is_main"]:
        return 0
    if summary.get("zeroshot/num_images"):
        print(f"\nHeld-out zero-shot ({summary['zeroshot/num_images']} images), run in {summary['output_dir']}:")
        print(f"  {'family':<10} {'top-1':>7} {'top-5':>7} {'chance':>7}")
        families = sorted({k.split("/")[1] for k in summary if k.startswith("zeroshot/") and k.count("/") == 2})
        for fam in families:
            t1, t5, ch = (summary[f"zeroshot/{fam}/{m}"] for m in ("top1", "top5", "chance"))
            print(f"  {fam:<10} {t1:>7.1%} {t5:>7.1%} {ch:>7.1%}")
    if summary["final_loss"] is not None:
        print(f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} up to step {summary['steps']}, "
              f"{summary['samples_per_s']:.0f} samples/s; summary.json in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
