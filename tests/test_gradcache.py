"""Exact accumulation (GradCache) against one big batch, beside plain accumulation, on CPU in fp32.

* one process: a global batch of 64 as 4 micro-batches of 16 gives the loss and every parameter gradient of one
  batch of 64 (1e-5 relative), for both losses, while plain accumulation (4 losses of 16) does not;
* 2 processes, DDP and DeepSpeed ZeRO-2: 4 micro-batches of 8 per rank (global 64) give the single-process
  gradients of the 64-sample batch, and, once both paths are warm, the accumulated step's peak memory is lower
  than the full batch's (measured at 128 per rank, where activations outweigh the per-step fixed costs);
* forward-time randomness (patch dropout) is replayed, gradient checkpointing changes nothing, locked towers stay
  fixed (and a fully locked tower's embeddings are reused instead of recomputed), and the loss's similarity
  math stays in fp32 under autocast.
"""

from __future__ import annotations

import ctypes
import resource

import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.helpers import reset_accelerate
from vlp.config import PretrainConfig
from vlp.distributed import world_info
from vlp.model import build_model, load_preset
from vlp.objectives import get_objective
from vlp.train import gradcache
from vlp.train.engine import build_accelerator, build_engine
from vlp.train.metrics import proc_status_bytes, reset_peak_rss
from vlp.train.optim import build_optimizer

GLOBAL = 64
MEMORY_PER_RANK = 128
"""Per-rank batch of the memory comparison: a step also pays costs that do not shrink with the micro-batch (the
gradients, and on accumulation a second dense token-embedding gradient of 25 MB added into the first), about
60-110 MB against 1.6-2.3 MB of activations per sample; at 32 per rank they would decide the comparison."""


def global_batch(n: int = GLOBAL, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "text": torch.randint(1, 49000, (n, 32), generator=g)}


