"""The mains of the command lines: ``scripts/*.py`` and the console scripts ``vlp-pretrain``, ``vlp-eval``,
``vlp-export``, ``vlp-make-shards`` and ``vlp-train-adapter`` (pyproject.toml) run the same functions.

Each ``*_main(argv)`` parses its config (a mistake is a one-line ConfigError before anything heavy is imported),
then imports the library part it drives and calls it. The console-script functions take no argument.
"""

from __future__ import annotations

import json
import sys

from vlp.cli import parse_cli, run_cli, setup_logging


def pretrain_main(argv: list[str]) -> int:
    """Pretrain a dual tower or an SSL objective (``accelerate launch scripts/pretrain.py --loss siglip``)."""
    from vlp.config import PRETRAIN_ALIASES
    from vlp.launch import relaunch_on_cpu_if_requested
    from vlp.objectives import run_config_class
    from vlp.preflight import check_pretrain_inputs

    cfg = parse_cli(run_config_class(), argv, PRETRAIN_ALIASES, prog="pretrain.py")
    check_pretrain_inputs(cfg)  # a wrong objective, preset, shard path or DeepSpeed config fails before torch loads
    relaunch_on_cpu_if_requested(sys.argv[0], argv)
    setup_logging()
    from vlp.train.guards import TrainingDiverged
    from vlp.train.trainer import run_training

    try:
        summary = run_training(cfg)
    except TrainingDiverged as e:
        print(f"pretrain.py: {e}", file=sys.stderr)
        return 3
    if not summary["is_main"]:
        return 0
    tasks = sorted({k.split("/")[1] for k in summary if k.startswith("zeroshot/") and k.endswith("/top1")})
    if tasks:
        n = summary.get("zeroshot/num_images", "?")
        print(f"\nHeld-out zero-shot ({n} images), run in {summary['output_dir']}:")
        print(f"  {'family':<10} {'top-1':>7} {'top-5':>7} {'chance':>7}")
        for task in tasks:
            t1, t5, ch = (summary[f"zeroshot/{task}/{m}"] for m in ("top1", "top5", "chance"))
            print(f"  {task:<10} {t1:>7.1%} {t5:>7.1%} {ch:>7.1%}")
    recall = {k: v for k, v in summary.items() if k.startswith("retrieval/") and k.endswith("_R1")}
    for key, value in sorted(recall.items()):
        print(f"  {key.removeprefix('retrieval/').replace('_', ' ')}: {value:.1%}")
    if summary["final_loss"] is not None:
        print(
            f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} up to step {summary['steps']}, "
            f"{summary['samples_per_s']:.0f} samples/s; summary.json in {summary['output_dir']}"
        )
    return 0


def eval_main(argv: list[str]) -> int:
    """Zero-shot classification and retrieval of a vlp run or an open_clip model."""
    from vlp.config import ZEROSHOT_ALIASES, ZeroShotEvalConfig

    cfg = parse_cli(ZeroShotEvalConfig, argv, ZEROSHOT_ALIASES, prog="eval_zeroshot.py")
    setup_logging()
    from vlp.eval.standalone import run_zeroshot_eval

    results = run_zeroshot_eval(cfg)
    if results is None:  # not the main process
        return 0
    for task, m in results["classification"].items():
        print(f"\n{task}: {m['num_images']} images, {m['num_classes']} classes, {m['num_templates']} templates")
        print(
            f"  top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  mean per class {m['mean_per_class']:.2%}  "
            f"chance {m['chance']:.2%}"
        )
    for task, m in results["retrieval"].items():
        print(f"\n{task} retrieval: {m['num_images']} images, {m['num_captions']} captions")
        for d, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            print(f"  {label:<12} " + "  ".join(f"R@{k} {m[f'{d}_R{k}']:.2%}" for k in (1, 5, 10)))
    print(f"\nresults: {results['results_file']}" + (f" (+{len(results['plots'])} plots)" if results["plots"] else ""))
    return 0


def export_main(argv: list[str]) -> int:
    """Export a run to transformers or open_clip, or import a transformers CLIP/SigLIP folder."""
    from vlp.config import ExportConfig

    cfg = parse_cli(ExportConfig, argv, prog="export_hf.py")
    setup_logging()
    from vlp.export.run import run_export

    out = run_export(cfg)
    print(f"wrote {cfg.format} to {out}")
    return 0


def make_shards_main(argv: list[str]) -> int:
    """Write WebDataset shards (+ metadata) from an image folder, a CSV/JSONL file or a Hugging Face dataset."""
    from vlp.config import MakeShardsConfig

    cfg = parse_cli(MakeShardsConfig, argv, prog="make_shards.py")
    setup_logging()
    from data_pipelines.writer import make_shards

    report = make_shards(cfg)
    print(json.dumps(report, indent=1))
    return 0


def train_adapter_main(argv: list[str]) -> int:
    """Train a LLaVA-style projector from a frozen vision tower into a frozen LLM."""
    import adapters.objective  # noqa: F401 - registers the llava-projector objective
    from adapters.config import ADAPTER_ALIASES, AdapterConfig
    from vlp.launch import relaunch_on_cpu_if_requested

    cfg = parse_cli(AdapterConfig, argv, ADAPTER_ALIASES, prog="train_adapter.py")
    relaunch_on_cpu_if_requested(sys.argv[0], argv)
    setup_logging()
    from vlp.train.guards import TrainingDiverged
    from vlp.train.trainer import run_training

    try:
        s = run_training(cfg)
    except TrainingDiverged as e:
        print(f"train_adapter.py: {e}", file=sys.stderr)
        return 3
    if not s["is_main"]:
        return 0
    curve = s.get("eval_caption_loss", [])
    if len(curve) > 1:
        print(
            f"held-out caption loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f} "
            f"({100 * s['eval_loss_drop']:.1f}% lower) after {s['steps']} steps"
        )
    if s["first_loss"] is not None:
        print(f"train loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, {s['train_time_s']:.1f}s")
    print(f"projector: {s['projector_checkpoint']}")
    if "llava_dir" in s:
        print(f"LLaVA folder (LlavaForConditionalGeneration / AutoProcessor): {s['llava_dir']}")
    return 0


def pretrain() -> None:
    """Console script ``vlp-pretrain``."""
    run_cli(pretrain_main)


def evaluate() -> None:
    """Console script ``vlp-eval``."""
    run_cli(eval_main)


def export() -> None:
    """Console script ``vlp-export``."""
    run_cli(export_main)


def make_shards() -> None:
    """Console script ``vlp-make-shards``."""
    run_cli(make_shards_main)


def train_adapter() -> None:
    """Console script ``vlp-train-adapter``."""
    run_cli(train_adapter_main)
