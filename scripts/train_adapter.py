"""Train a LLaVA-style projector from a frozen vision tower into a frozen LLM:
`accelerate launch scripts/train_adapter.py [--tower DIR] [--llm DIR] [--format llava]`."""

from __future__ import annotations

import sys

import adapters.objective  # noqa: F401 - registers the llava-projector objective
from adapters.config import ADAPTER_ALIASES, AdapterConfig
from vlp.cli import run_cli, setup_logging
from vlp.config import parse_cli
from vlp.launch import relaunch_on_cpu_if_requested


def main(argv: list[str]) -> int:
    cfg = parse_cli(AdapterConfig, argv, ADAPTER_ALIASES, prog="train_adapter.py")
    relaunch_on_cpu_if_requested(__file__, argv)
    setup_logging()
    from vlp.train.guards import TrainingDiverged
    from vlp.train.trainer import run_training

    try:
        s = run_training(cfg)
    except TrainingDiverged as e:
        print(f"train_adapter.py: {e}", file=sys.stderr)
        return 3
    if not s["is_main"]:
        return 0
    curve = s.get("eval_caption_loss", [])
    if len(curve) > 1:
        print(f"held-out caption loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f} "
              f"({100 * s['eval_loss_drop']:.1f}% lower) after {s['steps']} steps")
    if s["first_loss"] is not None:
        print(f"train loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, {s['train_time_s']:.1f}s")
    print(f"projector: {s['projector_checkpoint']}")
    if "llava_dir" in s:
        print(f"LLaVA folder (LlavaForConditionalGeneration / AutoProcessor): {s['llava_dir']}")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
