"""Chunked losses on real multi-process gloo groups (world sizes 2, 3, 4) against the single-process reference.

Four processes are spawned once; groups of their first 2, 3 and all 4 ranks run every case: dtypes
float64/float32, per-rank batches 1, 7 and 64, chunk sizes that do and do not divide them, CLIP at scale 100
(and other temperatures), SigLIP at t = log 10, b = -10 (and other values), unequal per-rank batches, the
default and an explicit process group. The checked convention (vlp.losses.base): every rank returns the
global loss, the local feature gradients are W times the reference's slice, t and b get the reference's
gradient, and DDP-style averaging of parameter gradients reproduces the single-process update.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed_harness import run_distributed
from tests.test_losses import (
    CLIP_PARAMS,
    SIGLIP_PARAMS,
    TOL,
    MaxStorage,
    chunked,
    clip_floors,
    loss_and_grads,
    make_batch,
    reference,
    rel_errors,
)
from vlp.losses import NaiveClipLoss, NaiveSigLipLoss, clip_loss_reference, siglip_loss_reference


def _case(rank, world, name, dtype, sizes, chunk, params, seed, group):
    """Relative errors [loss, d img, d txt, d t, d b] of this rank's chunked result against the reference."""
    max_scale, t, b = params
    img, txt = make_batch(sum(sizes), 24, dtype, seed)
    ref = reference(name, img, txt, max_scale, t, b)
    lo = sum(sizes[:rank])
    local = slice(lo, lo + sizes[rank])
    got = loss_and_grads(chunked(name, max_scale, chunk, group), img[local], txt[local], t, b)
    # Feature gradients: this rank's slice against W times the reference's slice, relative to the whole
    # gradient (a rank's rows may all be confidently classified, their gradients tiny).
    floors = clip_floors(t, max_scale, sum(sizes), world) if name == "clip" else [0.0] * 5
    for i in (1, 2):
        floors[i] = max(floors[i], world * float(ref[i].abs().max()))
        ref[i] = ref[i][local] * world
    return rel_errors(got, ref, floors)


def _ddp_case(rank, world, name, group):
    """Towers on each rank, chunked loss, gradients averaged over ranks vs one process on the global batch."""
    n, params = 6, (CLIP_PARAMS if name == "clip" else SIGLIP_PARAMS)[0]
    max_scale, t0, b0 = params
    g = torch.Generator().manual_seed(11)
    x_img = torch.randn(n * world, 12, generator=g, dtype=torch.float64)
    x_txt = torch.randn(n * world, 10, generator=g, dtype=torch.float64)

    def build():
        torch.manual_seed(5)
        towers = torch.nn.ModuleDict({"img": torch.nn.Linear(12, 16), "txt": torch.nn.Linear(10, 16)}).double()
        t = torch.nn.Parameter(torch.tensor(t0, dtype=torch.float64))
        b = torch.nn.Parameter(torch.tensor(b0 if b0 is not None else 0.0, dtype=torch.float64))
        return towers, t, b

    def feats(towers, xi, xt):
        return F.normalize(towers["img"](xi), dim=-1), F.normalize(towers["txt"](xt), dim=-1)

    towers, t, b = build()
    fi, ft = feats(towers, x_img, x_txt)
    if name == "clip":
        clip_loss_reference(fi, ft, t, max_scale).backward()
    else:
        siglip_loss_reference(fi, ft, t, b, max_scale).backward()
    want = [p.grad.clone() for p in [*towers.parameters(), t]] + ([b.grad.clone()] if name == "siglip" else [])

    towers, t, b = build()
    local = slice(rank * n, (rank + 1) * n)
    fi, ft = feats(towers, x_img[local], x_txt[local])
    chunked(name, max_scale, 4, group)(fi, ft, t, b).backward()
    got = [p.grad.clone() for p in [*towers.parameters(), t]] + ([b.grad.clone()] if name == "siglip" else [])
    for gr in got:  # what DDP / DeepSpeed do with parameter gradients
        dist.all_reduce(gr, group=group)
        gr /= world
    return max(rel_errors(got, want))


