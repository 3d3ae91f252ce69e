#!/usr/bin/env python
"""SSL side by side with lightly: vlp's SimCLR, MoCo v2, MoCo v3, BYOL and DINO against lightly 1.6's.

For each method and seed, two arms train in lock-step on identical inputs:

- **vlp**: exactly what ``scripts/pretrain.py --config configs/ssl/<method>-tiny.yaml`` builds (the registered
  standalone objective: image tower + vlp.ssl heads/teacher/queue; MoCo v2 adds ``--ssl.moco.version 2``), with
  ``--model``, ``--steps``, ``--batch-size``, ``--lr`` and ``--warmup-steps`` overridden for both arms alike.
- **lightly**: lightly's heads, losses, momentum utilities, cosine schedule and memory bank
  (scripts/benchmarks/ssl_lightly.py) on a copy of the same initial image trunk, with the same head sizes,
  temperatures and momenta (read from the same config).

Same for both: the backbone and its initialisation (a copy of the vlp arm's trunk before the first step), the
data (the captioned demo set's training split, ``--data.synthetic shapes``, whatever set the configs name: the
label families below are that set's; one shuffled order per seed), the views (each batch's views are
made once with vlp's view pipeline for the method and fed to both arms), the batch, the steps, the optimiser
(vlp's AdamW parameter groups, warmup-cosine schedule and gradient clipping) and the seed.

Reported per method, arm and seed: leave-one-out 20-NN top-1 (``vlp.ssl.monitor.knn_top1``) of the trunk's pooled
features on the held-out split for each label family (shape, color, size, position), the collapse statistic
(``vlp.ssl.base.collapse_statistic``) of the same features, and the mean loss of the last 10 steps; then mean and
spread (half the range) over seeds, with the untrained trunk as the baseline row. Prints a JSON document and a
markdown table, and writes both under ``--out``.

    pip install -e .[benchmark]                       # lightly 1.6
    OMP_NUM_THREADS=1 python scripts/benchmarks/ssl_reference.py --methods simclr dino --seeds 0 1 --steps 300
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("simclr", "moco-v2", "moco-v3", "byol", "dino")
FAMILIES = ("shape", "color", "size", "position")


def run_config(method: str, args: argparse.Namespace):
    """The run config ``scripts/pretrain.py`` would build for ``method``'s tiny recipe with the shared overrides."""
    from vlp.config import PRETRAIN_ALIASES, parse_cli
    from vlp.objectives import run_config_class

    recipe = "moco" if method.startswith("moco") else method
    argv = ["--config", str(ROOT / "configs" / "ssl" / f"{recipe}-tiny.yaml"), "--model", args.model]
    argv += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--workers", "0"]
    argv += ["--data.synthetic", "shapes"]  # the set whose families FAMILIES reads (the configs name silhouettes)
    if args.lr is not None:
        argv += ["--lr", str(args.lr)]
    if args.warmup_steps is not None:
        argv += ["--warmup-steps", str(args.warmup_steps)]
    if method == "moco-v2":
        argv += ["--ssl.moco.version", "2"]
    for item in args.set:
        key, _, value = item.partition("=")
        argv += [f"--{key}", value]
    return parse_cli(run_config_class(), argv, PRETRAIN_ALIASES)


def load_split(shards: str, limit: int | None = None) -> tuple[list, list[dict]]:
    """Decoded images and json labels of a shard set, in order."""
    from data_pipelines.loader import build_eval_samples

    images, labels = [], []
    for sample in build_eval_samples(shards, require_text=False):
        images.append(sample["image"])
        labels.append(sample["json"] or {})
        if limit and len(images) >= limit:
            break
    return images, labels


