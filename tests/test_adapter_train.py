"""Adapter training: frozen parts stay bit-identical, the projector learns, and 2-process ZeRO-2 == 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.config import ADAPTER_ALIASES, AdapterConfig
from adapters.export import load_projector_state
from adapters.llm import ensure_tiny_llm
from adapters.objective import build, build_adapter
from adapters.projector import build_projector
from tests.helpers import losses_after_last_resume
from vlp.config import from_dict, parse_cli
from vlp.distributed import world_info
from vlp.train.optim import warmup_cosine
from vlp.train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llm():
    """The embedded default LLM, built once per machine in the vlp cache (as a user's first run would)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ensure_tiny_llm()
    finally:
        torch.set_num_threads(n)


def _cfg(synthetic_data, tiny_llm, out: Path, **train) -> AdapterConfig:
    return from_dict(
        AdapterConfig,
        {
            "llm": {"path": str(tiny_llm)},
            "data": {
                "train_shards": synthetic_data.train_shards,
                "eval_shards": synthetic_data.eval_shards,
                "eval_samples": 64,
                "workers": 0,
                "shuffle_buffer": 200,
            },
            "train": {"steps": 50, "batch_size": 16, "eval_every": 0, "log_every": 0, **train},
            "output_dir": str(out),
        },
    )


def test_projector_learns_while_tower_and_llm_stay_bit_identical(tmp_path, synthetic_data, tiny_llm):
    cfg = _cfg(synthetic_data, tiny_llm, tmp_path / "run")
    parts = build_adapter(cfg)
    before = {
        name: {k: v.clone() for k, v in module.state_dict().items()}
        for name, module in (("tower", parts.tower), ("llm", parts.llm.model), ("proj", parts.model.projector))
    }
    summary = run_training(cfg, build(cfg, world_info(), parts))

    for name, module in (("tower", parts.tower), ("llm", parts.llm.model)):
        after = module.state_dict()
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), f"{name} changed"
    changed = [not torch.equal(parts.model.projector.state_dict()[k], v) for k, v in before["proj"].items()]
    assert all(changed)
    saved, meta = load_projector_state(tmp_path / "run")
    assert sorted(saved) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # the projector only
    assert all(torch.equal(saved[k], v) for k, v in parts.model.projector.state_dict().items())
    assert meta["projector_type"] == "mlp2x_gelu" and meta["step"] == 50 and meta["num_image_tokens"] == 64
    assert meta["vision_feature_layer"] == -2 and meta["vision_feature_select_strategy"] == "default"

    curve = summary["eval_caption_loss"]
    assert [s for s, _ in curve] == [0, 50]
    first, last = curve[0][1], curve[-1][1]
    print(
        f"held-out caption loss {first:.4f} -> {last:.4f} ({100 * (1 - last / first):.1f}% lower); "
        f"LLM without image {summary['eval_text_only_caption_loss']:.4f}"
    )
    assert last <= 0.7 * first
    # export only: 0 steps from the trained projector gives the same held-out loss and a LLaVA folder holding it
    from transformers import LlavaForConditionalGeneration

    again = _cfg(synthetic_data, tiny_llm, tmp_path / "export", steps=0)
    again.projector.init = str(tmp_path / "run")
    again.export.format = "llava"
    s0 = run_training(again)
    assert s0["eval_caption_loss"][0][1] == pytest.approx(last, abs=1e-6) and s0["first_loss"] is None
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export" / "llava")
    assert torch.equal(llava.model.multi_modal_projector.linear_2.weight, saved["2.weight"])

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]  # stage-1 schedule: 3% warmup (2 of 50 steps), then cosine
    assert lrs == pytest.approx([1e-3 * warmup_cosine(s, 2, 50) for s in range(50)], rel=1e-9)
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] < 2e-6


# ---------------------------------------------------------------------------------------------------------------
# The adapter on the one engine: SIGKILL + --resume latest, 1 process and 2 processes under ZeRO-2
# ---------------------------------------------------------------------------------------------------------------


