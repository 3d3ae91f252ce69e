#!/usr/bin/env python
"""The chunked losses at one batch size on one device: chunk size x TF32 x input dtype, naive beside (TF32 on).

One process, one JSON line per measurement (flushed, so a run cut at its time limit keeps what it measured):
forward + backward time (min over ``--repeats`` after one warm-up) and peak CUDA memory over the inputs (the
feature gradients included), as section (b) of gpu_suite.py measures them. TF32 is
``torch.backends.cuda.matmul.allow_tf32``, which the chunked losses' fp32 tile matmuls follow (bf16 features are
computed in fp32 tiles). Order: bf16 TF32 off (the defaults), bf16 TF32 on, fp32 TF32 on, fp32 TF32 off.

    python scripts/benchmarks/loss_chunk_sweep.py --batch 65536 --dim 768 --chunks 1024 2048 4096 8192
    python scripts/benchmarks/loss_chunk_sweep.py --batch 512 --dim 32 --chunks 128 256   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def measure(name: str, impl: str, dtype, chunk: int, tf32: bool, batch: int, dim: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from vlp.losses import LOSSES

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    kwargs = {"max_logit_scale": math.log(100.0) if name == "clip" else None}
    if impl == "chunked":
        kwargs["chunk_size"] = chunk
    fn = LOSSES[(name, impl)](**kwargs)
    g = torch.Generator(device=dev).manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, device=dev, generator=g), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(batch, dim, device=dev, generator=g), dim=-1).to(dtype)
    t = torch.tensor(math.log(10.0), device=dev, requires_grad=True)
    b = torch.tensor(-10.0, device=dev, requires_grad=True) if name == "siglip" else None
    times, peak, value = [], None, None
    for i in range(1 + repeats):
        x, y = img.detach().requires_grad_(), txt.detach().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = fn(x, y, t, b)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        if i:
            times.append(time.perf_counter() - t0)
        value = float(loss.detach())
        del loss, x, y
    if cuda:
        torch.cuda.empty_cache()
    return {
        "batch": batch,
        "dim": dim,
        "loss": name,
        "impl": impl,
        "dtype": str(dtype).split(".")[-1],
        "chunk": chunk if impl == "chunked" else None,
        "tf32": tf32,
        "time_ms": 1e3 * min(times),
        "peak_gb": peak,
        "loss_value": value,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=None, help="skip the measurements left after this")
    args = ap.parse_args(argv)
    import torch

    end = time.perf_counter() + args.deadline_s if args.deadline_s else math.inf
    plan = []
    for dtype, tf32 in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True), (torch.float32, False)):
        plan += [(n, "chunked", dtype, c, tf32) for n in ("siglip", "clip") for c in args.chunks]
        if tf32:
            plan += [(n, "naive", dtype, 0, tf32) for n in ("siglip", "clip")]
    for spec in plan:
        if time.perf_counter() > end:
            print(json.dumps({"skipped": str(spec)}), flush=True)
            continue
        try:
            print(json.dumps(measure(*spec, args.batch, args.dim, args.repeats)), flush=True)
        except Exception as e:  # noqa: BLE001 - one failed measurement does not stop the others
            print(json.dumps({"error": f"{spec}: {type(e).__name__}: {e}"[:300]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
