"""Zero-shot classification: equality with open_clip's own utilities, the three labelled sources, open_clip
models and vlp checkpoints through the same code, outputs (JSON, plots) and clear errors for user mistakes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.eval_fixtures import CLASSES, tiny_model, write_labelled_copies
from vlp.config import (
    ZEROSHOT_ALIASES,
    ConfigError,
    PretrainConfig,
    ZeroShotDataConfig,
    ZeroShotEvalConfig,
    parse_cli,
    to_dict,
)
from vlp.eval.during_training import labelled_set
from vlp.eval.engine import EvalOptions, ZeroShotModel, evaluate, flatten_metrics
from vlp.eval.zeroshot import classification_metrics, load_classnames, load_templates


@pytest.fixture(scope="module")
def copies(synthetic_data, tmp_path_factory):
    return write_labelled_copies(synthetic_data.eval_shards, tmp_path_factory.mktemp("labelled"))


@pytest.fixture(scope="module")
def model():
    return tiny_model("siglip")


def _run(model, data_cfg: ZeroShotDataConfig, **opts):
    zs = ZeroShotModel.from_dual_tower(model)
    return evaluate(zs, [labelled_set(data_cfg)], EvalOptions(batch_size=128, **opts))


def _open_clip_accuracy(output, target, topk=(1,)):
    """open_clip_train.zero_shot.accuracy with the same arithmetic; only its final ``float(array of shape (1,))``
    conversion, which NumPy 2 rejects (TypeError), is replaced by ``float(tensor)``."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0)) for k in topk]


def test_top1_top5_equal_open_clip_zero_shot_utilities_per_sample(model, copies, monkeypatch):
    import open_clip
    import open_clip_train.zero_shot
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
    from open_clip_train.zero_shot import run as open_clip_run
    from torchvision.datasets import ImageFolder

    from vlp.model import build_tokenizer, build_transforms

    n = len(copies.keys)
    ours = _run(
        model, ZeroShotDataConfig(image_folder=str(copies.folder), templates="simple", name="shapes"), num_examples=n
    ).results["classification"]["shapes"]
    # open_clip's reference: its classifier builder and its zero-shot accuracy loop, on torchvision's ImageFolder
    tokenizer, preprocess = build_tokenizer(model.preset), build_transforms(model.preset, is_train=False)
    dataset = ImageFolder(str(copies.folder), transform=preprocess)
    assert dataset.classes == CLASSES and [s[1] for s in dataset.samples] == copies.labels
    classifier = open_clip.build_zero_shot_classifier(
        model.clip, tokenizer, CLASSES, SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=10, device="cpu"
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)
    args = SimpleNamespace(device="cpu", precision="fp32", batch_size=32)
    monkeypatch.setattr(open_clip_train.zero_shot, "accuracy", _open_clip_accuracy)
    ref_top1, ref_top5 = open_clip_run(model.clip, classifier, loader, args)
    assert ours["num_images"] == n == 100 and ours["num_templates"] == 7
    assert ours["top1"] == pytest.approx(ref_top1, abs=1e-12)
    assert ours["top5"] == pytest.approx(ref_top5, abs=1e-12)
    # ... and to the sample: each image's five best classes, in order
    with torch.no_grad():
        feats = torch.cat([model.clip.encode_image(x, normalize=True) for x, _ in loader])
    ref_rank = (feats @ classifier).topk(5, dim=1).indices.tolist()
    our_rank = [[p["index"] for p in ex["top"]] for ex in sorted(ours["examples"], key=lambda e: e["index"])]
    assert our_rank == ref_rank
    assert ours["top1"] == sum(r[0] == y for r, y in zip(ref_rank, copies.labels)) / n


def test_three_sources_give_identical_results(model, copies):
    base = dict(templates="simple", name="shapes")
    outs = {
        "folder": _run(model, ZeroShotDataConfig(image_folder=str(copies.folder), **base)),
        "wds": _run(
            model,
            ZeroShotDataConfig(
                wds_shards=copies.shards, classnames=str(copies.classnames_file), label_key="cls", **base
            ),
        ),
        "wds_json": _run(
            model,
            ZeroShotDataConfig(
                wds_shards=copies.shards, classnames=str(copies.classnames_file), label_key="json:shape", **base
            ),
        ),
        "hf": _run(model, ZeroShotDataConfig(hf_dataset=str(copies.hf_dir), **base)),
    }
    res = {k: o.results["classification"]["shapes"] for k, o in outs.items()}
    ref = res["folder"]
    assert ref["num_images"] == 100 and sum(map(sum, ref["confusion_matrix"])) == 100
    for name, r in res.items():
        assert r["confusion_matrix"] == ref["confusion_matrix"], name
        assert r["per_class"] == ref["per_class"], name
        for key in ("top1", "top5", "mean_per_class", "num_images"):
            assert r[key] == ref[key], (name, key)
        for key, v in ref["probabilities"].items():
            assert r["probabilities"][key] == pytest.approx(v, rel=1e-6), (name, key)