def _adapter_launch(args: list[str], processes: int, faults: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLP_FAULTS", None)
    if faults:
        env["VLP_FAULTS"] = faults
    if processes == 1:
        cmd = [sys.executable, "scripts/train_adapter.py", *args]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [
            accelerate,
            "launch",
            "--config_file",
            "configs/accelerate/zero2.yaml",
            "--num_processes",
            str(processes),
            "--mixed_precision",
            "no",
            "scripts/train_adapter.py",
            *args,
        ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _resumed_after_sigkill(args: list[str], run: Path, processes: int, ref: dict[int, float], ref_dir: Path) -> None:
    """Kill the run at step 6 (checkpoints every 4), resume it with --resume latest, and compare steps 5-8 and
    the projector with the uninterrupted run ``ref_dir``."""
    from vlp.checkpointing import read_latest

    killed = _adapter_launch([*args, "--output-dir", str(run)], processes, faults="sigkill@6")
    assert killed.returncode != 0 and read_latest(run / "checkpoints").name == "step-00000004"
    assert max(losses_after_last_resume(run)) == 6
    resumed = _adapter_launch([*args, "--output-dir", str(run), "--resume", "latest"], processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = losses_after_last_resume(run)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    rel = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in range(5, 9))
    a, _ = load_projector_state(ref_dir)
    b, _ = load_projector_state(run)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    # the summary covers the whole run: the held-out curve from step 0, kept in the checkpoints
    ref_summary = json.loads((ref_dir / "summary.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert [s for s, _ in summary["eval_caption_loss"]] == [0, 8]
    got_curve, ref_curve = (
        [v for _, v in summary["eval_caption_loss"]],
        [v for _, v in ref_summary["eval_caption_loss"]],
    )
    assert got_curve == pytest.approx(ref_curve, rel=1e-6)
    assert summary["eval_text_only_caption_loss"] == pytest.approx(ref_summary["eval_text_only_caption_loss"])
    print(
        f"{processes} process(es): resumed steps 5-8 vs uninterrupted: max relative loss difference {rel:.2e}, "
        f"projector max |diff| {diff:.2e}"
    )
    assert rel <= 1e-6 and diff <= 1e-6


@pytest.mark.slow
def test_adapter_one_process_two_processes_zero2_and_sigkill_resume(tmp_path, synthetic_data, tiny_llm):
    """On the same global batch (train.global_stream), 8 steps: one process (in this process, plain AdamW) and two
    processes under ZeRO-2 train the same projector (<= 1e-6) and leave tower and LLM bit-identical; each, killed
    at step 6 and resumed with --resume latest, continues exactly like its uninterrupted run."""
    args = [
        "--llm",
        str(tiny_llm),
        "--steps",
        "8",
        "--workers",
        "0",
        "--train.global_stream",
        "true",
        "--train-shards",
        synthetic_data.train_shards,
        "--eval-shards",
        synthetic_data.eval_shards,
        "--data.eval_samples",
        "16",
        "--data.shuffle_buffer",
        "100",
        "--train.log_every",
        "0",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "0",
    ]
    one_args, two_args = [*args, "--batch-size", "8"], [*args, "--batch-size", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(parse_cli(AdapterConfig, [*one_args, "--output-dir", str(one)], ADAPTER_ALIASES))
    done = _adapter_launch([*two_args, "--format", "llava", "--output-dir", str(two)], 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DeepSpeed ZeRO stage 2, micro batch 4 x 1 accumulation x 2 processes" in done.stderr

    a, _ = load_projector_state(one)
    b, _ = load_projector_state(two)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    torch.manual_seed(0)  # build_adapter's projector initialisation for seed 0
    init = build_projector("mlp2x_gelu", 128, 64).state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    print(f"projector max |1 process - 2 processes ZeRO-2| after 8 steps: {diff:.3g} (moved {moved:.3g} from init)")
    assert diff <= 1e-6 and moved > 1e-3
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s1["world_size"] == 1 and s2["world_size"] == 2 and s1["global_batch"] == s2["global_batch"] == 8
    # what trained: plain AdamW in one process; a DeepSpeed engine with ZeRO-2's partitioned optimizer in two,
    # rank 0 holding about half of the fp32 master weights
    numel = sum(v.numel() for v in a.values())
    e1, e2 = s1["engine_info"], s2["engine_info"]
    print(f"engines: {e1} / {e2} (projector {numel} parameters)")
    assert (e1["kind"], e1["model"], e1["optimizer"]) == ("single", "AdapterObjective", "AdamW")
    assert e2["model"] == "DeepSpeedEngine" and e2["zero_stage"] == 2
    assert e2["optimizer"] == "DeepSpeedZeroOptimizer"
    assert numel // 2 <= e2["fp32_partition_numel"] < numel
    assert s1["final_loss"] == pytest.approx(s2["final_loss"], rel=1e-6)
    assert s1["eval_caption_loss"][-1][1] == pytest.approx(s2["eval_caption_loss"][-1][1], abs=1e-5)
    # the 2-process run also exported a LLaVA folder holding the trained projector
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from adapters.export import hf_vision_tower
    from adapters.vision import load_vision_tower

    llava = LlavaForConditionalGeneration.from_pretrained(two / "llava")
    assert llava.config.vision_feature_layer == -2 and llava.config.vision_feature_select_strategy == "default"
    proj = llava.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, b["0.weight"]) and torch.equal(proj.linear_2.weight, b["2.weight"])
    # and the frozen parts left the ZeRO-2 run bit-identical: the LLM as loaded, the tower as built for seed 0
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    ref_lm = llm.model.state_dict()
    got_lm = llava.model.language_model.state_dict()
    assert got_lm.keys() == ref_lm.keys() and all(torch.equal(got_lm[k], v) for k, v in ref_lm.items())
    assert torch.equal(llava.lm_head.weight, llm.lm_head.weight)
    ref_tower = hf_vision_tower(load_vision_tower(None, "tiny", seed=0))[0].state_dict()
    got_tower = llava.model.vision_tower.state_dict()
    assert got_tower.keys() == ref_tower.keys() and all(torch.equal(got_tower[k], v) for k, v in ref_tower.items())

    # checkpoints hold the projector and its optimiser only: no frozen tower or LLM is rewritten at every save
    from vlp.checkpointing import read_latest

    state = torch.load(read_latest(one / "checkpoints") / "objective.pt", weights_only=True)
    assert sorted(state) == [
        "model.projector.0.bias",
        "model.projector.0.weight",
        "model.projector.2.bias",
        "model.projector.2.weight",
    ]
    # SIGKILL at step 6 + --resume latest, in 1 process and in 2 processes under ZeRO-2
    _resumed_after_sigkill(one_args, tmp_path / "crash1", 1, losses_after_last_resume(one), one)
    _resumed_after_sigkill(two_args, tmp_path / "crash2", 2, losses_after_last_resume(two), two)
