"""The generated command lines: help from the dataclasses' docstrings, switches, aliases, --config round trips,
one-line errors before torch, classes made at run time, and scripts = console scripts."""

from __future__ import annotations

import dataclasses
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_type_hints

import pytest

from adapters.config import ADAPTER_ALIASES, AdapterConfig
from vlp import entrypoints
from vlp.cli import field_help, parse_cli
from vlp.config import (
    PRETRAIN_ALIASES,
    ZEROSHOT_ALIASES,
    ConfigError,
    ExportConfig,
    MakeShardsConfig,
    PretrainConfig,
    ZeroShotEvalConfig,
    from_dict,
    save_yaml,
    to_dict,
)
from vlp.objectives import run_config_class

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {  # script -> (config class, aliases, entry point main, console function)
    "pretrain.py": (run_config_class(), PRETRAIN_ALIASES, entrypoints.pretrain_main, entrypoints.pretrain),
    "eval_zeroshot.py": (ZeroShotEvalConfig, ZEROSHOT_ALIASES, entrypoints.eval_main, entrypoints.evaluate),
    "export_hf.py": (ExportConfig, {}, entrypoints.export_main, entrypoints.export),
    "make_shards.py": (MakeShardsConfig, {}, entrypoints.make_shards_main, entrypoints.make_shards),
    "train_adapter.py": (AdapterConfig, ADAPTER_ALIASES, entrypoints.train_adapter_main, entrypoints.train_adapter),
}


def parse(argv):
    return parse_cli(run_config_class(), argv, PRETRAIN_ALIASES)


def help_text(cls, aliases, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "120")  # one column of groups (wider terminals get several)
    with pytest.raises(SystemExit) as e:
        parse_cli(cls, ["--help"], aliases, prog="x")
    assert e.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    return " ".join(re.sub(r"[╭╮╰╯│─]", " ", text).split())


def leaf_fields(cls, prefix=""):
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield cls, f, f"{prefix}{f.name}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_field_docstring_is_in_help_with_its_default(script, monkeypatch, capsys):
    cls, aliases, _, _ = SCRIPTS[script]
    text = flat(help_text(cls, aliases, monkeypatch, capsys))
    leaves = list(leaf_fields(cls))
    documented = 0
    for owner, f, dotted in leaves:
        flag = "--" + dotted.replace("_", "-")
        assert flag in text, flag
        doc = field_help(owner, f)
        if doc:
            documented += 1
            assert " ".join(doc.split()) in text, dotted
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, (int, float, str)) and not isinstance(default, bool) and "\n" not in str(default):
            assert f"(default: {default})" in text or f"(default: {default!r})" in text, dotted
    assert documented >= len(leaves) // 3  # most fields carry a docstring
    for alias in aliases:
        assert f"--{alias}" in text


def test_help_shows_choices_switches_and_sections(monkeypatch, capsys):
    text = flat(help_text(run_config_class(), PRETRAIN_ALIASES, monkeypatch, capsys))
    assert "--loss STR, --loss.name STR Image-text loss: clip (softmax) or siglip (sigmoid)" in text
    assert "--lock-image, --no-lock-image, --model.lock-image, --model.no-lock-image" in text
    assert "--eval.zeroshot, --eval.no-zeroshot" in text
    for section in (
        "model",
        "loss",
        "data",
        "optim",
        "train",
        "checkpoint",
        "eval",
        "eval.classification",
        "ssl.simclr",
        "ssl.moco",
    ):
        assert f" {section} options " in text
    assert "Which tower preset to build and how." in text  # a section's class docstring heads its group
    assert text.count("--train.batch-size") == 1  # each flag once (the hand-written parser listed many twice)


