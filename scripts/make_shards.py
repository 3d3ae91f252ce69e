"""Write WebDataset shards (+ metadata) from an image folder, a CSV/JSONL file or a Hugging Face dataset.

    python scripts/make_shards.py --input photos/ --output-dir shards/ --prefix train --samples-per-shard 10000
    python scripts/make_shards.py --input captions.jsonl --image-column path --caption-column text --output-dir s/
    python scripts/make_shards.py --input my_hf_dataset/ --caption-column text --max-side 512 --jpeg-quality 90 ...
    python scripts/make_shards.py --index --input '/data/cc3m/{00000..00331}.tar' --prefix cc3m   # counts only
"""

from __future__ import annotations

import json

from vlp.cli import run_cli, setup_logging
from vlp.config import parse_cli


def main(argv: list[str]) -> int:
    from data_pipelines.writer import MakeShardsConfig, make_shards

    cfg = parse_cli(MakeShardsConfig, argv, prog="make_shards.py")
    setup_logging()
    report = make_shards(cfg)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
