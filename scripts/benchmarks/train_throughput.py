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
probe: doubling, then bisection to a multiple of 16) and runs both frameworks at it. ``--deepspeed none`` runs vlp
without DeepSpeed (plain DDP through accelerate when a launcher environment is present, as here).

Speed features (vlp only; one fresh model per setting, same batches): ``--sweep`` takes settings
``PATCH_DROPOUT:COMPILE`` and reports each one's step time::

    python scripts/benchmarks/train_throughput.py --device cpu --model tiny --batch-size 32 --deepspeed none \
        --sweep 0:off 0.5:off 0.75:off 0:on

Whole training steps on shards (data loading included): ``--shards`` runs ``scripts/pretrain.py`` and open_clip_train's
``train_one_epoch`` over its own WebDataset pipeline (``open_clip_train.data.get_data``, arguments from
``open_clip_train.params.parse_args``) on the same shards, preset, batch, loader workers and AdamW settings, each in a
fresh process, alternating for ``--pairs`` pairs; a step is the wall time between consecutive batches (vlp: its
``step_time_s``), median over the steps after ``--warmup``. open_clip_train's tar reader
(``group_by_keys_nothrow``) fails at a shard boundary with webdataset 1.x (it pins webdataset <= 0.2.86), so give
shards large enough that no run reaches the end of one::

    python scripts/benchmarks/train_throughput.py --device cpu --model tiny --loss siglip --batch-size 64 \
        --steps 40 --warmup 5 --shards '/data/shard-{000000..000019}.tar' --train-num-samples 20000 --pairs 3
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
    for k, v in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(29500 + os.getpid() % 1000)),
    ):
        os.environ.setdefault(k, v)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(preset, batch: int, count: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    size = preset.image_size
    return [
        {
            "image": torch.randn(batch, 3, size, size, generator=g).to(device),
            "text": torch.randint(1, 49000, (batch, preset.context_length), generator=g).to(device),
        }
        for _ in range(count)
    ]


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


def time_steps(step, device, warmup: int, steps: int, cpu_times: list[float] | None = None) -> list[float]:
    """Wall time of each step after warm-up; this process's CPU time per step into ``cpu_times`` (the steadier
    figure on a CPU shared with other work)."""
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - c0)
    return times


