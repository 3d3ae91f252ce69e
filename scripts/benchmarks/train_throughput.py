#!/usr/bin/env python
"""Training throughput of vlp (DeepSpeed ZeRO-2, bf16) against open_clip_train on the same GPU, model and batch.

Both sides train the same tower shapes (a vlp preset, instantiated as open_clip's CLIP/CustomTextCLIP) with the
SigLIP (or CLIP) loss, AdamW and gradient clipping, on the same random in-memory batches (data loading is left
out: this measures the training step). vlp runs its own engine (``vlp.train.engine``: DeepSpeed ZeRO-2 from
configs/deepspeed/zero2.json, bf16 weights with fp32 master weights, fp32 loss); open_clip_train runs its own
``train_one_epoch`` (autocast bf16 with fp32 weights). Steps are timed with a device synchronisation per step after
warm-up. Model FLOPs per sample are counted with torch's FlopCounterMode (forward + backward), and model FLOPs
utilisation is FLOPs/s over the GPU's dense bf16 peak. Prints one JSON document.

    python scripts/benchmarks/train_throughput.py --model vit-b-16-siglip --batch-size auto --steps 30
    python scripts/benchmarks/train_throughput.py --model vit-b-16-siglip --batch-size 256
    python scripts/benchmarks/train_throughput.py --device cpu --model tiny --batch-size 16 --steps 3   # smoke test

``--batch-size auto`` finds the largest per-device batch at which the vlp ZeRO-2 step fits (fresh subprocess per
probe: doubling, then bisection to a multiple of 16) and runs both frameworks at it.
"""

from __future__ import annotations

import argparse
import gc
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
OOM_EXIT = 3


