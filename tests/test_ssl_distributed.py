"""SSL objectives on a real 2-process gloo group: equal to one process on the global batch; MoCo's queue.

SimCLR (gathered negatives, batch norm over the global batch in its head) and DINO (multi-crop, all-reduced
teacher centre) must give, under DDP at world size 2, the loss and the gradients of every trainable parameter
that one process computes on the concatenated batch. MoCo v2's queue must be FIFO and identical on both ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from tests.distributed_harness import run_distributed

WORLD = 2
LOCAL_BATCH = 4
ARGS = [
    "--batch-size",
    str(LOCAL_BATCH),
    "--ssl.simclr.hidden_dim",
    "64",
    "--ssl.simclr.out_dim",
    "32",
    "--ssl.dino.out_dim",
    "64",
    "--ssl.dino.hidden_dim",
    "64",
    "--ssl.dino.bottleneck_dim",
    "32",
    "--ssl.dino.local_crops",
    "2",
    "--ssl.views.local_crop_size",
    "32",
    "--ssl.moco.version",
    "2",
    "--ssl.moco.out_dim",
    "16",
    "--ssl.moco.queue_size",
    "16",
    "--ssl.dino.freeze_last_layer_epochs",
    "0",
]


def _objective(name: str):
    from vlp.config import PRETRAIN_ALIASES, parse_cli
    from vlp.distributed import world_info
    from vlp.model import build_model, load_preset
    from vlp.objectives import get_objective, run_config_class

    torch.manual_seed(0)  # identical initial weights on every rank and in the single process
    preset = load_preset("tiny")
    cfg = parse_cli(run_config_class(), ["--objective", name, *ARGS], PRETRAIN_ALIASES)
    return get_objective(name).build(cfg, world_info(), model=build_model(preset), preset=preset)


def _global_views(sizes: list[int], batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


SIZES = {"simclr": [64, 64], "dino": [64, 64, 32, 32]}


def _grads(obj) -> dict[str, np.ndarray]:
    return {n: p.grad.detach().numpy().copy() for n, p in obj.named_parameters() if p.requires_grad}


def _moco_keys(obj, view: torch.Tensor) -> np.ndarray:
    from vlp.ssl.backbone import backbone_features

    with torch.no_grad():
        k = obj.method.teacher["head"](backbone_features(obj.method.teacher["backbone"], view))
    return F.normalize(k, dim=-1).numpy()


def _worker(rank: int, world: int) -> dict:
    out: dict = {}
    n = LOCAL_BATCH
    for name, sizes in SIZES.items():
        obj = _objective(name)
        ddp = DistributedDataParallel(obj)
        views = [v[rank * n : (rank + 1) * n] for v in _global_views(sizes, n * world, seed=1)]
        loss, _ = ddp({"ssl_views": views})
        loss.backward()  # DDP averages the gradients over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        out[name] = {"loss": mean_loss.item() / world, "grads": _grads(obj)}
        if name == "dino":
            out[name]["center"] = obj.method.loss_fn.center.numpy().copy()
    obj = _objective("moco")
    queues, keys = [], []
    for step in range(1, 4):
        views = [v[rank * n : (rank + 1) * n] for v in _global_views([64, 64], n * world, seed=10 + step)]
        keys.append(_moco_keys(obj, views[1]))
        obj({"ssl_views": views})
        obj.after_step(step, 10)
        queues.append((obj.method.queue.keys.numpy().copy(), int(obj.method.queue.ptr)))
    out["moco"] = {"queues": queues, "keys": keys}
    return out


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_worker, WORLD)


@pytest.mark.parametrize("name", ["simclr", "dino"])
def test_world_size_2_equals_one_process_on_the_global_batch(distributed_results, name):
    obj = _objective(name)
    views = _global_views(SIZES[name], LOCAL_BATCH * WORLD, seed=1)
    loss, _ = obj({"ssl_views": views})
    loss.backward()
    ref = _grads(obj)
    largest = max(float(np.abs(g).max()) for g in ref.values())
    for rank_result in distributed_results:
        res = rank_result[name]
        assert res["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert set(res["grads"]) == set(ref)
        for key, g in ref.items():
            # float32 summation-order noise; biases feeding batch norm have a true gradient of 0, so theirs is pure
            # noise (seen up to 1.3e-6 x the largest gradient); a wrong distributed gradient is off by ~1e-1
            atol = max(1e-4 * float(np.abs(g).max()), 1e-5 * largest)
            np.testing.assert_allclose(res["grads"][key], g, rtol=1e-3, atol=atol, err_msg=f"{name}: {key}")
    assert all(float(np.abs(g).max()) > 0 for g in ref.values())  # every trainable parameter is compared
    if name == "dino":
        np.testing.assert_allclose(
            distributed_results[0]["dino"]["center"], obj.method.loss_fn.center.numpy(), rtol=1e-5, atol=1e-8
        )


def test_moco_v2_queue_is_fifo_and_identical_on_two_ranks(distributed_results):
    r0, r1 = distributed_results[0]["moco"], distributed_results[1]["moco"]
    g = LOCAL_BATCH * WORLD
    for (q0, p0), (q1, p1) in zip(r0["queues"], r1["queues"]):
        np.testing.assert_array_equal(q0, q1)
        assert p0 == p1
    assert [p for _, p in r0["queues"]] == [8, 0, 8]
    step_keys = [np.concatenate([r0["keys"][s], r1["keys"][s]]) for s in range(3)]  # the global batch, rank order
    assert step_keys[0].shape == (g, 16)
    q_after1, q_after2, q_after3 = (q for q, _ in r0["queues"])
    np.testing.assert_allclose(q_after1[:, :g].T, step_keys[0], atol=1e-6)
    np.testing.assert_allclose(q_after2[:, :g].T, step_keys[0], atol=1e-6)  # still there
    np.testing.assert_allclose(q_after2[:, g:].T, step_keys[1], atol=1e-6)
    np.testing.assert_allclose(q_after3[:, :g].T, step_keys[2], atol=1e-6)  # the oldest keys were replaced
    np.testing.assert_allclose(q_after3[:, g:].T, step_keys[1], atol=1e-6)
    assert not np.allclose(step_keys[0], step_keys[2])