def run_vlp(args, device) -> dict:
    """vlp's engine under DeepSpeed (ZeRO-2 by default) on one device."""
    import torch

    from vlp.config import PretrainConfig
    from vlp.distributed import world_info
    from vlp.model import build_model, load_preset
    from vlp.objectives import get_objective
    from vlp.objectives.registry import default_lr
    from vlp.train.engine import build_accelerator, build_engine
    from vlp.train.gradcache import accumulate_step
    from vlp.train.optim import build_optimizer

    cfg = PretrainConfig()
    cfg.model.name, cfg.loss.name, cfg.loss.impl = args.model, args.loss, args.loss_impl
    cfg.optim.lr = default_lr(get_objective(args.loss))  # the rate a run of this loss trains at
    cfg.train.batch_size = args.batch_size
    cfg.train.deepspeed = None if args.deepspeed == "none" else args.deepspeed
    cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"
    cfg.model.grad_checkpointing = args.grad_checkpointing
    cfg.model.patch_dropout, cfg.train.compile = args.patch_dropout, args.compile
    preset = load_preset(cfg.model.name)
    torch.manual_seed(0)
    model = build_model(preset, cfg.loss)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    objective = get_objective(cfg.loss.name).build(cfg, world_info(), model=model, preset=preset)
    engine = build_engine(
        build_accelerator(cfg),
        objective,
        build_optimizer(objective, cfg.optim, objective.lr_scales()),
        cfg,
        world_info(),
        objective.hidden_size(),
    )
    batches = _batches(preset, args.batch_size, 2, device)
    losses = []

    def step(i):
        res = accumulate_step(engine, [batches[i % 2]], "plain")
        engine.step()
        losses.append(float(res.loss))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu_times: list[float] = []
    times = time_steps(step, device, args.warmup, args.steps, cpu_times)
    kind = f"{engine.kind} ZeRO-{engine.stage}" if engine.kind == "deepspeed" else engine.kind
    out = {
        "step_time_s": statistics.median(times),
        "samples_per_s": args.batch_size / statistics.median(times),
        "engine": kind,
        "precision": cfg.train.precision,
        "final_loss": losses[-1],
        "patch_dropout": args.patch_dropout,
        "compile": args.compile,
        "step_cpu_time_s": statistics.median(cpu_times),
    }
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
    ns = SimpleNamespace(
        device=str(device),
        precision=precision,
        distill=False,
        accum_freq=1,
        skip_scheduler=True,
        grad_clip_norm=1.0,
        horovod=False,
        rank=0,
        local_rank=0,
        world_size=1,
        log_every_n_steps=10**9,
        batch_size=args.batch_size,
        wandb=False,
        save_logs=False,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_one_epoch(model, data, loss, 0, optimizer, None, None, None, ns, tb_writer=None)
    times = [b - a for a, b in zip(stamps[args.warmup : -1], stamps[args.warmup + 1 :])]
    out = {
        "step_time_s": statistics.median(times),
        "samples_per_s": args.batch_size / statistics.median(times),
        "engine": "open_clip_train.train_one_epoch",
        "precision": precision,
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run_sweep(args, device) -> list[dict]:
    """vlp's step at each ``PATCH_DROPOUT:COMPILE`` setting of ``--sweep`` (a fresh model each)."""
    import torch

    out = []
    for spec in args.sweep:
        p, _, c = spec.partition(":")
        args.patch_dropout, args.compile = float(p), c.lower() in ("on", "true", "1", "yes")
        torch._dynamo.reset()
        r = run_vlp(args, device)
        r["setting"] = spec
        out.append(r)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = out[0]["step_time_s"]
    base_cpu = out[0]["step_cpu_time_s"]
    for r in out:
        r["speedup_vs_first"] = base / r["step_time_s"]
        r["cpu_time_speedup_vs_first"] = base_cpu / r["step_cpu_time_s"]
    return out


def _median_after_warmup(times: list[float], warmup: int) -> dict:
    kept = times[warmup:]
    return {"step_time_s": statistics.median(kept), "steps_timed": len(kept)}


def run_open_clip_on_shards(args) -> dict:
    """open_clip_train: its WebDataset pipeline (get_data) and train_one_epoch, fp32 on CPU / autocast bf16 on GPU."""
    import torch
    from open_clip.loss import ClipLoss, SigLipLoss
    from open_clip_train.data import get_data
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from vlp.config import LossConfig, OptimConfig
    from vlp.model import build_open_clip_model, build_tokenizer, build_transforms, load_preset
    from vlp.objectives import get_objective
    from vlp.objectives.registry import default_lr

    preset, lc = load_preset(args.model), LossConfig(name=args.loss)
    oc_ = OptimConfig(lr=default_lr(get_objective(args.loss)))
    device = torch.device(args.device)
    precision = "amp_bf16" if device.type == "cuda" else "fp32"
    oa = parse_args(
        [
            "--train-data",
            args.shards,
            "--train-num-samples",
            str(args.train_num_samples),
            "--dataset-type",
            "webdataset",
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--precision",
            precision,
            "--lr",
            str(oc_.lr),
            "--wd",
            str(oc_.weight_decay),
            "--beta1",
            str(oc_.beta1),
            "--beta2",
            str(oc_.beta2),
            "--eps",
            str(oc_.eps),
            "--warmup",
            str(oc_.warmup_steps),
            "--grad-clip-norm",
            str(oc_.grad_clip),
            "--seed",
            "0",
            "--log-every-n-steps",
            str(10**9),
        ]
        + (["--siglip"] if args.loss == "siglip" else [])
    )
    oa.device, oa.rank, oa.local_rank, oa.world_size, oa.distributed, oa.distill = str(device), 0, 0, 1, False, False
    oa.wandb = oa.save_logs = False  # set by open_clip_train.main from --report-to / --logs
    torch.manual_seed(0)
    model = build_open_clip_model(preset, lc.resolved_init_logit_scale, lc.resolved_init_logit_bias).to(device)
    model.output_dict = True
    transform = build_transforms(preset, is_train=True)  # open_clip.image_transform for the preset
    data = get_data(oa, (transform, transform), epoch=0, tokenizer=build_tokenizer(preset))

    def exclude(n, p):  # open_clip_train.main's weight-decay exclusion
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": oc_.weight_decay},
        ],
        lr=oc_.lr,
        betas=(oc_.beta1, oc_.beta2),
        eps=oc_.eps,
    )
    scheduler = cosine_lr(optimizer, oc_.lr, oc_.warmup_steps, args.steps)
    loss = SigLipLoss(rank=0, world_size=1) if args.loss == "siglip" else ClipLoss(rank=0, world_size=1)
    inner = data["train"].dataloader
    stamps: list[float] = []

    class Stamped:
        num_batches = args.steps
        num_samples = args.steps * args.batch_size

        def __iter__(self):
            it = iter(inner)
            for _ in range(args.steps):
                _sync(device)
                stamps.append(time.perf_counter())
                yield next(it)
            _sync(device)
            stamps.append(time.perf_counter())

    data["train"].dataloader = Stamped()
    t0 = time.perf_counter()
    train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, oa, tb_writer=None)
    wall = time.perf_counter() - t0
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    return {**_median_after_warmup(times, args.warmup), "wall_s": wall, "precision": precision}