def _single_process_env() -> None:
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(k, v)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(preset, batch: int, count: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    size = preset.image_size
    return [{"image": torch.randn(batch, 3, size, size, generator=g).to(device),
             "text": torch.randint(1, 49000, (batch, preset.context_length), generator=g).to(device)}
            for _ in range(count)]


def model_flops_per_sample(preset, loss: str, device) -> float:
    """Forward + backward FLOPs per sample of the towers (FlopCounterMode, batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.config import LossConfig
    from vlp.model import build_model

    model = build_model(preset, LossConfig(name=loss)).to(device)
    b = _batches(preset, 2, 1, device)[0]
    with FlopCounterMode(display=False) as counter:
        img, txt, _, _ = model(b["image"], b["text"])
        (img.float().sum() + txt.float().sum()).backward()
    flops = counter.get_total_flops() / 2
    del model
    return float(flops)


def time_steps(step, device, warmup: int, steps: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_vlp(args, device) -> dict:
    """vlp's engine under DeepSpeed (ZeRO-2 by default) on one device."""
    import torch

    from vlp.config import PretrainConfig
    from vlp.distributed import world_info
    from vlp.model import build_model, load_preset
    from vlp.objectives import get_objective
    from vlp.train.engine import build_accelerator, build_engine
    from vlp.train.gradcache import accumulate_step
    from vlp.train.optim import build_optimizer

    cfg = PretrainConfig()
    cfg.model.name, cfg.loss.name, cfg.loss.impl = args.model, args.loss, args.loss_impl
    cfg.train.batch_size, cfg.train.deepspeed = args.batch_size, args.deepspeed
    cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.model.grad_checkpointing = args.grad_checkpointing
    preset = load_preset(cfg.model.name)
    torch.manual_seed(0)
    model = build_model(preset, cfg.loss)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    objective = get_objective(cfg.loss.name).build(cfg, world_info(), model=model, preset=preset)
    engine = build_engine(build_accelerator(cfg), objective, build_optimizer(objective, cfg.optim), cfg, world_info(),
                          objective.hidden_size())
    batches = _batches(preset, args.batch_size, 2, device)
    losses = []

    def step(i):
        res = accumulate_step(engine, [batches[i % 2]], "plain")
        engine.step()
        losses.append(float(res.loss))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, device, args.warmup, args.steps)
    out = {"step_time_s": statistics.median(times), "samples_per_s": args.batch_size / statistics.median(times),
           "engine": f"{engine.kind} ZeRO-{getattr(engine, 'stage', 0)}", "precision": cfg.train.precision,
           "final_loss": losses[-1]}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run_open_clip(args, device) -> dict:
    """open_clip_train's train_one_epoch on the same tower shapes, loss and batches."""
    import torch
    from open_clip.loss import ClipLoss, SigLipLoss
    from open_clip_train.train import train_one_epoch

    from vlp.config import LossConfig
    from vlp.model import build_open_clip_model, load_preset

    preset = load_preset(args.model)
    lc = LossConfig(name=args.loss)
    torch.manual_seed(0)
    model = build_open_clip_model(preset, lc.resolved_init_logit_scale, lc.resolved_init_logit_bias).to(device)
    model.output_dict = True
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loss = SigLipLoss(rank=0, world_size=1) if args.loss == "siglip" else ClipLoss(rank=0, world_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    batches = _batches(preset, args.batch_size, 2, device)
    total = args.warmup + args.steps
    stamps: list[float] = []

    class Loader:
        num_batches = total
        num_samples = total * args.batch_size

        def __iter__(self):
            for i in range(total):
                _sync(device)
                stamps.append(time.perf_counter())
                b = batches[i % 2]
                yield b["image"], b["text"]
            _sync(device)
            stamps.append(time.perf_counter())

    data = {"train": SimpleNamespace(dataloader=Loader(), set_epoch=lambda epoch: None)}
    precision = "amp_bf16" if device.type == "cuda" else "fp32"
    ns = SimpleNamespace(device=str(device), precision=precision, distill=False, accum_freq=1, skip_scheduler=True,
                         grad_clip_norm=1.0, horovod=False, rank=0, local_rank=0, world_size=1, log_every_n_steps=10**9,
                         batch_size=args.batch_size, wandb=False, save_logs=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_one_epoch(model, data, loss, 0, optimizer, None, None, None, ns, tb_writer=None)
    times = [b - a for a, b in zip(stamps[args.warmup:-1], stamps[args.warmup + 1:])]
    out = {"step_time_s": statistics.median(times), "samples_per_s": args.batch_size / statistics.median(times),
           "engine": "open_clip_train.train_one_epoch", "precision": precision}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def probe(args) -> int:
    """Exit 0 when the vlp step fits at ``--batch-size``, OOM_EXIT when it runs out of memory."""
    import torch

    try:
        run_vlp(args, torch.device(args.device))
    except torch.cuda.OutOfMemoryError:
        return OOM_EXIT
    return 0


def find_max_batch(args) -> int:
    def fits(b: int) -> bool:
        cmd = [sys.executable, __file__, "--probe", "--batch-size", str(b), "--steps", "2", "--warmup", "1",
               "--model", args.model, "--loss", args.loss, "--loss-impl", args.loss_impl, "--deepspeed",
               args.deepspeed, "--device", args.device] + (["--grad-checkpointing"] if args.grad_checkpointing else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode not in (0, OOM_EXIT):
            raise RuntimeError(f"probe at batch {b} failed:\n{proc.stderr[-3000:]}")
        return proc.returncode == 0

    lo, hi = 0, 64
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 16:
        mid = (lo + hi) // 2 // 16 * 16
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo == 0:
        raise RuntimeError("even a batch of 64 does not fit")
    return lo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-b-16-siglip")
    p.add_argument("--loss", default="siglip", choices=["siglip", "clip"])
    p.add_argument("--loss-impl", default="chunked", choices=["naive", "chunked"], help="vlp loss (default: vlp's)")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--deepspeed", default="zero2")
    p.add_argument("--device", default="cuda")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by name)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    _single_process_env()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no GPU available; run with --device cpu for a smoke test"}))
        return 1
    if args.probe:
        args.batch_size = int(args.batch_size)
        return probe(args)
    args.batch_size = find_max_batch(args) if args.batch_size == "auto" else int(args.batch_size)
    device = torch.device(args.device)
    from vlp.model import load_preset

    flops = model_flops_per_sample(load_preset(args.model), args.loss, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    results = {"vlp": run_vlp(args, device)}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        results["open_clip_train"] = run_open_clip(args, device)
    except torch.cuda.OutOfMemoryError:
        results["open_clip_train"] = {"error": f"out of memory at batch {args.batch_size}"}
    for r in results.values():
        if "samples_per_s" in r:
            r["model_tflops_per_s"] = flops * r["samples_per_s"] / 1e12
            if peak:
                r["mfu"] = r["model_tflops_per_s"] / peak
    doc = {"machine": socket.gethostname(), "device": gpu, "peak_bf16_tflops": peak, "model": args.model,
           "loss": args.loss, "per_device_batch": args.batch_size, "steps_timed": args.steps,
           "model_gflops_per_sample": flops / 1e9, "torch": torch.__version__, "results": results}
    if all("samples_per_s" in r for r in results.values()):
        doc["vlp_over_open_clip_samples_per_s"] = (results["vlp"]["samples_per_s"]
                                                   / results["open_clip_train"]["samples_per_s"])
    print(json.dumps(doc, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