class HeldOut:
    """The held-out images (eval transform) and their integer labels per family."""

    def __init__(self, images: list, labels: list[dict], preset) -> None:
        import torch

        from vlp.model import build_transforms

        tf = build_transforms(preset, is_train=False)
        self.pixels = torch.stack([tf(im) for im in images])
        self.labels = {}
        for fam in FAMILIES:
            names = sorted({str(x[fam]) for x in labels})
            self.labels[fam] = torch.tensor([names.index(str(x[fam])) for x in labels])

    def evaluate(self, trunk) -> dict[str, float]:
        """k-NN top-1 per family and the collapse statistic of ``trunk``'s pooled features (eval mode)."""
        import torch

        from vlp.ssl.base import collapse_statistic
        from vlp.ssl.monitor import knn_top1

        was = trunk.training
        trunk.eval()
        with torch.no_grad():
            feats = torch.cat([trunk(self.pixels[i : i + 250]) for i in range(0, len(self.pixels), 250)])
        trunk.train(was)
        out = {f"knn_{fam}": knn_top1(feats, lab, k=20) for fam, lab in self.labels.items()}
        out["collapse"] = float(collapse_statistic(feats))
        return out


def train_pair(method: str, seed: int, args, train_images: list, held: HeldOut, bar) -> dict[str, Any]:
    """Both arms of ``method`` for one seed, in lock-step; their final metrics and loss curves."""
    import numpy as np
    import torch
    from ssl_lightly import build_arm

    from data_pipelines.collate import collate
    from vlp.distributed import world_info
    from vlp.objectives import get_objective
    from vlp.objectives.base import build_dual_tower
    from vlp.ssl.backbone import backbone_dim
    from vlp.train.optim import build_optimizer, build_scheduler

    cfg = run_config(method, args)
    torch.manual_seed(seed)
    model, preset = build_dual_tower(cfg)
    objective = get_objective(cfg.objective).build(cfg, world_info(), model=model, preset=preset)
    trunk0 = copy.deepcopy(objective.visual.trunk)
    torch.manual_seed(seed + 10_000)
    lightly = build_arm(method, trunk0, backbone_dim(objective.visual), cfg, objective.method)

    arms = {
        "vlp": {"module": objective, "params": objective},
        "lightly": {"module": lightly, "params": lightly.trainable},
    }
    for arm in arms.values():
        arm["opt"] = build_optimizer(arm["params"], cfg.optim)
        arm["sched"] = build_scheduler(arm["opt"], cfg.optim, cfg.train.steps)
        arm["module"].train()
        arm["losses"] = []

    order = np.random.default_rng(seed).permutation(len(train_images))
    torch.manual_seed(seed + 20_000)  # the views' randomness (torchvision draws from the global generator)
    b, steps = cfg.train.batch_size, cfg.train.steps
    t0 = time.perf_counter()
    for index in range(steps):
        idx = np.take(order, range(index * b, (index + 1) * b), mode="wrap")  # full batches past an epoch too
        views = collate([objective.sample_transform({"image": train_images[i]}) for i in idx])["ssl_views"]
        for name, arm in arms.items():
            if name == "vlp":
                loss, _ = objective({"ssl_views": views})
            else:
                loss, _ = lightly.loss(views, index)
            arm["opt"].zero_grad(set_to_none=True)
            loss.backward()
            if name == "lightly":
                lightly.before_optimizer_step(index)
            params = [p for g in arm["opt"].param_groups for p in g["params"]]
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            arm["opt"].step()
            arm["sched"].step()
            if name == "vlp":
                objective.after_step(index + 1, steps)
            else:
                lightly.after_step(index, steps)
            arm["losses"].append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(vlp=f"{arms['vlp']['losses'][-1]:.3f}", lightly=f"{arms['lightly']['losses'][-1]:.3f}")
    wall = time.perf_counter() - t0

    result: dict[str, Any] = {"method": method, "seed": seed, "wall_s": round(wall, 1)}
    trunks = {"vlp": objective.visual.trunk, "lightly": lightly.backbone}
    for name, arm in arms.items():
        curve = arm["losses"]
        result[name] = {
            **held.evaluate(trunks[name]),
            "loss_first10": float(np.mean(curve[:10])),
            "loss_last10": float(np.mean(curve[-10:])),
            "loss_curve": [round(x, 4) for x in curve],
        }
    return result


def baseline(seed: int, args, held: HeldOut) -> dict[str, float]:
    """The untrained trunk of ``seed`` (what both arms start from)."""
    import torch

    from vlp.objectives.base import build_dual_tower

    torch.manual_seed(seed)
    model, _ = build_dual_tower(run_config("simclr", args))
    return held.evaluate(model.visual.trunk)


