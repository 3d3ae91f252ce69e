#!/usr/bin/env python
"""Peak memory and forward+backward time of contrastive losses: vlp chunked / naive vs open_clip and torch.

Every measurement runs in its own subprocess (one per rank when --world-sizes > 1, over gloo on CPU), so peaks
do not leak between measurements. Memory is the loss's extra peak over the process's resident set just before
the loss (CPU: peak RSS, reset through /proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated), including
the feature gradients every implementation returns. Time is wall-clock (min over repeats) and, beside it, the
process's CPU time, which on a CPU shared with other work is the steadier figure with one thread (--threads 1).
Prints one JSON document: machine, load averages, one record per measurement and ratios of the chunked loss
against each other implementation.

    python scripts/benchmarks/loss_memory.py --batch-sizes 8192 16384 --dims 512
    python scripts/benchmarks/loss_memory.py --impls chunked --batch-sizes 16384 --dims 512 \\
        --chunk-sizes 256 512 1024 2048 4096            # chunk-size sweep
    python scripts/benchmarks/loss_memory.py --impls chunked --world-sizes 2 4 --batch-sizes 8192  # per rank
    python scripts/benchmarks/loss_memory.py --device cuda --dtype bfloat16 --batch-sizes 65536 --dims 768
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("chunked", "naive", "open_clip", "torch_lce")
LOSSES = ("clip", "siglip")


# --------------------------------------------------------------------------------------------------------------
# Child: one measurement (one rank of it)
# --------------------------------------------------------------------------------------------------------------


def _build_loss(spec: dict, world: int, rank: int):
    """A callable (img, txt, t, b) -> loss for the spec's implementation."""
    import torch
    import torch.nn.functional as F

    name, impl = spec["loss"], spec["impl"]
    max_scale = math.log(100.0) if name == "clip" else None
    if impl in ("chunked", "naive"):
        from vlp.losses import LOSSES as REGISTRY

        kwargs = {"max_logit_scale": max_scale}
        if impl == "chunked":
            kwargs["chunk_size"] = spec["chunk_size"]
        loss = REGISTRY[(name, impl)](**kwargs)
        return lambda i, x, t, b: loss(i, x, t, b)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        if name == "clip":
            oc = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
            return lambda i, x, t, b: oc(i, x, t.clamp(max=max_scale).exp())
        oc = SigLipLoss(rank=rank, world_size=world)
        return lambda i, x, t, b: oc(i, x, t.exp(), b)
    if impl == "torch_lce":
        if name != "clip" or not hasattr(F, "linear_cross_entropy"):
            raise NotImplementedError("torch linear_cross_entropy: softmax (clip) loss only, torch >= 2.10")
        options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None

        def lce(i, x, t, b):
            s = t.clamp(max=max_scale).exp()
            labels = torch.arange(i.shape[0], device=i.device)
            return (
                F.linear_cross_entropy(i * s, x, labels, options=options)
                + F.linear_cross_entropy(x * s, i, labels, options=options)
            ) / 2

        return lce
    raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")


