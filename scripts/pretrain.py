"""Pretrain a CLIP/SigLIP dual tower: `accelerate launch scripts/pretrain.py --loss siglip`.

DeepSpeed: `accelerate launch --config_file configs/accelerate/zero2.yaml scripts/pretrain.py ...` (or
`--deepspeed zero2` under any launcher); see docs/training.md.
"""

from __future__ import annotations

import sys

from vlp.cli import run_cli, setup_logging
from vlp.config import PRETRAIN_ALIASES, parse_cli
from vlp.launch import relaunch_on_cpu_if_requested
from vlp.objectives import run_config_class
from vlp.preflight import check_pretrain_inputs


def main(argv: list[str]) -> int:
    cfg = parse_cli(run_config_class(), argv, PRETRAIN_ALIASES, prog="pretrain.py")
    check_pretrain_inputs(cfg)  # a wrong preset, shard path or DeepSpeed config fails here, before torch is imported
    relaunch_on_cpu_if_requested(__file__, argv)
    setup_logging()
    from vlp.train.guards import TrainingDiverged
    from vlp.train.trainer import run_training

    try:
        summary = run_training(cfg)
    except TrainingDiverged as e:
        print(f"pretrain.py: {e}", file=sys.stderr)
        return 3
    if not summary["is_main"]:
        return 0
    tasks = sorted({k.split("/")[1] for k in summary if k.startswith("zeroshot/") and k.endswith("/top1")})
    if tasks:
        n = summary.get("zeroshot/num_images", "?")
        print(f"\nHeld-out zero-shot ({n} images), run in {summary['output_dir']}:")
        print(f"  {'family':<10} {'top-1':>7} {'top-5':>7} {'chance':>7}")
        for task in tasks:
            t1, t5, ch = (summary[f"zeroshot/{task}/{m}"] for m in ("top1", "top5", "chance"))
            print(f"  {task:<10} {t1:>7.1%} {t5:>7.1%} {ch:>7.1%}")
    recall = {k: v for k, v in summary.items() if k.startswith("retrieval/") and k.endswith("_R1")}
    for key, value in sorted(recall.items()):
        print(f"  {key.removeprefix('retrieval/').replace('_', ' ')}: {value:.1%}")
    if summary["final_loss"] is not None:
        print(f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} up to step {summary['steps']}, "
              f"{summary['samples_per_s']:.0f} samples/s; summary.json in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