def test_metrics_by_hand():
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.7, 0.3, 0.1], [0.1, 0.2, 0.6], [0.3, 0.2, 0.1]])
    targets = torch.tensor([0, 1, 1, 2, 2])
    m = classification_metrics(sims, targets, ["a", "b", "c"], logit_scale=10.0, logit_bias=-5.0)
    assert m["top1"] == pytest.approx(3 / 5) and m["top5"] == 1.0  # k clipped to the 3 classes
    assert [c["accuracy"] for c in m["per_class"]] == [1.0, 0.5, 0.5]
    assert m["mean_per_class"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    p_true = torch.sigmoid(10 * sims[torch.arange(5), targets] - 5)
    assert m["probabilities"]["sigmoid_true_class_mean"] == pytest.approx(float(p_true.mean()), rel=1e-6)
    soft = (10 * sims).softmax(1)[torch.arange(5), targets]
    assert m["probabilities"]["softmax_true_class_mean"] == pytest.approx(float(soft.mean()), rel=1e-6)
    clip_m = classification_metrics(sims, targets, ["a", "b", "c"], logit_scale=100.0)
    assert "sigmoid_true_class_mean" not in clip_m["probabilities"]


def test_loaders_builtins_and_files(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert load_classnames("imagenet") == list(IMAGENET_CLASSNAMES) and len(IMAGENET_CLASSNAMES) == 1000
    openai = load_templates("openai")
    assert len(openai) == 80 and openai[0]("dog") == OPENAI_IMAGENET_TEMPLATES[0]("dog")
    (tmp_path / "t.txt").write_text("# prompts\na photo of a {}.\n\nitap of a {}.\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "itap of a {}."]
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["a {} here."]}))
    assert load_templates(str(tmp_path / "t.json")) == ["a {} here."]
    (tmp_path / "c.json").write_text(json.dumps({"n01": "tench", "n02": "goldfish"}))
    assert load_classnames(str(tmp_path / "c.json")) == {"n01": "tench", "n02": "goldfish"}


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing_folder", "missing class folder"),
        ("empty_templates", "the template file is empty"),
        ("template_without_slot", "needs exactly one '{}'"),
        ("folder_count", "class-name count mismatch: 9 class names given but 10 class folders"),
        ("wds_count", "class-name count mismatch: sample"),
        ("hf_count", "class-name count mismatch: 11 class names given but the ClassLabel column"),
        ("no_folder", "image folder not found"),
        ("wds_without_names", "pass --classnames"),
    ],
)
def test_user_mistakes_are_clear_errors(copies, tmp_path, case, fragment):
    names = tmp_path / "names.txt"
    cfg = ZeroShotDataConfig(image_folder=str(copies.folder))
    if case == "missing_folder":
        names.write_text("\n".join([*CLASSES, "pentagon"]))
        cfg = ZeroShotDataConfig(image_folder=str(copies.folder), classnames=str(names))
    elif case == "empty_templates":
        (tmp_path / "t.txt").write_text("\n  \n")
        cfg = ZeroShotDataConfig(image_folder=str(copies.folder), templates=str(tmp_path / "t.txt"))
    elif case == "template_without_slot":
        (tmp_path / "t.txt").write_text("a photo of a {}.\na photo.\n")
        cfg = ZeroShotDataConfig(image_folder=str(copies.folder), templates=str(tmp_path / "t.txt"))
    elif case == "folder_count":
        names.write_text("\n".join(f"class {i}" for i in range(9)))
        cfg = ZeroShotDataConfig(image_folder=str(copies.folder), classnames=str(names))
    elif case == "wds_count":
        names.write_text("\n".join(CLASSES[:5]))
        cfg = ZeroShotDataConfig(wds_shards=copies.shards, classnames=str(names))
    elif case == "hf_count":
        names.write_text("\n".join(f"class {i}" for i in range(11)))
        cfg = ZeroShotDataConfig(hf_dataset=str(copies.hf_dir), classnames=str(names))
    elif case == "no_folder":
        cfg = ZeroShotDataConfig(image_folder=str(tmp_path / "nope"))
    elif case == "wds_without_names":
        cfg = ZeroShotDataConfig(wds_shards=copies.shards)
    with pytest.raises(ConfigError) as err:
        eval_set = labelled_set(cfg)
        list(eval_set.source.records())  # label errors surface while reading
    assert fragment in str(err.value)


