"""Evaluation during training: rank-split encoding equals one process, RNG and mode untouched, and
``--eval-every`` in a 2-process run reports what the standalone CLI reports on the final checkpoint."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.eval_fixtures import tiny_model
from vlp.eval.engine import EvalOptions, EvalSet, ZeroShotModel, evaluate, flatten_metrics
from vlp.eval.sources import ImageSource, WebDatasetSource

ROOT = Path(__file__).resolve().parents[1]


class _FirstN(ImageSource):
    """The first ``n`` records of another source (an odd count splits unevenly over ranks)."""

    def __init__(self, inner: ImageSource, n: int) -> None:
        self.inner, self.n, self.name, self.families = inner, n, inner.name, inner.families

    def records(self):
        for i, rec in enumerate(self.inner.records()):
            if i == self.n:
                return
            yield rec


def heldout_set(eval_shards: str, n: int | None = None) -> EvalSet:
    from data_pipelines.synthetic import CLASS_FAMILIES, PROMPT_TEMPLATES

    source = WebDatasetSource(
        eval_shards, {f: f"json:{f}" for f in CLASS_FAMILIES}, CLASS_FAMILIES, caption_key="txt", name="heldout"
    )
    return EvalSet(source if n is None else _FirstN(source, n), PROMPT_TEMPLATES, retrieval="heldout")


def _evaluate_on_ranks(rank: int, world_size: int, eval_shards: str) -> dict | None:
    zs = ZeroShotModel.from_dual_tower(tiny_model("siglip"))
    out = evaluate(zs, [heldout_set(eval_shards, 99)], EvalOptions(batch_size=7))
    return (
        None
        if out.results is None
        else {"flat": flatten_metrics(out.results), "n": out.results["sources"][0]["num_images"]}
    )


def test_two_ranks_with_uneven_split_equal_one_process(synthetic_data):
    results = run_distributed(_evaluate_on_ranks, 2, (synthetic_data.eval_shards,))
    assert results[1] is None and results[0]["n"] == 99  # 50 + 49 images: one rank runs an extra dummy batch
    zs = ZeroShotModel.from_dual_tower(tiny_model("siglip"))
    single = flatten_metrics(
        evaluate(
            zs, [heldout_set(synthetic_data.eval_shards, 99)], EvalOptions(batch_size=7, distributed=False)
        ).results
    )
    two = results[0]["flat"]
    assert set(two) == set(single) and len(single) == 4 * 5 + 6
    for key, value in single.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_evaluation_leaves_rng_streams_and_train_mode_untouched(synthetic_data):
    model = tiny_model("siglip")
    model.train()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    out = evaluate(
        ZeroShotModel.from_dual_tower(model),
        [heldout_set(synthetic_data.eval_shards)],
        EvalOptions(batch_size=50, workers=1),
    )
    assert out.results["classification"]["shape"]["num_images"] == 100
    assert model.training
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def _run_args(tmp_path: Path, out: Path, steps: int, every: int) -> list[str]:
    return [
        "--loss",
        "siglip",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--output-dir",
        str(out),
        "--data.synthetic_dir",
        str(tmp_path / "syn"),
        "--data.synthetic_train_samples",
        "200",
        "--data.synthetic_eval_samples",
        "50",
        "--warmup-steps",
        "1",
        "--eval-every",
        str(every),
        "--eval.batch_size",
        "32",
    ]


@pytest.mark.slow
def test_eval_every_does_not_change_the_training_losses(tmp_path):
    from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
    from vlp.train.metrics import read_metrics
    from vlp.train.trainer import run_pretraining

    records = {}
    for every in (0, 1):
        out = tmp_path / f"every{every}"
        run_pretraining(parse_cli(PretrainConfig, _run_args(tmp_path, out, 3, every), PRETRAIN_ALIASES))
        records[every] = read_metrics(out / "metrics.jsonl")
    losses = {e: [r["loss"] for r in recs if "loss" in r] for e, recs in records.items()}
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    evals = [r for r in records[1] if "retrieval/image_to_text_R1" in r]
    assert [r["step"] for r in evals] == [1, 2, 3] and not any("retrieval/image_to_text_R1" in r for r in records[0])
    assert all(0 <= r["zeroshot/shape/top1"] <= 1 for r in evals)


@pytest.mark.slow
def test_end_of_run_evaluates_a_classification_folder_like_the_cli(tmp_path, synthetic_data):
    """No --eval-every: the end of the run still evaluates every configured set (held-out families, retrieval and
    the user's image folder) with the evaluator eval_zeroshot.py uses, prints the folder's row and records it."""
    from tests.eval_fixtures import write_labelled_copies
    from vlp.config import ZEROSHOT_ALIASES, ZeroShotEvalConfig, parse_cli
    from vlp.eval.standalone import run_zeroshot_eval

    copies = write_labelled_copies(synthetic_data.eval_shards, tmp_path / "labelled")
    out = tmp_path / "run"
    args = _run_args(tmp_path, out, 3, 0)
    i = args.index("--eval-every")
    del args[i : i + 2]  # no periodic evaluation at all
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "pretrain.py"),
        *args,
        "--eval.classification.image_folder",
        str(copies.folder),
        "--eval.classification.name",
        "shapes",
        "--eval.classification.templates",
        "simple",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    row = next(line for line in proc.stdout.splitlines() if line.strip().startswith("shapes "))
    assert f"{summary['zeroshot/shapes/top1']:.1%}" in row and f"{summary['zeroshot/shapes/chance']:.1%}" in row
    common = ["--checkpoint", str(out), "--workers", "0", "--plots", "false"]
    folder = run_zeroshot_eval(
        parse_cli(
            ZeroShotEvalConfig,
            [
                *common,
                "--image-folder",
                str(copies.folder),
                "--task-name",
                "shapes",
                "--templates",
                "simple",
                "--output-dir",
                str(tmp_path / "e1"),
            ],
            ZEROSHOT_ALIASES,
        )
    )["metrics"]
    assert sorted(folder) == [
        f"zeroshot/shapes/{m}" for m in ("chance", "mean_per_class", "sigmoid_true_class_mean", "top1", "top5")
    ]
    run_sets = run_zeroshot_eval(
        parse_cli(ZeroShotEvalConfig, [*common, "--output-dir", str(tmp_path / "e2")], ZEROSHOT_ALIASES)
    )["metrics"]  # everything the run configured
    assert len(run_sets) == 4 * 5 + 6 + 5  # four held-out families, retrieval, and the folder
    for key, value in {**folder, **run_sets}.items():
        assert summary[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # step 0: the first batch's centring figures (SigLIP's default --loss.centre_init both); then no empty record
    assert [r["step"] for r in records] == [0, 1, 2, 3] and "init/image_mean_norm_after" in records[0]
    assert all("loss" in r for r in records[1:])