def split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    n = batch["image"].shape[0] // parts
    return [{k: v[i * n : (i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def make_engine(
    loss: str,
    deepspeed: str | None = None,
    batch_size: int = 16,
    accum: int = 1,
    impl: str = "naive",
    preset_edit=None,
    **model_kw,
):
    """A tiny contrastive objective (seed 0) behind the engine the run would use; lr 0 so steps only clear grads."""
    reset_accelerate()
    cfg = PretrainConfig()
    cfg.model.name = "tiny"  # the preset built below
    cfg.loss.name, cfg.loss.impl, cfg.loss.chunk_size = loss, impl, 16
    cfg.train.batch_size, cfg.train.accum_steps, cfg.train.deepspeed = batch_size, accum, deepspeed
    cfg.optim.lr, cfg.optim.grad_clip = 0.0, None
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    preset = load_preset("tiny")
    if preset_edit:
        preset_edit(preset)
    torch.manual_seed(0)
    model = build_model(preset, cfg.loss)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.model.lock_image:
        model.clip.lock_image_tower(unlocked_groups=cfg.model.lock_image_unlocked_groups)
    objective = get_objective(cfg.loss.name).build(cfg, world_info(), model=model, preset=preset)
    accelerator = build_accelerator(cfg)
    return build_engine(
        accelerator, objective, build_optimizer(objective, cfg.optim), cfg, world_info(), objective.hidden_size()
    )


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's whole gradient (gathered from the ZeRO partitions under DeepSpeed)."""
    out = {}
    for name, p in engine.objective.named_parameters():
        if not p.requires_grad:
            continue
        if engine.kind == "deepspeed":
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad
        out[name] = g.detach().clone().float()
    return out


def measure(engine, fn, micro) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, gradients) of one step's forward/backward work; the (lr = 0) update then clears the gradients."""
    res = fn(engine, micro)
    grads = full_grads(engine)
    outcome = engine.step()
    assert outcome.applied
    return float(res.loss), grads


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor relative error max|a-b| / max|b| over all parameters."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in a)


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_gradcache_equals_one_big_batch_single_process(loss):
    batch = global_batch()
    engine = make_engine(loss, batch_size=16, accum=4)
    ref_loss, ref = measure(engine, gradcache.plain_step, [batch])
    gc_loss, gc = measure(engine, gradcache.gradcache_step, split(batch, 4))
    plain_loss, plain = measure(engine, gradcache.plain_step, split(batch, 4))
    print(
        f"{loss}: gradcache 4x16 vs 64: loss rel {abs(gc_loss - ref_loss) / abs(ref_loss):.1e}, grads rel "
        f"{max_rel(gc, ref):.1e}; plain 4x16: loss rel {abs(plain_loss - ref_loss) / abs(ref_loss):.1e}, "
        f"grads rel {max_rel(plain, ref):.1e}"
    )
    assert abs(gc_loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert max_rel(gc, ref) <= 1e-5
    assert abs(plain_loss - ref_loss) > 1e-4 * abs(ref_loss) and max_rel(plain, ref) > 1e-3  # another objective
    reset_accelerate()


def test_gradcache_with_chunked_loss_equals_one_big_batch():
    batch = global_batch()
    ref_loss, ref = measure(make_engine("siglip", accum=4), gradcache.plain_step, [batch])
    gc_loss, gc = measure(make_engine("siglip", accum=4, impl="chunked"), gradcache.gradcache_step, split(batch, 4))
    assert abs(gc_loss - ref_loss) <= 1e-5 * abs(ref_loss) and max_rel(gc, ref) <= 1e-5
    reset_accelerate()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak_rss_increase(engine, fn, micro) -> int:
    """Bytes by which the process's resident set peaks above its size before ``fn`` while ``fn`` runs."""
    _malloc_trim()
    before = proc_status_bytes("VmRSS")
    reset = reset_peak_rss()
    res = fn(engine, micro)
    peak = proc_status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine.step()
    del res
    return peak - before


def _distributed_accumulation(rank: int, world: int, backend: str) -> dict:
    torch.set_num_threads(1)
    batch = global_batch()
    per_rank = GLOBAL // world
    mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    deepspeed = None if backend == "ddp" else backend
    results: dict = {}
    for loss in ("siglip", "clip"):
        out: dict = {}
        engine = make_engine(loss, deepspeed, batch_size=per_rank // 4, accum=4)
        out["gc_loss"], out["gc"] = measure(engine, gradcache.gradcache_step, split(mine, 4))
        out["kind"] = engine.kind
        # Memory (lr = 0, so the steps above and below leave the weights as they are). The first step of an engine
        # also pays one-time allocations (gradient buffers, DDP's bucket rebuild after its first iteration, ZeRO-2's
        # gradient partitions and reduction buffers, first-call kernel state): 20-45 MB that would be charged to
        # whichever path is measured first. Each path runs once unmeasured at the measured shapes, so only per-step
        # memory is compared. Where the peak cannot be reset (ru_maxrss only grows), the full batch is not warmed
        # up: then a full batch that needed no more memory than the accumulated step would show no increase at all,
        # and the accumulated step is measured first, so the comparison cannot pass by accident.
        big = global_batch(MEMORY_PER_RANK, seed=100 + rank)
        measure(engine, gradcache.gradcache_step, split(big, 4))
        if reset_peak_rss():
            measure(engine, gradcache.plain_step, [big])
        out["mem_accumulated"] = _peak_rss_increase(engine, gradcache.gradcache_step, split(big, 4))
        out["mem_full"] = _peak_rss_increase(engine, gradcache.plain_step, [big])
        results[loss] = out
    reset_accelerate()
    return results


def _both_backends(rank: int, world: int) -> dict:
    """DDP then ZeRO-2 in one process group (a spawn of 2 processes costs seconds of start-up)."""
    return {backend: _distributed_accumulation(rank, world, backend) for backend in ("ddp", "zero2")}


@pytest.fixture(scope="module")
def across_ranks() -> tuple[dict, list[dict]]:
    refs = {}
    for loss in ("siglip", "clip"):
        refs[loss] = measure(make_engine(loss), gradcache.plain_step, [global_batch()])
    reset_accelerate()
    return refs, run_distributed(_both_backends, 2, timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_gradcache_across_ranks_equals_one_process_big_batch_and_uses_less_memory(backend, across_ranks):
    refs, res = across_ranks
    for rank, per_backend in enumerate(res):
        results = per_backend[backend]
        for loss in ("siglip", "clip"):
            r, (ref_loss, ref) = results[loss], refs[loss]
            assert r["kind"] == ("deepspeed" if backend == "zero2" else "ddp")
            rel = max_rel(r["gc"], ref)
            print(
                f"{backend} {loss} rank {rank}: 2 ranks x 4 x 8 vs one process x 64: loss rel "
                f"{abs(r['gc_loss'] - ref_loss) / abs(ref_loss):.1e}, grads rel {rel:.1e}; peak RSS increase "
                f"{r['mem_accumulated'] / 2**20:.0f} MiB accumulated (4 x {MEMORY_PER_RANK // 4}) vs "
                f"{r['mem_full'] / 2**20:.0f} MiB full ({MEMORY_PER_RANK})"
            )
            assert abs(r["gc_loss"] - ref_loss) <= 1e-5 * abs(ref_loss) and rel <= 1e-5
            assert r["mem_accumulated"] < 0.7 * r["mem_full"]


def test_gradcache_replays_forward_randomness():
    """With patch dropout, pass 2 must see pass 1's masks: equal to one graph over the same forwards."""

    def dropout(preset):
        preset.vision_cfg["patch_dropout"] = 0.5

    batch = global_batch(32)
    micro = split(batch, 4)
    engine = make_engine("siglip", batch_size=8, accum=4, preset_edit=dropout)
    obj = engine.objective
    torch.manual_seed(11)
    embs = [obj.embed(m) for m in micro]  # the same consecutive forwards as GradCache's first pass
    cat = {k: torch.cat([e[k] for e in embs]) if k in ("image", "text") else embs[0][k] for k in embs[0]}
    loss, _ = obj.loss_from_embeddings(cat)
    loss.backward()
    ref = full_grads(engine)
    engine.step()
    torch.manual_seed(11)
    _, gc = measure(engine, gradcache.gradcache_step, micro)
    assert max_rel(gc, ref) <= 1e-5
    original = gradcache.RandomState.replay
    gradcache.RandomState.replay = lambda self: __import__("contextlib").nullcontext()  # no replay: wrong
    try:
        torch.manual_seed(11)
        _, wrong = measure(engine, gradcache.gradcache_step, micro)
    finally:
        gradcache.RandomState.replay = original
    assert max_rel(wrong, ref) > 1e-2
    reset_accelerate()


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = global_batch(16)
    loss_a, a = measure(make_engine("clip"), gradcache.plain_step, [batch])
    engine = make_engine("clip", grad_checkpointing=True)
    assert engine.objective.model.visual.transformer.grad_checkpointing
    assert engine.objective.model.clip.transformer.grad_checkpointing
    loss_b, b = measure(engine, gradcache.plain_step, [batch])
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and max_rel(b, a) <= 1e-5
    reset_accelerate()


def test_locked_image_tower_stays_fixed_and_its_embeddings_are_reused():
    batch = global_batch(32)
    ref_engine = make_engine("siglip", lock_image=True)
    obj = ref_engine.objective
    assert obj.frozen_outputs() == ("image",)
    assert not any(p.requires_grad for p in obj.model.visual.parameters())
    ref_loss, ref = measure(ref_engine, gradcache.plain_step, [batch])
    assert not any(k.startswith("model.clip.visual.") for k in ref)
    engine = make_engine("siglip", lock_image=True, accum=4, batch_size=8)
    calls = []
    engine.objective.model.visual.register_forward_hook(lambda *a: calls.append(1))
    gc_loss, gc = measure(engine, gradcache.gradcache_step, split(batch, 4))
    assert len(calls) == 4  # first pass only: the frozen tower's embeddings are reused in the second
    assert abs(gc_loss - ref_loss) <= 1e-5 * abs(ref_loss) and max_rel(gc, ref) <= 1e-5

    # an update with a real learning rate moves the text tower and leaves the image tower exactly as it was
    visual = {k: v.clone() for k, v in engine.objective.model.visual.state_dict().items()}
    text = engine.objective.model.clip.token_embedding.weight.detach().clone()
    for g in engine.optimizer.param_groups:
        g["lr"] = 1e-2
    gradcache.gradcache_step(engine, split(batch, 4))
    assert engine.step().applied
    assert all(torch.equal(v, engine.objective.model.visual.state_dict()[k]) for k, v in visual.items())
    assert not torch.equal(text, engine.objective.model.clip.token_embedding.weight)
    reset_accelerate()


def test_lock_with_unlocked_groups_trains_only_the_last_groups():
    engine = make_engine("siglip", lock_image=True, lock_image_unlocked_groups=1)
    visual = dict(engine.objective.model.visual.named_parameters())
    assert [k for k, p in visual.items() if p.requires_grad] == ["proj"]  # open_clip's last group: the projection
    reset_accelerate()


def test_loss_similarities_stay_fp32_under_autocast():
    engine = make_engine("siglip")
    obj = engine.objective
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(64, 128, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(64, 128, generator=g), dim=-1)
    emb = {
        "image": img,
        "text": txt,
        "logit_scale": obj.model.logit_scale.detach(),
        "logit_bias": obj.model.logit_bias.detach(),
    }
    ref, _ = obj.loss_from_embeddings(emb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = obj.loss_from_embeddings(emb)
        naive = obj.loss_fn(img, txt, emb["logit_scale"], emb["logit_bias"])  # what autocast would do to it
    assert under_autocast.dtype == torch.float32 and under_autocast.item() == pytest.approx(ref.item(), rel=1e-6)
    assert abs(naive.float().item() - ref.item()) > 1e-4 * abs(ref.item())  # bf16 similarities would differ
    reset_accelerate()
