"""Zero-shot classification and retrieval of a vlp run or an open_clip model.

    python scripts/eval_zeroshot.py --checkpoint runs/RUN                      # the run's held-out data
    python scripts/eval_zeroshot.py --checkpoint runs/RUN --image-folder DIR --templates openai
    python scripts/eval_zeroshot.py --open-clip-model ViT-B-32 --pretrained weights.pt --hf-dataset DIR
"""

from __future__ import annotations

from vlp.cli import run_cli, setup_logging
from vlp.config import ZEROSHOT_ALIASES, ZeroShotEvalConfig, parse_cli


def main(argv: list[str]) -> int:
    cfg = parse_cli(ZeroShotEvalConfig, argv, ZEROSHOT_ALIASES, prog="eval_zeroshot.py")
    setup_logging()
    from vlp.eval.standalone import run_zeroshot_eval

    results = run_zeroshot_eval(cfg)
    if results is None:  # not the main process
        return 0
    for task, m in results["classification"].items():
        print(f"\n{task}: {m['num_images']} images, {m['num_classes']} classes, {m['num_templates']} templates")
        print(f"  top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  mean per class {m['mean_per_class']:.2%}  "
              f"chance {m['chance']:.2%}")
    for task, m in results["retrieval"].items():
        print(f"\n{task} retrieval: {m['num_images']} images, {m['num_captions']} captions")
        for d, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            print(f"  {label:<12} " + "  ".join(f"R@{k} {m[f'{d}_R{k}']:.2%}" for k in (1, 5, 10)))
    print(f"\nresults: {results['results_file']}" + (f" (+{len(results['plots'])} plots)" if results["plots"] else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