def _cases_for_world(rank: int, world: int, group) -> dict:
    out: dict = {"cases": [], "ddp": {}, "naive": [], "storage": {}}
    for dtype in (torch.float64, torch.float32):
        for n, chunks in ((1, (1, 2)), (7, (7, 3)), (64, (16, 24))):
            for name, all_params in (("clip", CLIP_PARAMS), ("siglip", SIGLIP_PARAMS)):
                for k, chunk in enumerate(chunks):
                    # The values the issue names (clip scale 100, siglip t = log 10, b = -10) at every chunk size,
                    # then another temperature (and bias) at the chunk size that does not divide the batch.
                    for params in [all_params[0]] + ([all_params[(n + k) % 3]] if k else []):
                        # On the whole world, fp32 cases use the default group (group=None), as training does.
                        use = None if (world == dist.get_world_size() and dtype == torch.float32) else group
                        errs = _case(rank, world, name, dtype, [n] * world, chunk, params, seed=n + k, group=use)
                        out["cases"].append((f"{name} {dtype} n={n} chunk={chunk} t={params[1]:.3f}", str(dtype), errs))
        # Unequal per-rank batches (e.g. the last, partial batch of an epoch).
        sizes = [5, 1, 9, 3][:world]
        for name, all_params in (("clip", CLIP_PARAMS), ("siglip", SIGLIP_PARAMS)):
            errs = _case(rank, world, name, dtype, sizes, 4, all_params[0], seed=7, group=group)
            out["cases"].append((f"{name} {dtype} sizes={sizes}", str(dtype), errs))
    for name in ("clip", "siglip"):
        out["ddp"][name] = _ddp_case(rank, world, name, group)
        # The naive implementation follows the same convention (same gradients as the chunked one).
        if world == dist.get_world_size():  # the naive losses gather over the default group
            max_scale, t, b = (CLIP_PARAMS if name == "clip" else SIGLIP_PARAMS)[0]
            img, txt = make_batch(8 * world, 24, torch.float64, 3)
            local = slice(8 * rank, 8 * (rank + 1))
            naive = NaiveClipLoss(max_scale) if name == "clip" else NaiveSigLipLoss(max_scale)
            want = loss_and_grads(naive, img[local], txt[local], t, b)
            got = loss_and_grads(chunked(name, max_scale, 3), img[local], txt[local], t, b)
            out["naive"].append(max(rel_errors(got, want)))
        # Largest storage touched by any op, at a fixed per-rank batch of 64 x 32 fp32 features.
        max_scale, t, b = (CLIP_PARAMS if name == "clip" else SIGLIP_PARAMS)[0]
        img, txt = make_batch(64 * world, 32, torch.float32, 4)
        img, txt = img[64 * rank : 64 * (rank + 1)].clone(), txt[64 * rank : 64 * (rank + 1)].clone()
        with MaxStorage() as probe:
            loss_and_grads(chunked(name, max_scale, 16, group), img, txt, t, b)
        out["storage"][name] = probe.max_bytes
    return out


def _worker(rank: int, world: int) -> dict:
    """All cases for groups of 2, 3 and 4 ranks (prefixes of one 4-process world, spawned once)."""
    timeout = timedelta(seconds=300)  # a hang fails the test instead of stalling it
    groups = {w: dist.new_group(list(range(w)), timeout=timeout) for w in (2, 3, world)}
    out = {}
    for w, group in groups.items():
        if rank < w:
            out[w] = _cases_for_world(rank, w, group)
        dist.barrier()  # ranks outside the group wait here (default group), not inside the group's first op
    return out


def test_chunked_losses_match_reference_on_2_3_4_ranks():
    results = run_distributed(_worker, 4)
    failures = []
    for world in (2, 3, 4):
        for rank in range(world):
            res = results[rank][world]
            assert len(res["cases"]) == 2 * (3 * 2 * 3 + 2)  # dtypes x (n x losses x cases, unequal)
            for label, dtype, errs in res["cases"]:
                loss_tol, grad_tol = TOL[getattr(torch, dtype.split(".")[1])]
                if errs[0] > loss_tol or max(errs[1:]) > grad_tol:
                    failures.append((world, rank, label, errs))
            assert res["ddp"]["clip"] <= 1e-12 and res["ddp"]["siglip"] <= 1e-12, (world, res["ddp"])
            assert max(res["naive"], default=0.0) <= 1e-12, res["naive"]
            # The largest buffer is feature-sized (64 x 32 fp32: features, ring buffers, gradients); tiles are
            # 16 x 16. Nothing grows with the world size (an all-gather would hold 64 * world rows).
            assert res["storage"] == results[0][2]["storage"], (world, rank, res["storage"])
            assert max(res["storage"].values()) <= 64 * 32 * 4, res["storage"]
    assert len(results[0][4]["naive"]) == 2
    assert not failures, failures
