"""Write WebDataset shards (+ metadata) from an image folder, a CSV/JSONL file or a Hugging Face dataset.

python scripts/make_shards.py --input photos/ --output-dir shards/ --prefix train --samples-per-shard 10000
python scripts/make_shards.py --input captions.jsonl --image-column path --caption-column text --output-dir s/
python scripts/make_shards.py --input my_hf_dataset/ --caption-column text --max-side 512 --jpeg-quality 90 ...
python scripts/make_shards.py --index --input '/data/cc3m/{00000..00331}.tar' --prefix cc3m   # counts only
"""

from __future__ import annotations

from vlp.cli import run_cli
from vlp.entrypoints import make_shards_main as main  # also the console script `vlp-make-shards`

if __name__ == "__main__":
    run_cli(main)
