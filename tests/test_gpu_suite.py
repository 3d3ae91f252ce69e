"""The GPU suite's dry run (scripts/benchmarks/gpu_suite.py --dry-run): every section's code path on CPU with the
tiny presets, so that the suite is known to work before a GPU is lent to run it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = [
    "clip",
    "siglip",
    "simclr",
    "moco",
    "byol",
    "dino",
    "siglip+simclr (aux)",
    "gradcache (accum 2)",
    "adapter",
    "eval",
    "export",
]


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/benchmarks/gpu_suite.py"),
            "--dry-run",
            "--out",
            str(tmp_path),
            "--budget-s",
            "600",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    failed = {k: s.get("error") or s.get("errors") for k, s in doc["sections"].items() if not s["ok"]}
    assert proc.returncode == 0 and doc["ok"], (failed, proc.stderr[-3000:])
    sections = doc["sections"]

    # (a) both engines, both losses, vlp against open_clip_train's train_one_epoch
    rows = sections["a_throughput"]["rows"]
    assert [(r["loss"], r["engine"]) for r in rows] == [("siglip", "ZeRO-2"), ("clip", "DDP")]
    for r in rows:
        res = r["result"]["results"]
        assert res["vlp"]["samples_per_s"] > 0 and res["open_clip_train"]["samples_per_s"] > 0
        assert r["result"]["model_gflops_per_sample"] > 0
    assert rows[0]["result"]["results"]["vlp"]["engine"] == "deepspeed ZeRO-2"

    # (b) every implementation gives the same loss on the same features
    recs = sections["b_losses"]["records"]
    assert len(recs) == 2 * 2 * 3
    for rec in recs:
        ref = next(r for r in recs if r["impl"] == "naive" and r["loss"] == rec["loss"] and r["batch"] == rec["batch"])
        assert math.isclose(rec["loss_value"], ref["loss_value"], rel_tol=1e-4), rec

    # (c) every mode: finite losses, a checkpoint at the half-way step, resumed from it, run to the end
    recs = {r["mode"]: r for r in sections["c_smoke"]["records"]}
    assert list(recs) == MODES
    for name in MODES[:8]:
        r = recs[name]
        assert r["finite"] and r["steps_logged"] == 4 and r["resumed_from"] == [2] and r["checkpoints"] == [2, 4], r
    assert recs["adapter"]["finite"] and recs["adapter"]["checkpoint"] and recs["adapter"]["steps"] == 4
    assert len(recs["eval"]["top1"]) >= 1 and all(0 <= x <= 1 for x in recs["eval"]["top1"])
    assert recs["export"]["transformers_class"] in ("CLIPModel", "SiglipModel")

    # (d) the speed settings, each a finite training run
    sweep = sections["d_speed"]["result"]["sweep"]
    assert [(r["patch_dropout"], r["compile"]) for r in sweep] == [(0.0, False), (0.5, False), (0.0, True)]
    assert all(math.isfinite(r["final_loss"]) and r["step_time_s"] > 0 for r in sweep)
    # torch.compile (inductor) trains as eager does: same seed, same loss after the same steps
    assert math.isclose(sweep[2]["final_loss"], sweep[0]["final_loss"], rel_tol=1e-4)
    assert sweep[1]["final_loss"] != sweep[0]["final_loss"]  # patch dropout changed the training

    md = (tmp_path / "gpu_suite.md").read_text()
    for heading in ("(a) Training throughput", "(b) Losses", "(c) Smoke run", "(d) Speed features"):
        assert heading in md


def test_gpu_suite_refuses_bad_smoke_jobs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmarks/gpu_suite.py"), "--dry-run", "--out", str(tmp_path)]
        + ["--sections", "b", "--smoke-jobs", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 2 and "--smoke-jobs must be >= 1, got 0" in proc.stderr, proc.stderr[-2000:]


def test_loss_chunk_sweep_agrees_with_naive(capsys):
    """scripts/benchmarks/loss_chunk_sweep.py: every chunk size and TF32 setting gives the naive loss."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_chunk_sweep", ROOT / "scripts/benchmarks/loss_chunk_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--batch", "96", "--dim", "8", "--chunks", "32", "64", "--repeats", "1"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # 2 dtypes x 2 TF32 settings x 2 losses x 2 chunk sizes, and the naive losses at TF32 on (bf16, fp32)
    assert len(recs) == 2 * 2 * 2 * 2 + 2 * 2 and not any("error" in r for r in recs)
    for r in recs:
        ref = next(n for n in recs if n["impl"] == "naive" and n["loss"] == r["loss"] and n["dtype"] == "float32")
        # bf16 features are rounded inputs (chunked computes them in fp32 tiles); naive bf16 also rounds its logits
        tol = 1e-5 if r["dtype"] == "float32" else 1e-3 if r["impl"] == "chunked" else 2e-2
        assert math.isclose(r["loss_value"], ref["loss_value"], rel_tol=tol), (r, ref)
        assert r["time_ms"] > 0 and (r["chunk"] in (32, 64)) == (r["impl"] == "chunked")