def test_switches_and_older_spellings():
    cfg = parse(["--lock-image", "--no-eval.zeroshot", "--model.no-grad-checkpointing"])  # --no-a.b = --a.no-b
    assert cfg.model.lock_image is True and cfg.eval.zeroshot is False and cfg.model.grad_checkpointing is False
    assert parse(["--no-lock-image"]).model.lock_image is False
    old = parse(["--lock-image", "true", "--eval.zeroshot", "false", "--checkpoint.export=false"])
    assert (old.model.lock_image, old.eval.zeroshot, old.checkpoint.export) == (True, False, False)
    cfg = parse(
        [
            "--data.train_num_samples",
            "null",
            "--data.source-weights",
            "2",
            "1",
            "--ssl.views.crop_scale",
            "[0.2, 1.0]",
            "--optim.fused",
            "false",
            "--ssl.moco.version",
            "2",
            "--loss.init_logit_bias=-0.5",
        ]
    )
    assert cfg.data.train_num_samples is None and cfg.data.source_weights == [2.0, 1.0]
    assert cfg.ssl.views.crop_scale == [0.2, 1.0] and cfg.optim.fused is False and cfg.ssl.moco.version == 2
    assert cfg.loss.init_logit_bias == -0.5


def test_config_files_repeatable_later_wins_then_flags(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("loss: {name: clip, chunk_size: 64}\ntrain: {batch_size: 8, steps: 5}\n")
    b.write_text("train: {steps: 9}\nmodel: {lock_image: true}\n")
    cfg = parse(["--config", str(a), "--steps", "11", "--config", str(b), "--no-lock-image"])
    assert (cfg.loss.name, cfg.loss.chunk_size, cfg.train.batch_size) == ("clip", 64, 8)
    assert cfg.train.steps == 11 and cfg.model.lock_image is False  # flags beat every file
    assert parse(["--config", str(a), "--config", str(b)]).train.steps == 9  # later file wins


def test_shipped_configs_are_found_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert parse(["--config", "configs/ssl/simclr-tiny.yaml"]).objective == "simclr"
    assert parse(["--config", "ssl/simclr-tiny.yaml"]).objective == "simclr"


def test_saved_config_reloads_identical(tmp_path):
    cfg = parse(
        [
            "--loss",
            "clip",
            "--lr",
            "3e-4",
            "--lock-image",
            "--data.source_weights",
            "1",
            "3",
            "--ssl.moco.version",
            "2",
            "--ssl.moco.momentum",
            "0.9",
            "--eval.classification.image_folder",
            "/x",
            "--optim.grad-clip",
            "None",
            "--train.report_to",
            "none",
            "--output-dir",
            "0001",
        ]
    )
    save_yaml(cfg, tmp_path / "config.yaml")
    again = parse(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert again.output_dir == "0001" and again.optim.grad_clip is None  # strings stay strings; null stays null
    assert parse(["--config", str(tmp_path / "config.yaml"), "--steps", "4"]).train.steps == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lok-image"], "unrecognised argument --lok-image; did you mean --lock-image?"),
        (["--train.stpes", "3"], "did you mean --train.steps?"),
        (["--steps", "abc"], "train.steps: expected an integer, got 'abc'"),
        (["--loss", "softmax"], "loss.name: invalid value 'softmax'; valid: clip, siglip"),
        (["--ssl.moco.version", "4"], "ssl.moco.version: invalid value 4; valid: 2, 3"),
        (["--lr", "fast"], "optim.lr: expected a number, got 'fast'"),
        (["--optim.fused", "maybe"], "optim.fused: expected true or false, got 'maybe'"),
        (["--lock-image", "maybe"], "model.lock_image: expected true or false, got 'maybe'"),
        (["--steps"], "--steps needs a value (INT)"),
        (["--steps", "3", "4"], "unexpected argument '4': --steps takes one value"),
        (["siglip"], "unexpected argument 'siglip'"),
        (["--steps", "0"], "train.steps must be >= 1, got 0"),
        (["--report-to", "tensorbord"], "unknown tracker 'tensorbord'; valid: none, tensorboard, wandb"),
        (["--config"], "--config needs a YAML file"),
    ],
)
def test_mistakes_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_errors_exit_2_in_one_line_without_importing_torch(tmp_path):
    """As a user meets them: the script's process, stderr, exit status, and no torch (nor numpy) imported."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['pretrain.py', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_path('scripts/pretrain.py', run_name='__main__')\n"
        "finally:\n"
        "    print('heavy:', sorted(m for m in ('torch', 'numpy', 'open_clip', 'transformers') if m in sys.modules))\n"
    )
    for argv, fragment in (
        (["--lok-image"], "did you mean --lock-image?"),
        (["--steps", "x"], "train.steps: expected an integer, got 'x'"),
        (["--model", "nope"], "unknown model preset 'nope'"),
        (["--steps", "0"], "train.steps must be >= 1"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pretrain.py: error: ") and fragment in lines[0]
        assert "heavy: []" in proc.stdout


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_imports_no_torch(script):
    code = (
        f"import sys, runpy\nsys.argv = ['{script}', '--help']\n"
        f"try:\n    runpy.run_path('scripts/{script}', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nprint('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("False") and "usage:" in proc.stdout


def test_runtime_made_config_classes(tmp_path, monkeypatch, capsys):
    """Objectives register their config sections at import time: a PretrainConfig made with make_dataclass, with
    section classes defined elsewhere (here: at run time too), parses, validates, helps and round-trips."""
    toy = dataclasses.make_dataclass(
        "ToyObjectiveConfig",
        [
            ("temperature", float, dataclasses.field(default=0.5, metadata={"help": "Toy softmax temperature."})),
            ("mode", Literal["a", "b"], dataclasses.field(default="a")),
            ("use_queue", bool, dataclasses.field(default=False)),
        ],
    )
    run_cls = dataclasses.make_dataclass(
        "PretrainConfig", [("toy", toy, dataclasses.field(default_factory=toy))], bases=(PretrainConfig,)
    )
    cfg = parse_cli(run_cls, ["--toy.temperature", "0.25", "--toy.use-queue", "--loss", "clip"], PRETRAIN_ALIASES)
    assert type(cfg) is run_cls and type(cfg.toy) is toy
    assert (cfg.toy.temperature, cfg.toy.mode, cfg.toy.use_queue, cfg.loss.name) == (0.25, "a", True, "clip")
    with pytest.raises(ConfigError, match=r"toy.mode: invalid value 'c'; valid: a, b"):
        parse_cli(run_cls, ["--toy.mode", "c"], PRETRAIN_ALIASES)
    with pytest.raises(ConfigError, match=r"did you mean --toy.temperature\?"):
        parse_cli(run_cls, ["--toy.temprature", "1"], PRETRAIN_ALIASES)
    save_yaml(cfg, tmp_path / "config.yaml")
    assert parse_cli(run_cls, ["--config", str(tmp_path / "config.yaml")], PRETRAIN_ALIASES) == cfg
    assert from_dict(run_cls, to_dict(cfg)) == cfg
    text = flat(help_text(run_cls, PRETRAIN_ALIASES, monkeypatch, capsys))
    assert "--toy.temperature FLOAT Toy softmax temperature. (default: 0.5)" in text
    assert "--toy.use-queue, --toy.no-use-queue" in text
    assert "Weight of the auxiliary SSL term in the total loss." in text  # inherited fields keep their docstrings
    assert text.startswith("usage: x [-h] [OPTIONS] Pretrain a CLIP/SigLIP dual tower")  # and the base's description


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_scripts_and_console_scripts_run_the_same_main(script, monkeypatch):
    cls, aliases, main, console = SCRIPTS[script]
    module = runpy.run_path(str(ROOT / "scripts" / script), run_name="not_main")
    assert module["main"] is main
    called = []
    monkeypatch.setattr(entrypoints, "run_cli", lambda fn: called.append(fn))
    console()
    assert called == [main]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'= "vlp.entrypoints:{console.__name__}"' in pyproject


def test_an_error_only_tyro_finds_is_still_one_line():
    """Past the checks above, tyro's own multi-line panel is folded into one ConfigError line."""
    from vlp.cli import _leaves, _run_tyro, _skeleton

    root = _skeleton(run_config_class(), {})
    assert len(_leaves(root)) > 100
    with pytest.raises(ConfigError) as e:
        _run_tyro(PretrainConfig, root, ["--bogus"], PRETRAIN_ALIASES, [], "x", None)
    assert "--bogus" in str(e.value) and "\n" not in str(e.value) and "│" not in str(e.value)