def test_cli_error_is_one_line(copies, tmp_path, capsys):
    import importlib.util

    from vlp.cli import run_cli

    spec = importlib.util.spec_from_file_location(
        "eval_zeroshot", Path(__file__).parents[1] / "scripts" / "eval_zeroshot.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = script.main
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as code:
        run_cli(main, ["--open-clip-model", "no-such-model", "--image-folder", str(copies.folder)])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and len(err.splitlines()) == 1 and "unknown open_clip model 'no-such-model'" in err
    with pytest.raises(SystemExit):
        run_cli(main, ["--image-folder", str(copies.folder)])
    assert "give exactly one model" in capsys.readouterr().err


def _save_open_clip_dir(model, root: Path) -> tuple[Path, Path, str]:
    """The tiny tower as an open_clip model: a local-dir folder, and a registered config + weights file."""
    import open_clip
    from safetensors.torch import save_file

    cfg = model.preset.open_clip_config()
    cfg["init_logit_bias"] = -10.0
    pp = model.preset.preprocess
    local = root / "oc_local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": cfg,
                "preprocess_cfg": {
                    "mean": pp["mean"],
                    "std": pp["std"],
                    "interpolation": pp["interpolation"],
                    "resize_mode": pp["resize_mode"],
                },
            }
        )
    )
    state = {k: v.contiguous() for k, v in model.clip.state_dict().items()}
    save_file(state, str(local / "open_clip_model.safetensors"))
    name = "vlp-test-tiny-sig"  # no "siglip" in the name: open_clip would pick its HF SigLIP tokenizer
    (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{name}.json")
    weights = root / "weights.pt"
    torch.save(state, weights)
    return local, weights, name


def test_open_clip_models_and_vlp_checkpoints_give_the_same_results(model, copies, tmp_path):
    from vlp.checkpointing import atomic_save
    from vlp.eval.standalone import run_zeroshot_eval

    run_dir = tmp_path / "run"
    run_cfg = PretrainConfig()
    run_cfg.model.name = model.preset.name  # the fixture's preset, not the default one
    atomic_save({"model": model.state_dict(), "config": to_dict(run_cfg)}, run_dir / "checkpoint.pt")
    export_dir = tmp_path / "export"  # a consolidated export: model.safetensors beside config.yaml
    export_dir.mkdir()
    from safetensors.torch import save_file

    from vlp.config import save_yaml

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export_dir / "model.safetensors"))
    save_yaml(run_cfg, export_dir / "config.yaml")
    local, weights, name = _save_open_clip_dir(model, tmp_path)
    common = [
        "--image-folder",
        str(copies.folder),
        "--templates",
        "simple",
        "--task-name",
        "shapes",
        "--workers",
        "0",
        "--batch-size",
        "50",
        "--plots",
        "false",
    ]
    runs = {
        "run_dir": ["--checkpoint", str(run_dir)],
        "export": ["--checkpoint", str(export_dir)],
        "local_dir": ["--open-clip-model", f"local-dir:{local}"],
        "name_pretrained": ["--open-clip-model", name, "--pretrained", str(weights)],
    }
    res = {}
    for key, argv in runs.items():
        cfg = parse_cli(ZeroShotEvalConfig, argv + common + ["--output-dir", str(tmp_path / key)], ZEROSHOT_ALIASES)
        res[key] = run_zeroshot_eval(cfg)
    ref = res["run_dir"]["classification"]["shapes"]
    assert res["run_dir"]["model"]["logit_bias"] == pytest.approx(-10.0)
    for key, r in res.items():
        m = r["classification"]["shapes"]
        assert m["confusion_matrix"] == ref["confusion_matrix"] and m["top1"] == ref["top1"], key
        assert m["top5"] == ref["top5"] and m["num_images"] == 100, key
        assert m["probabilities"]["sigmoid_true_class_mean"] == pytest.approx(
            ref["probabilities"]["sigmoid_true_class_mean"], rel=1e-5
        ), key
        assert json.loads((tmp_path / key / "results.json").read_text())["metrics"] == r["metrics"]
    assert res["name_pretrained"]["model"]["type"] == "open_clip"


def test_results_json_and_plots(model, copies, tmp_path):
    from vlp.eval.plots import write_plots

    out = _run(
        model, ZeroShotDataConfig(image_folder=str(copies.folder), templates="simple", name="shapes"), num_examples=8
    )
    m = out.results["classification"]["shapes"]
    assert len(m["examples"]) == 8 and all(len(e["top"]) == 5 for e in m["examples"])
    assert all("sigmoid" in p and 0 < p["softmax"] < 1 for e in m["examples"] for p in e["top"])
    assert sorted(out.example_images["shapes"]) == list(range(8))
    img = out.example_images["shapes"][0]
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    files = write_plots(out.results, out.example_images, tmp_path)
    assert [f.name for f in files] == ["shapes_confusion.png", "shapes_per_class.png", "shapes_examples.png"]
    from PIL import Image

    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    flat = flatten_metrics(out.results)
    assert flat["zeroshot/shapes/top1"] == m["top1"] and flat["zeroshot/shapes/chance"] == pytest.approx(0.1)
    assert sum(c["support"] for c in m["per_class"]) == 100
