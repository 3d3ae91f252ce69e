#!/usr/bin/env python
"""The GPU check-up of vlp in one command: throughput and MFU, losses at GPU batch sizes, a smoke run of every mode,
and the speed features, written to one JSON file and one markdown table.

    python scripts/benchmarks/gpu_suite.py --out gpu-suite             # one H100/H200: <= 8 minutes in all
    python scripts/benchmarks/gpu_suite.py --dry-run --out /tmp/suite  # the same code paths on CPU, tiny presets

Sections (each runs the project's public entry points, so that it survives internal changes):

(a) throughput: ViT-B/16 SigLIP and CLIP presets, bf16, one GPU, under DeepSpeed ZeRO-2 and plain DDP
    (``scripts/benchmarks/train_throughput.py``): samples/s, model FLOPs utilisation (torch.utils.flop_counter and
    the detected GPU's dense bf16 peak), peak memory, against open_clip_train's ``train_one_epoch`` (autocast bf16)
    on the same towers, batches and optimiser; the batch is the largest of 512/256/128 (by GPU memory, halved on
    an out-of-memory error) at which both fit.
(b) losses: vlp chunked vs naive vs open_clip, SigLIP and CLIP, B = 16k, 32k, 64k, D = 768, fp32 and bf16 features:
    forward + backward time and peak CUDA memory over the inputs (one process per dtype).
(c) smoke: every mode for 20 steps, as two invocations of its script (10 steps, then ``--resume latest`` to 20):
    clip, siglip, each SSL objective (configs/ssl/*-tiny.yaml), the SigLIP + SimCLR auxiliary run, GradCache
    accumulation (``--accum-steps 2``), then ``scripts/eval_zeroshot.py`` and ``scripts/export_hf.py`` (hf-full,
    loaded back with transformers) on the SigLIP run, and ``scripts/train_adapter.py``. Checked: exit status 0,
    finite losses, a checkpoint written, the resume taken (the adapter's too).
(d) speed features: patch dropout 0 / 0.5 / 0.75 and torch.compile off / on (ViT-B/16 CLIP, an open_clip ViT; the
    SigLIP preset's timm tower has no patch dropout).

``--dry-run`` runs all of it on CPU with tiny presets (fp32, B = 256/512 losses, 4-step smoke runs executed in this
process through each script's ``main(argv)``), in under two minutes on two cores; the test suite runs it. Sections
that would overrun ``--budget-s`` are skipped and marked so. The exit status is 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
BENCH = SCRIPTS / "benchmarks"
SSL_OBJECTIVES = ("simclr", "moco", "byol", "dino")


@dataclass
class Plan:
    """Sizes of every section: the GPU plan, or the tiny CPU plan of --dry-run."""

    device: str
    throughput: list[tuple[str, str, str, bool]]
    """(preset, loss, engine: zero2 | none, against open_clip_train)"""
    throughput_batch: int
    throughput_steps: int
    throughput_warmup: int
    loss_batches: list[int]
    loss_dim: int
    loss_dtypes: list[str]
    loss_impls: list[str] = field(default_factory=lambda: ["chunked", "naive", "open_clip"])
    loss_repeats: int = 3
    smoke_steps: int = 20
    smoke_batch: int = 32
    smoke_preset: str = "tiny"
    smoke_jobs: int = 4
    synthetic_train: int = 2000
    synthetic_eval: int = 200
    speed_preset: str = "vit-b-16-clip"
    speed_settings: list[str] = field(default_factory=lambda: ["0:off", "0.5:off", "0.75:off", "0:on"])
    speed_batch: int = 256
    speed_steps: int = 10
    speed_warmup: int = 3
    inline: bool = False
    """Run the smoke invocations in this process (script main(argv)) instead of subprocesses."""


def gpu_plan(memory_gb: float) -> Plan:
    batch = 512 if memory_gb >= 120 else 256 if memory_gb >= 70 else 128
    return Plan(
        device="cuda",
        throughput=[
            ("vit-b-16-siglip", "siglip", "zero2", True),
            ("vit-b-16-siglip", "siglip", "none", False),
            ("vit-b-16-clip", "clip", "zero2", True),
            ("vit-b-16-clip", "clip", "none", False),
        ],
        throughput_batch=batch,
        throughput_steps=10,
        throughput_warmup=3,
        loss_batches=[16384, 32768, 65536],
        loss_dim=768,
        loss_dtypes=["float32", "bfloat16"],
        smoke_jobs=8,  # measured on one H200 with 16 CPU cores: (c) in 156 s
        speed_batch=batch // 2,
    )


def dry_plan(out: Path) -> Plan:
    """Tiny presets on CPU; (d) uses a one-block copy of the tiny preset so that torch.compile stays quick."""
    from vlp.presets import load_preset

    p = load_preset("tiny")
    data = p.open_clip_config()
    data["vision_cfg"]["layers"] = data["text_cfg"]["layers"] = 1
    data["preprocess"] = p.preprocess
    import yaml

    one_block = out / "presets" / "tiny-1block.yaml"
    one_block.parent.mkdir(parents=True, exist_ok=True)
    one_block.write_text(yaml.safe_dump(data))
    return Plan(
        device="cpu",
        throughput=[("tiny", "siglip", "zero2", True), ("tiny", "clip", "none", True)],
        throughput_batch=8,
        throughput_steps=2,
        throughput_warmup=1,
        loss_batches=[256, 512],
        loss_dim=32,
        loss_dtypes=["float32"],
        loss_repeats=1,
        smoke_steps=4,
        smoke_batch=8,
        smoke_jobs=1,
        synthetic_train=400,
        synthetic_eval=100,
        speed_preset=str(one_block),
        speed_settings=["0:off", "0.5:off", "0:on"],
        speed_batch=8,
        speed_steps=2,
        speed_warmup=1,
        inline=True,
    )


# --------------------------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Invocation:
    """One run of a script: its command line and what came of it."""

    script: str
    argv: list[str]
    rc: int | None = None
    wall_s: float | None = None
    log: str | None = None
    tail: str = ""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run_inline(script: Path, argv: list[str], log_path: Path) -> int:
    """``main(argv)`` of a script in this process, its output and log records into ``log_path``."""
    from vlp.config import ConfigError

    spec = importlib.util.spec_from_file_location(f"_gpu_suite_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        try:
            spec.loader.exec_module(module)
            return int(module.main(list(argv)) or 0)
        except ConfigError as e:
            print(f"{script.name}: error: {e}")
            return 2
        except SystemExit as e:
            return int(e.code or 0) if not isinstance(e.code, str) else 1
        except BaseException:  # noqa: BLE001 - report any failure as this invocation's
            traceback.print_exc()
            return 1
        finally:
            root.handlers[:], root.level = saved


def invoke(script: Path, argv: list[str], log_path: Path, inline: bool, timeout: float = 600) -> Invocation:
    inv = Invocation(str(script.relative_to(ROOT)), [str(a) for a in argv], log=str(log_path))
    t0 = time.perf_counter()
    if inline:
        inv.rc = _run_inline(script, inv.argv, log_path)
    else:
        with open(log_path, "w") as f:
            try:
                inv.rc = subprocess.run(
                    [sys.executable, str(script), *inv.argv],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    env=_env(),
                    timeout=timeout,
                ).returncode
            except subprocess.TimeoutExpired:
                inv.rc = 124
    inv.wall_s = time.perf_counter() - t0
    if inv.rc != 0:
        inv.tail = log_path.read_text(errors="replace")[-2000:]
    return inv


def _json_tail(text: str) -> dict:
    """The last JSON document a benchmark printed (it prints one, possibly after log lines)."""
    start = text.rfind("\n{")
    start = 0 if text.startswith("{") and start < 0 else start
    return json.loads(text[start:])


# --------------------------------------------------------------------------------------------------------------
# (a) throughput, (d) speed features: scripts/benchmarks/train_throughput.py
# --------------------------------------------------------------------------------------------------------------


def _throughput_cmd(plan: Plan, preset: str, loss: str, engine: str, batch: int, open_clip: bool) -> list[str]:
    cmd = [
        sys.executable,
        str(BENCH / "train_throughput.py"),
        "--device",
        plan.device,
        "--model",
        preset,
        "--loss",
        loss,
        "--batch-size",
        str(batch),
        "--steps",
        str(plan.throughput_steps),
        "--warmup",
        str(plan.throughput_warmup),
        "--deepspeed",
        engine,
    ]
    return cmd + ([] if open_clip else ["--skip-open-clip"])


def _run_json(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return _json_tail(proc.stdout)


def section_throughput(plan: Plan, suite: Suite) -> dict:
    rows = []
    for preset, loss, engine, with_oc in plan.throughput:
        batch, row = plan.throughput_batch, {}
        while True:
            row = {"preset": preset, "loss": loss, "engine": "ZeRO-2" if engine == "zero2" else "DDP", "batch": batch}
            try:
                doc = _run_json(_throughput_cmd(plan, preset, loss, engine, batch, with_oc), suite.remaining())
            except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
                row.update(ok=False, error=str(e)[-1500:])
                break
            row["result"] = doc
            oom = any("out of memory" in str(r.get("error", "")) for r in doc["results"].values())
            if oom and batch > 16:
                batch //= 2
                continue
            row["ok"] = all(
                "samples_per_s" in r and math.isfinite(r.get("final_loss", 0.0)) for r in doc["results"].values()
            )
            break
        rows.append(row)
    return {"rows": rows, "ok": all(r.get("ok") for r in rows)}


def section_speed(plan: Plan, suite: Suite) -> dict:
    cmd = [
        sys.executable,
        str(BENCH / "train_throughput.py"),
        "--device",
        plan.device,
        "--model",
        plan.speed_preset,
        "--loss",
        "clip",
        "--batch-size",
        str(plan.speed_batch),
        "--steps",
        str(plan.speed_steps),
        "--warmup",
        str(plan.speed_warmup),
        "--deepspeed",
        "none",
        "--sweep",
        *plan.speed_settings,
    ]
    try:
        doc = _run_json(cmd, suite.remaining())
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": str(e)[-1500:]}
    ok = len(doc["sweep"]) == len(plan.speed_settings) and all(math.isfinite(r["final_loss"]) for r in doc["sweep"])
    return {"ok": ok, "result": doc}


# --------------------------------------------------------------------------------------------------------------
# (b) losses at large batch
# --------------------------------------------------------------------------------------------------------------


def loss_child(spec: dict) -> dict:
    """All (B, loss, impl) measurements of one dtype in this process; peak memory over the inputs (CUDA)."""
    import torch
    import torch.nn.functional as F

    loader = importlib.util.spec_from_file_location("_gpu_suite_loss_memory", BENCH / "loss_memory.py")
    lm = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(lm)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    cuda = device.type == "cuda"
    records = []
    for batch in spec["batches"]:
        for name in ("siglip", "clip"):
            for impl in spec["impls"]:
                rec = {"batch": batch, "dim": spec["dim"], "dtype": spec["dtype"], "loss": name, "impl": impl}
                try:
                    fn = lm._build_loss({"loss": name, "impl": impl, "chunk_size": 1024}, 1, 0)
                    g = torch.Generator(device=device).manual_seed(0)
                    img = F.normalize(torch.randn(batch, spec["dim"], device=device, generator=g), dim=-1).to(dtype)
                    txt = F.normalize(torch.randn(batch, spec["dim"], device=device, generator=g), dim=-1).to(dtype)
                    t = torch.tensor(math.log(10.0), device=device, requires_grad=True)
                    b = torch.tensor(-10.0, device=device, requires_grad=True) if name == "siglip" else None
                    times, peak = [], None
                    for i in range(1 + spec["repeats"]):
                        x, y = img.detach().requires_grad_(), txt.detach().requires_grad_()
                        if cuda:
                            torch.cuda.synchronize(device)
                            torch.cuda.reset_peak_memory_stats(device)
                            base = torch.cuda.memory_allocated(device)
                        t0 = time.perf_counter()
                        loss = fn(x, y, t, b)
                        loss.backward()
                        if cuda:
                            torch.cuda.synchronize(device)
                            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                        if i:
                            times.append(time.perf_counter() - t0)
                        rec["loss_value"] = float(loss)
                        del loss, x, y
                        t.grad = None
                        if b is not None:
                            b.grad = None
                    rec.update(time_s=min(times), peak_gb=peak, ok=math.isfinite(rec["loss_value"]))
                except torch.cuda.OutOfMemoryError:
                    rec.update(ok=True, oom=True)
                except Exception as e:  # noqa: BLE001 - one failed measurement does not stop the others
                    rec.update(ok=False, error=f"{type(e).__name__}: {e}"[-500:])
                finally:
                    if cuda:
                        torch.cuda.empty_cache()
                records.append(rec)
    return {"records": records}


def section_losses(plan: Plan, suite: Suite) -> dict:
    records, errors = [], []
    for dtype in plan.loss_dtypes:
        spec = {
            "device": plan.device,
            "dtype": dtype,
            "batches": plan.loss_batches,
            "dim": plan.loss_dim,
            "impls": plan.loss_impls,
            "repeats": plan.loss_repeats,
        }
        try:
            records += _run_json([sys.executable, __file__, "--loss-child", json.dumps(spec)], suite.remaining())[
                "records"
            ]
        except Exception as e:  # noqa: BLE001
            errors.append(f"{dtype}: {e}"[-1500:])
    expected = len(plan.loss_dtypes) * len(plan.loss_batches) * 2 * len(plan.loss_impls)
    # the chunked loss must never run out of memory; quadratic ones may (recorded as such)
    ok = (
        not errors
        and len(records) == expected
        and all(r["ok"] for r in records)
        and not any(r.get("oom") for r in records if r["impl"] == "chunked")
    )
    return {"ok": ok, "records": records, "errors": errors}


# --------------------------------------------------------------------------------------------------------------
# (c) smoke run of every mode
# --------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _checkpoint_steps(run: Path) -> list[int]:
    steps = []
    for p in (run / "checkpoints").glob("step-*"):
        with contextlib.suppress(ValueError):
            steps.append(int(p.name.split("-", 1)[1]))
    return sorted(steps)


class Suite:
    def __init__(self, plan: Plan, out: Path, budget_s: float) -> None:
        self.plan, self.out = plan, out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def remaining(self) -> float:
        return max(1.0, self.budget_s - (time.perf_counter() - self.t0))

    # -- (c) --------------------------------------------------------------------------------------------------
    def common_pretrain(self) -> list[str]:
        p = self.plan
        return [
            "--batch-size",
            p.smoke_batch,
            "--workers",
            1,
            "--warmup-steps",
            2,
            "--data.synthetic_dir",
            self.out / "data",
            "--data.synthetic_train_samples",
            p.synthetic_train,
            "--data.synthetic_eval_samples",
            p.synthetic_eval,
            "--eval.batch_size",
            64,
        ]

    def pretrain_modes(self) -> dict[str, list[str]]:
        tiny = ["--model", self.plan.smoke_preset]
        modes = {"clip": [*tiny, "--loss", "clip"], "siglip": [*tiny, "--loss", "siglip"]}
        for name in SSL_OBJECTIVES:
            modes[name] = ["--config", ROOT / "configs" / "ssl" / f"{name}-tiny.yaml"]
        modes["siglip+simclr (aux)"] = ["--config", ROOT / "configs" / "ssl" / "siglip-simclr-tiny.yaml"]
        modes["gradcache (accum 2)"] = [
            *tiny,
            "--loss",
            "siglip",
            "--accum-steps",
            2,
            "--train.accumulation",
            "gradcache",
        ]
        return modes

    def smoke_pretrain(self, name: str, extra: list[str]) -> dict:
        """Half the steps, then --resume latest to the full count; finite losses, checkpoints, the resume."""
        p = self.plan
        run = self.out / "runs" / name.split()[0].replace("+", "-")
        half, full = p.smoke_steps // 2, p.smoke_steps
        script = SCRIPTS / "pretrain.py"
        first = invoke(
            script,
            [*extra, *self.common_pretrain(), "--steps", half, "--output-dir", run],
            run.with_suffix(".1.log"),
            p.inline,
            self.remaining(),
        )
        rec: dict[str, Any] = {"mode": name, "run": str(run), "invocations": [asdict(first)]}
        if first.rc == 0:
            ckpt_after_first = _checkpoint_steps(run)
            second = invoke(
                script,
                [*extra, *self.common_pretrain(), "--steps", full, "--output-dir", run, "--resume", "latest"],
                run.with_suffix(".2.log"),
                p.inline,
                self.remaining(),
            )
            rec["invocations"].append(asdict(second))
            metrics = _read_jsonl(run / "metrics.jsonl")
            losses = [m["loss"] for m in metrics if "loss" in m]
            resumed = [m["resumed_from_step"] for m in metrics if "resumed_from_step" in m]
            summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
            rec.update(
                steps_logged=len(losses),
                first_loss=losses[0] if losses else None,
                final_loss=losses[-1] if losses else None,
                finite=bool(losses) and all(map(math.isfinite, losses)),
                checkpoint_after_first=ckpt_after_first[-1] if ckpt_after_first else None,
                checkpoints=_checkpoint_steps(run),
                resumed_from=resumed,
                engine=summary.get("engine"),
                exported=(run / "model.safetensors").is_file(),
            )
            rec["ok"] = (
                second.rc == 0
                and rec["finite"]
                and len(losses) == full
                and half in resumed
                and rec["checkpoint_after_first"] == half
                and full in rec["checkpoints"]
            )
        else:
            rec["ok"] = False
        return rec

    def smoke_adapter(self) -> dict:
        p = self.plan
        run = self.out / "runs" / "adapter"
        half, full = p.smoke_steps // 2, p.smoke_steps
        script = SCRIPTS / "train_adapter.py"
        common = [
            "--config",
            ROOT / "configs" / "adapter" / "tiny.yaml",
            "--batch-size",
            p.smoke_batch,
            "--output-dir",
            run,
            "--train.eval_every",
            full,
            "--data.synthetic_train_samples",
            p.synthetic_train,
            "--data.synthetic_eval_samples",
            p.synthetic_eval,
            "--data.eval_samples",
            16,
        ]
        first = invoke(script, [*common, "--steps", half], run.with_suffix(".1.log"), p.inline, self.remaining())
        rec: dict[str, Any] = {"mode": "adapter", "run": str(run), "invocations": [asdict(first)]}
        second = invoke(
            script,
            [*common, "--steps", full, "--resume", "latest"],
            run.with_suffix(".2.log"),
            p.inline,
            self.remaining(),
        )
        rec["invocations"].append(asdict(second))
        if second.rc == 2 and "--resume" in second.tail and "unrecognised argument" in second.tail:
            rec["resume"] = "unsupported: train_adapter.py has no --resume"
            second = invoke(script, [*common, "--steps", full], run.with_suffix(".3.log"), p.inline, self.remaining())
            rec["invocations"].append(asdict(second))
        else:
            rec["resume"] = "taken" if second.rc == 0 else "failed"
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        losses = [summary.get("first_loss"), summary.get("final_loss")]
        rec.update(
            first_loss=losses[0],
            final_loss=losses[1],
            finite=all(isinstance(x, float) and math.isfinite(x) for x in losses),
            checkpoint=(run / "mm_projector.safetensors").is_file(),
            steps=summary.get("steps"),
        )
        resumed = [m["resumed_from_step"] for m in _read_jsonl(run / "metrics.jsonl") if "resumed_from_step" in m]
        rec.update(resumed_from=resumed, checkpoints=_checkpoint_steps(run))
        rec["ok"] = (
            first.rc == 0
            and second.rc == 0
            and rec["finite"]
            and rec["checkpoint"]
            and rec["steps"] == full
            and rec["resume"] == "taken"
            and half in resumed
            and full in rec["checkpoints"]
        )
        return rec

    def smoke_eval(self, run: Path) -> dict:
        out = self.out / "eval-zeroshot"
        inv = invoke(
            SCRIPTS / "eval_zeroshot.py",
            ["--checkpoint", run, "--output-dir", out, "--workers", 0, "--plots", "false", "--batch-size", 64],
            self.out / "runs" / "eval.log",
            self.plan.inline,
            self.remaining(),
        )
        rec: dict[str, Any] = {"mode": "eval", "invocations": [asdict(inv)]}
        results = out / "results.json"
        top1 = []
        if results.is_file():
            doc = json.loads(results.read_text())
            top1 = [m["top1"] for m in doc.get("classification", {}).values()]
        rec.update(top1=top1, ok=inv.rc == 0 and bool(top1) and all(math.isfinite(x) for x in top1))
        return rec

    def smoke_export(self, run: Path) -> dict:
        out = self.out / "export-hf"
        inv = invoke(
            SCRIPTS / "export_hf.py",
            ["--checkpoint", run, "--output", out, "--format", "hf-full", "--overwrite", "true"],
            self.out / "runs" / "export.log",
            self.plan.inline,
            self.remaining(),
        )
        rec: dict[str, Any] = {"mode": "export", "invocations": [asdict(inv)], "ok": False}
        if inv.rc == 0:
            try:  # load it back with transformers alone and embed one image
                import torch
                from transformers import AutoModel

                model = AutoModel.from_pretrained(out).eval()
                size = model.config.vision_config.image_size
                with torch.no_grad():
                    feats = model.get_image_features(pixel_values=torch.zeros(1, 3, size, size))
                feats = getattr(feats, "pooler_output", feats)
                rec.update(
                    transformers_class=type(model).__name__,
                    embed_dim=int(feats.shape[-1]),
                    ok=bool(torch.isfinite(feats).all()),
                )
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {e}"[-1000:]
        return rec

    def section_smoke(self) -> dict:
        modes = self.pretrain_modes()
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        jobs = self.plan.smoke_jobs
        if self.plan.inline:  # the first run writes the synthetic shards; in-process runs go one at a time
            records = [self.smoke_pretrain(n, a) for n, a in modes.items()]
            records += [self.smoke_adapter()]
        else:
            first = self.smoke_pretrain("siglip", modes.pop("siglip"))  # also writes the synthetic shards
            with ThreadPoolExecutor(jobs) as pool:
                futures = [pool.submit(self.smoke_pretrain, n, a) for n, a in modes.items()]
                futures.append(pool.submit(self.smoke_adapter))
                records = [first] + [f.result() for f in futures]
        siglip = next(r for r in records if r["mode"] == "siglip")
        if siglip["ok"]:
            records += [self.smoke_eval(Path(siglip["run"])), self.smoke_export(Path(siglip["run"]))]
        else:
            records += [{"mode": m, "ok": False, "error": "the siglip run failed"} for m in ("eval", "export")]
        return {"ok": all(r["ok"] for r in records), "records": records}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return fmt.format(x)
    return str(x)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"# vlp GPU suite{' (dry run, CPU)' if doc['dry_run'] else ''}",
        "",
        f"{m['device']} on {m['host']}, torch {m['torch']}, {m['cpus']} CPUs; {doc['wall_s']:.0f} s in all; "
        f"all checks passed: {doc['ok']}",
        "",
    ]
    a = doc["sections"].get("a_throughput", {})
    lines += [
        "## (a) Training throughput",
        "",
        "| preset | engine | batch | framework | samples/s | MFU | peak GB | vlp / open_clip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in a.get("rows", []):
        res = row.get("result", {})
        for fw, r in res.get("results", {"-": {"error": row.get("error", "skipped")}}).items():
            ratio = res.get("vlp_over_open_clip_samples_per_s") if fw == "vlp" else None
            lines.append(
                f"| {row['preset']} | {row['engine']} | {row['batch']} | {fw} | "
                f"{_f(r.get('samples_per_s'), '{:.1f}')} | {_f(r.get('mfu'), '{:.1%}')} | "
                f"{_f(r.get('peak_memory_gb'), '{:.1f}')} | {_f(ratio, '{:.2f}x')} |"
                + (f" {r['error'][:80]}" if "error" in r else "")
            )
    b = doc["sections"].get("b_losses", {})
    lines += [
        "",
        "## (b) Losses: forward + backward",
        "",
        "| B | D | dtype | loss | impl | time ms | peak GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in b.get("records", []):
        t = "OOM" if r.get("oom") else _f(None if r.get("time_s") is None else 1e3 * r["time_s"], "{:.1f}")
        lines.append(
            f"| {r['batch']} | {r['dim']} | {r['dtype']} | {r['loss']} | {r['impl']} | {t} | "
            f"{_f(r.get('peak_gb'), '{:.2f}')} |"
        )
    c = doc["sections"].get("c_smoke", {})
    lines += [
        "",
        "## (c) Smoke run of every mode",
        "",
        "| mode | ok | first loss | final loss | checkpoints | resume | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in c.get("records", []):
        resume = r.get("resume") or (f"from {r['resumed_from']}" if "resumed_from" in r else "-")
        wall = sum(i.get("wall_s") or 0 for i in r.get("invocations", []))
        detail = r.get("checkpoints") or r.get("checkpoint") or r.get("top1") or r.get("transformers_class")
        lines.append(
            f"| {r['mode']} | {r['ok']} | {_f(r.get('first_loss'))} | {_f(r.get('final_loss'))} | "
            f"{_f(detail)} | {resume} | {wall:.1f} |"
        )
    d = doc["sections"].get("d_speed", {})
    lines += [
        "",
        "## (d) Speed features (vlp, no DeepSpeed)",
        "",
        "| patch dropout : compile | step s | samples/s | speed-up |",
        "|---|---|---|---|",
    ]
    for r in d.get("result", {}).get("sweep", []):
        lines.append(
            f"| {r['setting']} | {r['step_time_s']:.4f} | {r['samples_per_s']:.1f} | {r['speedup_vs_first']:.2f}x |"
        )
    for key, sec in doc["sections"].items():
        if not sec.get("ok"):
            lines.append(f"\n{key}: FAILED {sec.get('error') or sec.get('errors') or ''}"[:600])
    return "\n".join(lines) + "\n"


def write_report(doc: dict, out: Path, suite: Suite) -> None:
    """gpu_suite.json and gpu_suite.md for the sections done so far."""
    doc["wall_s"] = time.perf_counter() - suite.t0
    doc["machine"]["load_avg_end"] = os.getloadavg()
    doc["ok"] = all(s["ok"] for s in doc["sections"].values())
    (out / "gpu_suite.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "gpu_suite.md").write_text(markdown(doc))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-suite", help="folder for gpu_suite.json, gpu_suite.md and the runs")
    ap.add_argument("--dry-run", action="store_true", help="the same code paths on CPU with tiny presets")
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["c", "a", "b", "d"],
        choices=["a", "b", "c", "d"],
        help="sections to run, in this order (default: the smoke runs first)",
    )
    ap.add_argument("--budget-s", type=float, default=None, help="skip sections once past this (default 480; dry 170)")
    ap.add_argument(
        "--smoke-jobs", type=int, default=None, help="smoke runs at a time in (c) (default 8; dry run: 1, in-process)"
    )
    ap.add_argument("--loss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.loss_child:
        print(json.dumps(loss_child(json.loads(args.loss_child))))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite.py: error: no CUDA device; use --dry-run for the CPU version", file=sys.stderr)
        return 2
    if args.dry_run:
        plan, device_name = dry_plan(out), platform.processor() or platform.machine()
    else:
        props = torch.cuda.get_device_properties(0)
        plan, device_name = gpu_plan(props.total_memory / 2**30), props.name
    if args.smoke_jobs is not None:
        if args.smoke_jobs < 1:
            ap.error(f"--smoke-jobs must be >= 1, got {args.smoke_jobs}")
        plan.smoke_jobs = args.smoke_jobs
    suite = Suite(plan, out, args.budget_s or (170.0 if args.dry_run else 480.0))
    doc: dict[str, Any] = {
        "dry_run": args.dry_run,
        "plan": asdict(plan),
        "machine": {
            "host": socket.gethostname(),
            "device": device_name,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg(),
        },
        "sections": {},
    }
    runners = {
        "a": ("a_throughput", lambda: section_throughput(plan, suite)),
        "b": ("b_losses", lambda: section_losses(plan, suite)),
        "c": ("c_smoke", suite.section_smoke),
        "d": ("d_speed", lambda: section_speed(plan, suite)),
    }
    for key in args.sections:
        name, fn = runners[key]
        t0 = time.perf_counter()
        if suite.remaining() <= 1.0:
            doc["sections"][name] = {"ok": False, "error": f"skipped: past the {suite.budget_s:.0f} s budget"}
            continue
        try:
            doc["sections"][name] = fn()
        except Exception:  # noqa: BLE001 - a broken section is reported, the others still run
            doc["sections"][name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
        doc["sections"][name]["wall_s"] = time.perf_counter() - t0
        write_report(doc, out, suite)  # what is done so far survives a run killed at its time limit
        print(
            f"gpu_suite: {name} ok={doc['sections'][name]['ok']} in {doc['sections'][name]['wall_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    write_report(doc, out, suite)
    print(
        f"gpu_suite: {'all checks passed' if doc['ok'] else 'FAILURES'} in {doc['wall_s']:.0f} s; "
        f"{out / 'gpu_suite.json'}, {out / 'gpu_suite.md'}",
        file=sys.stderr,
    )
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