def run_child(spec: dict) -> dict:
    """Measure one (loss, impl, B, D, chunk) on this process; B is this rank's batch."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from vlp.train.metrics import proc_status_bytes, reset_peak_rss

    torch.set_num_threads(spec["threads"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(rank)
    b_local, dim = spec["batch"], spec["dim"]
    img = F.normalize(torch.randn(b_local, dim, generator=g), dim=1).to(device, dtype).requires_grad_()
    txt = F.normalize(torch.randn(b_local, dim, generator=g), dim=1).to(device, dtype).requires_grad_()
    t = torch.tensor(math.log(10.0), device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    fn = _build_loss(spec, world, rank)
    cuda = device.type == "cuda"

    def step() -> tuple[float, float]:
        for p in (img, txt, t, b):
            p.grad = None
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(img, txt, t, b).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    if world > 1:
        dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        method = "VmHWM after clear_refs" if reset_peak_rss() else "VmHWM (not resettable)"
        base = proc_status_bytes("VmRSS") or 0
    runs = [step() for _ in range(spec["repeats"] + 1)][1:]  # the first run warms up, its peak counts
    times, cpu_times = [r[0] for r in runs], [r[1] for r in runs]
    peak = (torch.cuda.max_memory_allocated() if cuda else (proc_status_bytes("VmHWM") or 0)) - base
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {
        "peak_extra_mb": round(peak / 2**20, 1),
        "time_min_s": round(min(times), 4),
        "time_median_s": round(statistics.median(times), 4),
        "times_s": [round(x, 4) for x in times],
        "cpu_time_min_s": round(min(cpu_times), 4),
        "memory": "torch.cuda.max_memory_allocated" if cuda else method,
    }


# --------------------------------------------------------------------------------------------------------------
# Parent: plan, launch, collect
# --------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quadratic_gb(spec: dict) -> float:
    """Rough peak of an implementation that materialises logits, summed over the ranks (all on this machine).

    About 5 logits-sized matrices per rank (measured): the naive loss forms the global (W B) x (W B) logits on
    every rank, open_clip's ClipLoss(local_loss=True) the local B x (W B) rows, the others B x B blocks.
    """
    elt = 2 if spec["dtype"] in ("bfloat16", "float16") and spec["device"] == "cuda" else 4
    b, w = spec["batch"], spec["world_size"]
    rows, cols = {"naive": (w * b, w * b), "open_clip": (b, w * b if spec["loss"] == "clip" else b)}.get(
        spec["impl"], (b, b)
    )
    return 5 * rows * cols * elt * w / 2**30


def measure(spec: dict, timeout: float) -> dict:
    """Run one measurement in fresh subprocess(es); the record is the spec plus results (max over ranks)."""
    world = spec["world_size"]
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS=str(spec["threads"]),
    )
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outs, status = [], "ok"
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return {**spec, "status": f"timeout after {timeout:.0f} s"}
        if p.returncode != 0:
            status = "error: " + (err.strip().splitlines() or ["?"])[-1]
            if p.returncode in (-9, 137):
                status = "killed (out of memory?)"
        else:
            outs.append(json.loads(out.strip().splitlines()[-1]))
    if status != "ok":
        return {**spec, "status": status}
    rec = {**spec, "status": "ok", **max(outs, key=lambda o: o["peak_extra_mb"])}
    rec["peak_extra_mb_per_rank"] = [o["peak_extra_mb"] for o in outs]
    for k in ("time_min_s", "time_median_s", "cpu_time_min_s"):
        rec[k] = max(o[k] for o in outs)
    return rec


def ratios(records: list[dict]) -> list[dict]:
    """Chunked against every other implementation at the same (loss, B, D, world size, dtype, device)."""
    out = []
    key = ("loss", "batch", "dim", "world_size", "dtype", "device")
    for ch in (r for r in records if r["impl"] == "chunked" and r["status"] == "ok"):
        for other in records:
            if other["impl"] == "chunked" or other["status"] != "ok" or any(other[k] != ch[k] for k in key):
                continue
            out.append(
                {
                    **{k: ch[k] for k in key},
                    "chunk_size": ch["chunk_size"],
                    "vs": other["impl"],
                    "time_ratio_chunked_over_other": round(ch["time_min_s"] / other["time_min_s"], 3),
                    "cpu_time_ratio_chunked_over_other": round(ch["cpu_time_min_s"] / other["cpu_time_min_s"], 3),
                    "memory_ratio_other_over_chunked": round(other["peak_extra_mb"] / max(ch["peak_extra_mb"], 0.1), 1),
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 8192, 16384], help="per-rank batch sizes B")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="feature dimensions D")
    ap.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=None,
        help="tile edges for the chunked losses (default: vlp's LossConfig default)",
    )
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1], help="processes (gloo on CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole plan this many times, interleaved, and keep each measurement's best "
        "round (robust against load from other processes)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / world)")
    ap.add_argument(
        "--max-quadratic-gb",
        type=float,
        default=8.0,
        help="skip logits-materialising implementations whose estimated peak exceeds this",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vlp.config import LossConfig

    chunk_sizes = args.chunk_sizes or [LossConfig().chunk_size]
    for c in chunk_sizes:
        if c < 1:
            ap.error(f"--chunk-sizes must be positive, got {c}")
    plan = []
    for world in args.world_sizes:
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        for dim in args.dims:
            for batch in args.batch_sizes:
                for loss in args.losses:
                    for impl in args.impls:
                        if impl == "torch_lce" and (loss != "clip" or world > 1):
                            continue
                        for chunk in chunk_sizes if impl == "chunked" else [None]:
                            plan.append(
                                {
                                    "loss": loss,
                                    "impl": impl,
                                    "batch": batch,
                                    "dim": dim,
                                    "chunk_size": chunk,
                                    "world_size": world,
                                    "device": args.device,
                                    "dtype": args.dtype,
                                    "repeats": args.repeats,
                                    "threads": threads,
                                }
                            )
    load_before = os.getloadavg()
    rounds: list[list[dict]] = [[] for _ in plan]
    for _ in range(args.rounds):
        for spec, done in zip(plan, rounds):
            if done and not done[-1]["status"] == "ok":
                continue  # skipped, failed or timed out once: do not retry
            if spec["impl"] != "chunked" and quadratic_gb(spec) > args.max_quadratic_gb:
                rec = {**spec, "status": f"skipped: estimated {quadratic_gb(spec):.1f} GB"}
            else:
                rec = measure(spec, args.timeout)
            rec["load_avg_1m"] = round(os.getloadavg()[0], 2)
            done.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    records = []
    for done in rounds:
        ok = [r for r in done if r["status"] == "ok"]
        if not ok:
            records.append(done[-1])
            continue
        best = dict(min(ok, key=lambda r: r["time_min_s"]))
        best["peak_extra_mb"] = max(r["peak_extra_mb"] for r in ok)
        best["cpu_time_min_s"] = min(r["cpu_time_min_s"] for r in ok)
        best["rounds"] = [
            {
                "time_min_s": r["time_min_s"],
                "cpu_time_min_s": r["cpu_time_min_s"],
                "peak_extra_mb": r["peak_extra_mb"],
                "load_avg_1m": r["load_avg_1m"],
            }
            for r in ok
        ]
        records.append(best)
    import torch

    doc = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "results": records,
        "ratios": ratios(records),
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
