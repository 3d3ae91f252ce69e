"""A run reloads as it was trained: its preset (architecture and preprocessing) is saved in the run directory and
in every checkpoint, and every loader uses that copy instead of today's preset file."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from vlp.checkpointing import TRAINER_STATE, load_trained_model, preset_for_training, read_latest
from vlp.config import PRETRAIN_ALIASES, PretrainConfig, parse_cli
from vlp.presets import PRESET_FILE, configs_dir, load_preset, load_run_preset, save_run_preset


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two steps of the tiny preset, given as a path to a copy of its YAML file (which the tests then edit)."""
    from vlp.train.trainer import run_pretraining

    root = tmp_path_factory.mktemp("preset_run")
    preset_file = root / "my-tiny.yaml"
    shutil.copy(configs_dir() / "models" / "tiny.yaml", preset_file)
    out = root / "run"
    cfg = parse_cli(
        PretrainConfig,
        [
            "--model",
            str(preset_file),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--output-dir",
            str(out),
            "--data.synthetic_dir",
            str(root / "syn"),
            "--data.synthetic_train_samples",
            "64",
            "--data.synthetic_eval_samples",
            "16",
            "--warmup-steps",
            "1",
            "--no-eval.zeroshot",
            "--no-eval.retrieval",
            "--report-to",
            "none",
        ],
        PRETRAIN_ALIASES,
    )
    run_pretraining(cfg)
    return out, preset_file


def outputs(model):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, model.preset.image_size, model.preset.image_size, generator=g)
    tokens = torch.randint(0, 400, (2, model.preset.context_length), generator=g)
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_run_and_checkpoint_hold_the_resolved_preset(trained_run):
    out, preset_file = trained_run
    saved = load_run_preset(out)
    assert saved == load_preset(str(preset_file)) and saved.name == "my-tiny"
    assert yaml.safe_load((out / PRESET_FILE).read_text())["vision_cfg"]["width"] == 128
    checkpoint = read_latest(out / "checkpoints")
    trainer = torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)
    assert trainer["preset"]["vision_cfg"] == saved.vision_cfg and trainer["preset"]["preprocess"] == saved.preprocess


def test_editing_the_preset_file_after_training_changes_nothing(trained_run, tmp_path):
    out, preset_file = trained_run
    before = outputs(load_trained_model(out)[0])
    checkpoint = read_latest(out / "checkpoints")
    before_ckpt = outputs(load_trained_model(checkpoint)[0])
    original = preset_file.read_text()
    try:
        edited = yaml.safe_load(original)
        edited["embed_dim"], edited["vision_cfg"]["width"] = 64, 96
        edited["preprocess"]["mean"] = [0.5, 0.5, 0.5]
        preset_file.write_text(yaml.safe_dump(edited))
        model, cfg = load_trained_model(out)
        assert model.preset.embed_dim == 128 and model.preset.vision_cfg["width"] == 128
        assert model.preset.preprocess["mean"][0] == pytest.approx(0.48145466)
        assert same(outputs(model), before)  # bit-identical
        assert same(outputs(load_trained_model(checkpoint)[0]), before_ckpt)
        resumed = preset_for_training(cfg, checkpoint)  # --resume keeps the run's own preset too
        assert resumed.embed_dim == 128 and load_preset(str(preset_file)).embed_dim == 64
    finally:
        preset_file.write_text(original)


def test_a_copied_run_loads_without_configs(trained_run, tmp_path, monkeypatch):
    out, preset_file = trained_run
    reference = outputs(load_trained_model(out)[0])
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(out, copy)
    empty = tmp_path / "no-configs"
    (empty / "models").mkdir(parents=True)
    monkeypatch.setenv("VLP_CONFIG_DIR", str(empty))  # no configs/ at all ...
    moved = preset_file.rename(tmp_path / "moved.yaml")  # ... and the preset path the run was started with is gone
    try:
        assert same(outputs(load_trained_model(copy)[0]), reference)
        checkpoint = read_latest(copy / "checkpoints")
        (copy / PRESET_FILE).unlink()  # a checkpoint alone still knows its preset (trainer state)
        assert same(outputs(load_trained_model(checkpoint)[0]), reference)
    finally:
        moved.rename(preset_file)


def test_pretrained_and_adapter_tower_use_the_run_preset(trained_run, tmp_path):
    from adapters.vision import load_vision_tower
    from vlp.model import build_model
    from vlp.objectives.base import load_pretrained_weights

    out, _ = trained_run
    reference = outputs(load_trained_model(out)[0])
    model = build_model(load_preset(str(out / PRESET_FILE)))  # --model RUN/preset.yaml --model.pretrained RUN
    load_pretrained_weights(model, str(out))
    assert same(outputs(model), reference)
    tower = load_vision_tower(str(out))
    assert tower.source["preset"] == "my-tiny"


def test_save_and_load_run_preset_round_trip(tmp_path):
    preset = load_preset("tiny-resnet-hr")
    path = save_run_preset(preset, tmp_path)
    assert path == tmp_path / PRESET_FILE and load_run_preset(tmp_path) == preset
    assert load_preset(str(path)) == preset  # a run's preset.yaml also works as --model PATH


def test_resume_after_editing_the_preset_continues_the_run_as_trained(trained_run, tmp_path):
    from tests.helpers import reset_accelerate
    from vlp.train.trainer import run_pretraining

    out, preset_file = trained_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    original = preset_file.read_text()
    try:
        edited = yaml.safe_load(original)
        edited["embed_dim"] = 64
        preset_file.write_text(yaml.safe_dump(edited))
        reset_accelerate()
        cfg = parse_cli(
            PretrainConfig,
            ["--config", str(run / "config.yaml"), "--resume", "latest", "--output-dir", str(run), "--steps", "3"],
            PRETRAIN_ALIASES,
        )
        summary = run_pretraining(cfg)
        assert summary["steps"] == 3 and read_latest(run / "checkpoints").name.endswith("03")
        assert load_trained_model(run)[0].preset.embed_dim == 128 and load_run_preset(run).embed_dim == 128
    finally:
        preset_file.write_text(original)
