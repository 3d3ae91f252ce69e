"""Running scripts/pretrain.py as benchmark runs: one run in a subprocess, and a queue of runs a few at a time whose
rows are appended to ``OUT/results.jsonl`` as they finish (the bias sweep and the aux-SSL benchmark share it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def pretrain_run(out: Path, flags: list[str], threads: int) -> dict | None:
    """Run scripts/pretrain.py with ``flags`` into ``out`` on ``threads`` threads (log beside it, OUT.log); returns
    its wall time, first and final loss and every zero-shot top-1 and R@1 of its summary.json (None if it failed)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *flags, "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    t0 = time.time()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"{out.name}: failed (exit {rc}), see {log}", flush=True)
        return None
    return run_row(out, time.time() - t0)


def centred_towers(rows: list[dict]) -> str:
    """Which towers a run centred on its first batch (its step-0 metrics): off, image, text or both."""
    towers = [t for t in ("image", "text") if any(f"init/{t}_mean_norm_after" in r for r in rows)]
    return "both" if len(towers) == 2 else towers[0] if towers else "off"


def lr_scales(loss: dict) -> dict[str, float]:
    """The learning-rate multipliers a run's bias and temperature trained at, from its config.yaml's ``loss``
    section (1 for CLIP's absent bias, and for runs older than the options)."""
    from vlp.config import LR_SCALE_FIELDS, LossConfig

    cfg = LossConfig(name=loss["name"], **{k: loss[k] for k in LR_SCALE_FIELDS if k in loss})
    return {k: cfg.resolved_lr_scale(k) if k in loss else 1.0 for k in LR_SCALE_FIELDS}


def run_row(out: Path, wall_s: float) -> dict:
    """A finished run's row: ``wall_s``, its initial t, which towers it centred on the first batch, its bias's and
    temperature's learning-rate multipliers, its peak learning rate, first and final loss, final t and b, and every
    zero-shot top-1 and R@1 of its summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    first, last = trained[0], trained[-1]  # the first step's row is logged before its update
    row = {
        "wall_s": round(wall_s, 1),
        "init_t": round(math.exp(first["logit_scale"]), 4),
        "centred": centred_towers(rows),
        **lr_scales(config["loss"]),
        "lr": config["optim"]["lr"],
        "first_loss": summary["first_loss"],
        "final_loss": summary["final_loss"],
        "final_t": round(math.exp(last["logit_scale"]), 4),
    }
    if "logit_bias" in last:
        row["final_b"] = round(last["logit_bias"], 4)
    for k, v in summary.items():
        if k.startswith("zeroshot/") and k.endswith("/top1") or k.startswith("retrieval/") and k.endswith("_R1"):
            row[k] = v
    return row


def read_rows(results: Path) -> list[dict]:
    """The rows of ``results`` (a JSON object per line), none if it does not exist yet."""
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def run_all(
    todo: list,
    jobs: int,
    run_one: Callable[[object, int], dict | None],
    results: Path,
    on_rows: Callable[[list[dict]], None],
    done: int,
) -> None:
    """``run_one(item, threads)`` for every item of ``todo``, ``jobs`` at a time (the machine's cores split between
    them); each row it returns (with its "name") is appended to ``results``, then ``on_rows`` gets every row so far."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"{len(todo)} runs to do ({done} already in {results}), {jobs} at a time", flush=True)
    lock = threading.Lock()

    def work(item) -> None:
        row = run_one(item, threads)
        if row is None:
            return
        with lock:
            with open(results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            on_rows(read_rows(results))
            print(f"{row['name']}: {row['wall_s']} s, shape top-1 {row.get('zeroshot/shape/top1')}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(work, todo))
