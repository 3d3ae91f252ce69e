"""SigLIP's initial bias and temperature against the global batch: final zero-shot top-1 for each (batch, initial
bias, initial temperature, seed), with CLIP at the same budget beside it (docs/training.md, "SigLIP's initial bias
and temperature").

Every run sees the same number of training pairs (``--samples``, default 64,000 = the README demo's 1000 steps of
64), so a larger batch takes fewer steps; warmup is ``--warmup-steps`` (default 50, the command line's default and
the demo's) or ``--warmup-ratio`` of every run's steps, and everything else is the demo's recipe. Runs go through
scripts/pretrain.py, ``--jobs`` at a time (the cores are split between them); results are appended to
``OUT/results.jsonl`` as runs finish, finished runs are skipped when the sweep is started again, and
``OUT/table.md`` is rewritten after each run.

    python scripts/benchmarks/siglip_bias_sweep.py --out runs/bias-sweep --batches 32 64 128 256 512 1024 \
        --biases -10 auto --scales auto 2.302585 --seeds 0 1 --jobs 2
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from pretrain_runs import pretrain_run, read_rows, run_all


def run_name(dataset: str, loss: str, batch: int, bias: str, scale: str, seed: int, centre: str = "default") -> str:
    tag = "clip" if loss == "clip" else f"siglip_b{bias}" + ("" if scale == "default" else f"_t{scale}")
    tag += "" if centre == "default" else f"_centre{centre}"
    return f"{dataset}-B{batch}-{tag}-s{seed}"


def initial_temperature(row: dict) -> float:
    """A row's initial t (rows written before the field existed used the loss's default then: 10 for SigLIP, 1/0.07
    for CLIP)."""
    return row.get("init_t", 10.0 if row["loss"] == "siglip" else 1 / 0.07)


def warmup_of(row: dict) -> int:
    """A row's warmup steps (rows written before the field existed warmed up for 5% of their steps)."""
    return row.get("warmup_steps", math.ceil(0.05 * row["steps"]))


def one_run(
    args: argparse.Namespace, loss: str, batch: int, bias: str, scale: str, centre: str, seed: int, threads: int
) -> dict | None:
    name = run_name(args.dataset, loss, batch, bias, scale, seed, centre)
    steps = math.ceil(args.samples / batch)
    flags = ["--loss", loss, "--batch-size", str(batch), "--steps", str(steps), "--seed", str(seed)]
    warmup = math.ceil(args.warmup_ratio * steps) if args.warmup_ratio is not None else args.warmup_steps
    flags += ["--optim.warmup-steps", str(warmup), "--train.log-every", str(max(1, steps // 20))]
    if args.dataset != "shapes":
        flags += ["--data.synthetic", args.dataset]
    if loss == "siglip":
        flags += ["--loss.init-logit-bias", bias]
        flags += [] if scale == "default" else ["--loss.init-logit-scale", scale]
    flags += [] if centre == "default" else ["--loss.centre-init", centre]
    row = pretrain_run(Path(args.out) / name, flags + args.extra, threads)
    if row is None:
        return None
    info = {"name": name, "dataset": args.dataset, "loss": loss, "batch": batch, "bias": bias, "scale": scale}
    info["seed"] = seed
    return {**info, "steps": steps, "warmup_steps": warmup, **row}


def centred_of(row: dict) -> str:
    """The towers a row's run centred (rows written before the field named them say true for both)."""
    value = row.get("centred", "off")
    return ("both" if value else "off") if isinstance(value, bool) else value


def write_table(out: Path, rows: list[dict]) -> None:
    """Mean (and min-max over seeds) of each family's top-1, one line per (dataset, batch, run kind)."""
    families = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("zeroshot/") and k.endswith("/top1")})
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        t = round(initial_temperature(r), 2)
        lrs = (r.get("bias_lr_scale", 1), r.get("temperature_lr_scale", 1), r.get("lr", 2e-3))
        key = (r["dataset"], r["batch"], warmup_of(r), r["loss"], r["bias"], t, centred_of(r), lrs)
        groups.setdefault(key, []).append(r)
    lines = ["| data | batch | steps | warmup | run | seeds | " + " | ".join(families) + " | image-to-text R1 |"]
    lines.append("|---" * (7 + len(families)) + "|")
    for (dataset, batch, warmup, loss, bias, t, centred, lrs), rs in sorted(groups.items(), key=lambda kv: kv[0][:4]):
        b_lr, t_lr, lr = lrs
        cells = []
        for f in families:
            vals = [100 * r[f"zeroshot/{f}/top1"] for r in rs if f"zeroshot/{f}/top1" in r]
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})")
        r1 = [100 * r["retrieval/image_to_text_R1"] for r in rs if "retrieval/image_to_text_R1" in r]
        cells.append(f"{statistics.mean(r1):.1f}" if r1 else "")
        auto = f"auto = {-math.log(batch - 1):.2f}"
        run = "CLIP" if loss == "clip" else f"SigLIP b = {auto if bias == 'auto' else bias}, t = {t:g}"
        run += {"off": "", "both": ", centred"}.get(centred, f", {centred} centred")
        run += "" if b_lr == 1 else f", b at {b_lr:g} x lr"
        run += "" if t_lr == 1 else f", t at {t_lr:g} x lr"
        mantissa, exponent = f"{lr:e}".split("e")
        run += "" if lr == 2e-3 else f", lr {mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        head = f"| {dataset} | {batch} | {rs[0]['steps']} | {warmup} | {run} | {seeds} | "
        lines.append(head + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bias-sweep")
    p.add_argument("--dataset", default="shapes", help="embedded synthetic set (--data.synthetic)")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument(
        "--biases", nargs="*", default=["-10", "auto"], help="SigLIP initial biases (numbers or auto; none: CLIP only)"
    )
    p.add_argument(
        "--scales",
        nargs="+",
        default=["default"],
        help="SigLIP initial log temperatures (numbers, auto, or default: the loss's default)",
    )
    p.add_argument(
        "--centre-inits",
        nargs="+",
        default=["default"],
        help="--loss.centre_init of every run (off, image, text, both, or default: the loss's default)",
    )
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP reference runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--samples", type=int, default=64_000, help="training pairs per run (steps = samples / batch)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps of every run")
    p.add_argument("--warmup-ratio", type=float, help="warm up for this fraction of each run's steps instead")
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
    done = {r["name"] for r in rows}
    todo = []
    for seed in args.seeds:
        for batch in args.batches:
            kinds = [("siglip", b, t, c) for b in args.biases for t in args.scales for c in args.centre_inits]
            kinds += [] if args.no_clip else [("clip", "-", "default", c) for c in args.centre_inits]
            for loss, bias, scale, centre in kinds:
                if run_name(args.dataset, loss, batch, bias, scale, seed, centre) not in done:
                    todo.append((loss, batch, bias, scale, centre, seed))
    run_all(
        todo,
        args.jobs,
        lambda item, threads: one_run(args, *item, threads=threads),
        results,
        lambda rows: write_table(out, rows),
        len(done),
    )


if __name__ == "__main__":
    main()
