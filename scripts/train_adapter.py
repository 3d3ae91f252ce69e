"""Train a LLaVA-style projector from a frozen vision tower into a frozen LLM:
`accelerate launch scripts/train_adapter.py [--tower DIR] [--llm DIR] [--format llava]`."""

from __future__ import annotations

from vlp.cli import run_cli
from vlp.entrypoints import train_adapter_main as main  # also the console script `vlp-train-adapter`

if __name__ == "__main__":
    run_cli(main)