def summarise(results: list[dict], baselines: dict[int, dict]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{row: {metric: [mean, spread]}}: rows are 'random' and '<method> (<arm>)', spread = half the range."""
    keys = [f"knn_{f}" for f in FAMILIES] + ["collapse", "loss_last10"]

    def stat(values: list[float]) -> list[float]:
        return [sum(values) / len(values), (max(values) - min(values)) / 2]

    rows: dict[str, dict[str, list[float]]] = {}
    rows["random"] = {k: stat([b[k] for b in baselines.values()]) for k in keys if k != "loss_last10"}
    for method in dict.fromkeys(r["method"] for r in results):
        for arm in ("vlp", "lightly"):
            runs = [r[arm] for r in results if r["method"] == method]
            rows[f"{method} ({arm})"] = {k: stat([x[k] for x in runs]) for k in keys}
    return rows


def markdown(rows: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    head = "| run | " + " | ".join(f"k-NN {f}" for f in FAMILIES) + " | collapse | loss, last 10 steps |"
    lines = [head, "|" + "---|" * 7]
    for name, r in rows.items():
        cells = [f"{100 * r[f'knn_{f}'][0]:.1f} ± {100 * r[f'knn_{f}'][1]:.1f}" for f in FAMILIES]
        cells.append(f"{r['collapse'][0]:.2f} ± {r['collapse'][1]:.2f}")
        cells.append(f"{r['loss_last10'][0]:.3f} ± {r['loss_last10'][1]:.3f}" if "loss_last10" in r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nk-NN top-1 in %, mean ± half the range over seeds {seeds}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--model", default="tiny-resnet-hr")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak AdamW lr for every method (default: each recipe's)")
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more pretrain options for both arms, e.g. ssl.dino.batch_norm=false ssl.dino.momentum=0.996",
    )
    p.add_argument("--out", default="runs/ssl_reference")
    p.add_argument("--resume", action="store_true", help="reuse (method, seed) results already in --out/results.json")
    args = p.parse_args()

    import torch
    from tqdm.auto import tqdm

    from data_pipelines.synthetic import ensure_synthetic_data
    from vlp.model import load_preset

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "results.json"
    previous = json.loads(cache.read_text())["runs"] if args.resume and cache.is_file() else []
    done = {(r["method"], r["seed"]): r for r in previous}

    synth = ensure_synthetic_data(num_train=20000, num_eval=1000, seed=0)
    need = max(args.steps * args.batch_size, 1)
    train_images, _ = load_split(synth.train_shards, limit=min(need * 4, synth.num_train))
    held_images, held_labels = load_split(synth.eval_shards)
    held = HeldOut(held_images, held_labels, load_preset(args.model))
    baselines = {s: baseline(s, args, held) for s in args.seeds}

    results = [r for r in previous if r["method"] in args.methods and r["seed"] in args.seeds]
    todo = [(m, s) for s in args.seeds for m in args.methods if (m, s) not in done]
    bar = tqdm(total=len(todo) * args.steps, desc="ssl_reference", unit="step")
    for method, seed in todo:
        bar.set_description(f"{method} seed {seed}")
        results.append(train_pair(method, seed, args, train_images, held, bar))
        keep = [r for r in previous if (r["method"], r["seed"]) not in {(x["method"], x["seed"]) for x in results}]
        cache.write_text(json.dumps({"runs": keep + results}, indent=1))
    bar.close()

    rows = summarise(results, baselines)
    doc = {
        "settings": {**vars(args), "threads": torch.get_num_threads()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": os.getloadavg()[0],
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "torch": torch.__version__,
            "lightly": __import__("lightly").__version__,
        },
        "baselines": baselines,
        "summary": rows,
        "runs": [{k: v for k, v in r.items()} for r in results],
    }
    table = markdown(rows, args.seeds)
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(json.dumps({k: doc[k] for k in ("settings", "machine", "summary")}, indent=1))
    print(table)
    if any(math.isnan(v[0]) for r in rows.values() for v in r.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
