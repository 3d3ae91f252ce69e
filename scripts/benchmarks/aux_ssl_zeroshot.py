"""Zero-shot top-1 with and without an auxiliary self-supervised term (docs/ssl.md, "Auxiliary SSL"): SigLIP,
SigLIP + each ``--aux-ssl`` method, and CLIP, at the same steps, batch, seed and recipe on the embedded demo data.

Each arm is one scripts/pretrain.py run (the demo recipe unless ``--`` passes more flags); the auxiliary methods
use the tiny recipes' heads and crops (512 hidden / 128 out, crop area 0.35-1; DINO: K = 1024, bottleneck 128,
batch norm in the head, 4 local crops of 32 px, teacher momentum 0.99, last layer frozen for 0.16 epoch; MoCo: v3,
momentum 0.99). Results are appended to ``OUT/results.jsonl`` as runs finish, finished arms are skipped when
started again (with the same --steps: an OUT of other lengths is refused), and ``OUT/table.md`` is rewritten after
each run.

    python scripts/benchmarks/aux_ssl_zeroshot.py --out runs/aux-ssl --steps 500 --seeds 0 --jobs 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from pretrain_runs import pretrain_run, read_rows, run_all

TINY_HEADS = {
    "simclr": ["--ssl.simclr.hidden-dim", "512", "--ssl.simclr.out-dim", "128"],
    "moco": ["--ssl.moco.hidden-dim", "512", "--ssl.moco.out-dim", "128", "--ssl.moco.momentum", "0.99"],
    "byol": ["--ssl.byol.hidden-dim", "512", "--ssl.byol.out-dim", "128"],
    "dino": [
        *("--ssl.dino.out-dim", "1024", "--ssl.dino.hidden-dim", "512", "--ssl.dino.bottleneck-dim", "128"),
        *(
            "--ssl.dino.local-crops",
            "4",
            "--ssl.dino.freeze-last-layer-epochs",
            "0.16",
            "--ssl.dino.batch-norm",
            "--ssl.dino.momentum",
            "0.99",
        ),
        *("--ssl.views.local-crop-scale", "0.1", "0.35", "--ssl.views.local-crop-size", "32"),
    ],
}
NAMES = {"simclr": "SimCLR", "moco": "MoCo v3", "byol": "BYOL", "dino": "DINO"}
ARMS = ["siglip", "clip", "siglip+simclr", "siglip+moco", "siglip+byol", "siglip+dino"]


def arm_flags(arm: str) -> list[str]:
    loss, _, aux = arm.partition("+")
    flags = ["--loss", loss]
    if aux:
        flags += ["--aux-ssl", aux, "--ssl.views.crop-scale", "0.35", "1.0", *TINY_HEADS[aux]]
    return flags


def write_table(out: Path, rows: list[dict]) -> None:
    """Mean (min-max over seeds) zero-shot top-1 of each label family and image-to-text R@1, one line per arm."""
    families = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("zeroshot/") and k.endswith("/top1")})
    lines = ["| run | steps | seeds | " + " | ".join(families) + " | image-to-text R1 | final loss | wall s |"]
    lines.append("|---" * (6 + len(families)) + "|")
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        cells = []
        for key in [f"zeroshot/{f}/top1" for f in families] + ["retrieval/image_to_text_R1"]:
            vals = [100 * r[key] for r in rs if key in r]
            one = f"{statistics.mean(vals):.1f}" if vals else ""
            cells.append(one + (f" ({min(vals):.1f}-{max(vals):.1f})" if len(vals) > 1 else ""))
        cells.append(f"{statistics.mean(r['final_loss'] for r in rs):.3f}")
        cells.append(f"{statistics.mean(r['wall_s'] for r in rs):.0f}")
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        loss, _, method = arm.partition("+")
        name = {"siglip": "SigLIP", "clip": "CLIP"}[loss] + (f" + {NAMES[method]}" if method else "")
        lines.append(f"| {name} | {rs[0]['steps']} | {seeds} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/aux-ssl")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (the machine's cores are split)")
    p.add_argument("--table-only", action="store_true", help="rewrite OUT/table.md from OUT/results.jsonl, run nothing")
    p.add_argument("extra", nargs="*", help="further scripts/pretrain.py flags (after --)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = read_rows(results)
    if args.table_only:
        write_table(out, rows)
        print((out / "table.md").read_text())
        return
    if any(r["steps"] != args.steps for r in rows):
        raise SystemExit(f"{results} holds runs of other lengths than --steps {args.steps}: use another --out")
    done = {r["name"] for r in rows}
    todo = [(a, s) for s in args.seeds for a in args.arms if f"{a}-s{s}" not in done]

    def run_one(item: tuple[str, int], threads: int) -> dict | None:
        arm, seed = item
        name = f"{arm}-s{seed}"
        flags = arm_flags(arm) + ["--steps", str(args.steps), "--seed", str(seed), *args.extra]
        row = pretrain_run(out / name, flags, threads)
        return None if row is None else {"name": name, "arm": arm, "seed": seed, "steps": args.steps, **row}

    run_all(todo, args.jobs, run_one, results, lambda rows: write_table(out, rows), len(done))


if __name__ == "__main__":
    main()