def _threads_env(args) -> dict[str, str]:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_vlp_on_shards(args, out_dir: Path) -> dict:
    """scripts/pretrain.py on the shards (a fresh process); step times from its metrics.jsonl."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "pretrain.py"),
        "--model",
        args.model,
        "--loss",
        args.loss,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--workers",
        str(args.workers),
        "--train-shards",
        args.shards,
        "--train-num-samples",
        str(args.train_num_samples),
        "--eval.zeroshot",
        "false",
        "--checkpoint.export",
        "false",
        "--output-dir",
        str(out_dir),
        "--train.log_every",
        "1000",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_threads_env(args))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain.py failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return {
        **_median_after_warmup(times, args.warmup),
        "wall_s": wall,
        "final_loss": [r["loss"] for r in records if "loss" in r][-1],
    }


def run_shards_pairs(args) -> dict:
    """``--pairs`` interleaved pairs (order alternating: vlp first, then open_clip_train first, ...)."""
    import tempfile

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vlp-throughput-") as tmp:
        for pair in range(args.pairs):
            order = ("vlp", "open_clip_train") if pair % 2 == 0 else ("open_clip_train", "vlp")
            for who in order:
                if who == "vlp":
                    r = run_vlp_on_shards(args, Path(tmp) / f"vlp-{pair}")
                else:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--open-clip-shards-child",
                        "--model",
                        args.model,
                        "--loss",
                        args.loss,
                        "--batch-size",
                        str(args.batch_size),
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--workers",
                        str(args.workers),
                        "--shards",
                        args.shards,
                        "--train-num-samples",
                        str(args.train_num_samples),
                        "--device",
                        args.device,
                    ]
                    t0 = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_threads_env(args))
                    if proc.returncode != 0:
                        raise RuntimeError(f"open_clip_train child failed:\n{proc.stderr[-3000:]}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    r["process_wall_s"] = time.perf_counter() - t0
                r.update(pair=pair, framework=who, samples_per_s=args.batch_size / r["step_time_s"])
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    ratios = []
    for pair in range(args.pairs):
        v, o = (next(r for r in runs if r["pair"] == pair and r["framework"] == f) for f in ("vlp", "open_clip_train"))
        ratios.append(v["samples_per_s"] / o["samples_per_s"])
    return {"runs": runs, "vlp_over_open_clip_per_pair": ratios, "vlp_over_open_clip_median": statistics.median(ratios)}


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
        cmd = [
            sys.executable,
            __file__,
            "--probe",
            "--batch-size",
            str(b),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--model",
            args.model,
            "--loss",
            args.loss,
            "--loss-impl",
            args.loss_impl,
            "--deepspeed",
            args.deepspeed,
            "--device",
            args.device,
        ] + (["--grad-checkpointing"] if args.grad_checkpointing else [])
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
    p.add_argument("--skip-open-clip", action="store_true", help="time vlp only")
    p.add_argument("--patch-dropout", type=float, default=0.0, help="vlp --model.patch_dropout")
    p.add_argument("--compile", action="store_true", help="vlp --train.compile")
    p.add_argument("--sweep", nargs="+", metavar="P:on|off", help="vlp step time at each patch dropout:compile")
    p.add_argument("--shards", help="whole training steps on these WebDataset shards (see the module docstring)")
    p.add_argument("--train-num-samples", type=int, default=None, help="samples in --shards")
    p.add_argument("--workers", type=int, default=1, help="data loader processes per side (--shards)")
    p.add_argument("--pairs", type=int, default=3, help="interleaved vlp/open_clip_train pairs (--shards)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--open-clip-shards-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    _single_process_env()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if args.threads:  # also in the environment, or accelerate resets it to its own default
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no GPU available; run with --device cpu for a smoke test"}))
        return 1
    if args.probe:
        args.batch_size = int(args.batch_size)
        return probe(args)
    if args.open_clip_shards_child:
        args.batch_size = int(args.batch_size)
        print(json.dumps(run_open_clip_on_shards(args)))
        return 0
    args.batch_size = find_max_batch(args) if args.batch_size == "auto" else int(args.batch_size)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    machine = {
        "machine": socket.gethostname(),
        "device": gpu,
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "model": args.model,
        "loss": args.loss,
        "per_device_batch": args.batch_size,
    }
    if args.shards:
        if args.train_num_samples is None:
            p.error("--shards needs --train-num-samples")
        doc = {
            **machine,
            "mode": "shards",
            "steps": args.steps,
            "warmup": args.warmup,
            "workers": args.workers,
            **run_shards_pairs(args),
            "load_avg_end": os.getloadavg(),
        }
        print(json.dumps(doc, indent=1))
        return 0
    if args.sweep:
        doc = {
            **machine,
            "mode": "sweep",
            "engine": args.deepspeed,
            "steps_timed": args.steps,
            "warmup": args.warmup,
            "sweep": run_sweep(args, device),
            "load_avg_end": os.getloadavg(),
        }
        print(json.dumps(doc, indent=1))
        return 0
    from vlp.model import load_preset

    flops = model_flops_per_sample(load_preset(args.model), args.loss, device)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    try:
        results = {"vlp": run_vlp(args, device)}
    except torch.cuda.OutOfMemoryError:
        results = {"vlp": {"error": f"out of memory at batch {args.batch_size}"}}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_open_clip:
        try:
            results["open_clip_train"] = run_open_clip(args, device)
        except torch.cuda.OutOfMemoryError:
            results["open_clip_train"] = {"error": f"out of memory at batch {args.batch_size}"}
    for r in results.values():
        if "samples_per_s" in r:
            r["model_tflops_per_s"] = flops * r["samples_per_s"] / 1e12
            if peak:
                r["mfu"] = r["model_tflops_per_s"] / peak
    doc = {
        "machine": socket.gethostname(),
        "device": gpu,
        "peak_bf16_tflops": peak,
        "model": args.model,
        "loss": args.loss,
        "per_device_batch": args.batch_size,
        "steps_timed": args.steps,
        "model_gflops_per_sample": flops / 1e9,
        "torch": torch.__version__,
        "results": results,
    }
    if len(results) == 2 and all("samples_per_s" in r for r in results.values()):
        doc["vlp_over_open_clip_samples_per_s"] = (
            results["vlp"]["samples_per_s"] / results["open_clip_train"]["samples_per_s"]
        )
    print(json.dumps(doc, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
