"""The installable package: every package listed, the shipped configs carried (once) as package data, console
scripts, py.typed, a wheel installed elsewhere that trains, evaluates and exports, and the DeepSpeed range guard."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from vlp.config import ConfigError
from vlp.presets import available_presets, configs_dir

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_every_package_and_every_shipped_config_goes_into_the_wheel():
    found = sorted(
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("vlp", "data_pipelines", "adapters")
        for p in (ROOT / top).rglob("__init__.py")
    )
    assert sorted(set(SETUPTOOLS["packages"]) - {"vlp.configs"}) == found
    assert SETUPTOOLS["package-dir"] == {"vlp.configs": "configs"}  # one source of truth: the top-level configs/
    globs = SETUPTOOLS["package-data"]["vlp.configs"]
    shipped = [p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*") if p.is_file()]
    assert len(shipped) >= 20 and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in shipped), shipped
    assert "py.typed" in SETUPTOOLS["package-data"]["vlp"] and (ROOT / "vlp" / "py.typed").is_file()
    assert configs_dir() == ROOT / "configs"  # a checkout reads its own folder


def test_deepspeed_outside_the_tested_range_stops_at_start(monkeypatch):
    import importlib.metadata

    from vlp.preflight import DEEPSPEED_TESTED, check_deepspeed_version
    from vlp.train import engine

    low, high = DEEPSPEED_TESTED
    check_deepspeed_version(low + ".0")
    for version in ("0.18.9", high + ".0", "1.0.0"):
        with pytest.raises(ConfigError) as e:
            check_deepspeed_version(version)
        assert str(e.value) == (
            f"DeepSpeed {version} is installed, but vlp patches DeepSpeed internals tested only "
            f"with deepspeed>={low},<{high}; pip install 'deepspeed>={low},<{high}'"
        )
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "0.14.4" if d == "deepspeed" else real(d))
    monkeypatch.setattr(engine, "_PATCHED", False)
    with pytest.raises(ConfigError, match=r"DeepSpeed 0.14.4 is installed.*deepspeed>=0.19,<0.20"):
        engine.apply_deepspeed_patches()  # before touching any private method
    assert engine._PATCHED is False


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built once per session from a copy of the sources (the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("vlp", "data_pipelines", "adapters", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []  # offline when possible
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = dist.glob("vlp-*.whl")
    return found


@pytest.mark.slow
def test_installed_wheel_trains_evaluates_and_exports_from_another_directory(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in (ROOT / "configs").rglob("*"):  # the package data is the top-level configs/, byte for byte
            if f.is_file():
                assert z.read(f"vlp/configs/{f.relative_to(ROOT / 'configs').as_posix()}") == f.read_bytes()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "vlp/py.typed" in names and "vlp/entrypoints.py" in names
    for script in ("vlp-pretrain", "vlp-eval", "vlp-export", "vlp-make-shards", "vlp-train-adapter"):
        assert f"{script} = vlp.entrypoints:" in entry_points

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def run(*cmd, timeout=600):
        proc = subprocess.run(
            [sys.executable, *cmd], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    where = run(
        "-c",
        "import vlp, vlp.presets as p; print(vlp.__file__); print(p.configs_dir()); "
        "print(','.join(p.available_presets()))",
    ).splitlines()
    assert where[0].startswith(str(target)) and where[1] == str(target / "vlp" / "configs")
    assert where[2] == ",".join(available_presets())
    bin_dir = target / "bin"
    assert "--model.name" in run(str(bin_dir / "vlp-pretrain"), "--help")
    out = run(
        str(bin_dir / "vlp-pretrain"),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--output-dir",
        "run",
        "--data.synthetic_dir",
        "syn",
        "--data.synthetic_train_samples",
        "64",
        "--data.synthetic_eval_samples",
        "32",
        "--warmup-steps",
        "1",
        "--no-eval.retrieval",
    )
    assert "up to step 2" in out
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["model"] == "tiny-resnet-hr" and summary["steps"] == 2
    assert (work / "run" / "preset.yaml").is_file() and (work / "run" / "model.safetensors").is_file()
    run(str(bin_dir / "vlp-eval"), "--checkpoint", "run", "--workers", "0", "--batch-size", "16", "--no-plots")
    results = json.loads((work / "run" / "eval-zeroshot" / "results.json").read_text())
    assert results["classification"]
    # the demo run exports, from the installed package, to a TimmWrapperModel folder that transformers loads in a
    # process without vlp, giving the run's own image embeddings
    run(str(bin_dir / "vlp-export"), "--checkpoint", "run", "--output", "exported", "--format", "hf-vision")
    assert (work / "exported" / "config.json").is_file() and (work / "exported" / "README.md").is_file()
    from tests.hf_fixtures import run_without_vlp
    from vlp.checkpointing import load_trained_model

    model = load_trained_model(work / "run")[0].eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"x": x, "ours": model.encode_image(x, normalize=False)}, tmp_path / "io.pt")
    loaded = run_without_vlp(
        f"import torch, transformers\nfrom safetensors.torch import load_file\nd = {str(work / 'exported')!r}\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "tower = transformers.AutoModel.from_pretrained(d).eval()\n"
        "p = load_file(d + '/image_projection.safetensors')\n"
        "with torch.no_grad():\n"
        "    img = tower(pixel_values=io['x']).pooler_output @ p['weight'].T\n"
        "print(type(tower).__name__, (img - io['ours']).abs().max().item())\n"
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    cls, diff = loaded.stdout.split()[-2:]
    assert cls == "TimmWrapperModel" and float(diff) <= 1e-5
    # open_clip cannot pass the tower's timm.create_model arguments: refused in one line, nothing written
    refused = subprocess.run(
        [sys.executable, str(bin_dir / "vlp-export"), "--checkpoint", "run", "--output", "oc", "--format", "open_clip"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "use --format hf-vision" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (work / "oc").exists()
