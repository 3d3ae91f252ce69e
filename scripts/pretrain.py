"""Pretrain a CLIP/SigLIP dual tower: `accelerate launch scripts/pretrain.py --loss siglip`."""

from __future__ import annotations

from vlp.cli import run_cli, setup_logging
from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
from vlp.launch import relaunch_on_cpu_if_requested


def main(argv: list[str]) -> int:
    cfg = parse_cli(PretrainConfig, argv, PRETRAIN_ALIASES, prog="pretrain.py")
    relaunch_on_cpu_if_requested(__file__, argv)
    setup_logging()
    from vlp.train.pretrain import run_pretraining

    summary = run_pretraining(cfg)
    if not summary["is_main"]:
        return 0
    if summary.get("zeroshot/num_images"):
        print(f"\nHeld-out zero-shot ({summary['zeroshot/num_images']} images), run in {summary['output_dir']}:")
        print(f"  {'family':<10} {'top-1':>7} {'top-5':>7} {'chance':>7}")
        families = sorted({k.split('/')[1] for k in summary if k.count("/") == 2})
        for fam in families:
            t1, t5, ch = (summary[f"zeroshot/{fam}/{m}"] for m in ("top1", "top5", "chance"))
            print(f"  {fam:<10} {t1:>7.1%} {t5:>7.1%} {ch:>7.1%}")
    print(f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over {summary['steps']} steps, "
          f"{summary['samples_per_s']:.0f} samples/s; summary.json in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
