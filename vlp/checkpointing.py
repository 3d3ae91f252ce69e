"""Reading and committing checkpoints and run directories: layout, atomic writes, RNG state, consolidation.

The training engine writes checkpoints through :class:`vlp.train.checkpoint.CheckpointManager`; everything that
only reads them (evaluation, export, the adapter's vision tower, resume) uses this module, which sits below the
engine.

Layout of a run directory::

    config.yaml  metrics.jsonl  summary.json  model.safetensors (consolidated fp32 DualTower, at the end)
    checkpoints/
        latest                 name of the newest complete checkpoint (replaced atomically)
        step-00000010/         one complete checkpoint
            ds/                DeepSpeed's own (ZeRO-sharded) model + optimiser files, or
            objective.pt, optimizer.pt   without DeepSpeed
            rank_00000.pt ...  per process: RNG states and the data-stream position
            trainer_state.pt   step, samples seen, scheduler, guard counters, fp16 scaler, config, all data positions
        .tmp-step-00000020/    a checkpoint being written (or left by a crash; removed by the next save)

A checkpoint is written into ``.tmp-<name>``, fsynced, renamed to ``<name>`` (the commit), and only then is
``latest`` replaced (temp file, fsync, os.replace). A crash at any point leaves ``latest`` naming a complete
checkpoint. Pruning keeps the newest ``keep`` checkpoints and never the one ``latest`` names.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
EXPORT_NAME = "model.safetensors"
_NAME = re.compile(r"^step-(\d{8})(?:\.r(\d+))?$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    # plain containers and tensors only, so checkpoints load with torch.load(weights_only=True)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` so that a crash never leaves a partial file under that name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def saved_pretrain_config(data: dict[str, Any]):
    """The PretrainConfig of a saved run config (config.yaml, a checkpoint's trainer state), without the sections
    that objectives add (``ssl``, ...): what rebuilding and evaluating its DualTower needs."""
    import dataclasses

    from vlp.config import PretrainConfig, from_dict

    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    return from_dict(PretrainConfig, {k: v for k, v in data.items() if k in known})


def run_preset(cfg_model_name: str, run_dir: Path | None, saved: dict[str, Any] | None = None):
    """The preset a trained run is rebuilt with: the one saved in its checkpoint (``saved``), else the run
    directory's preset.yaml, else (runs written before presets were saved) ``configs/models/<model.name>``."""
    from vlp.presets import PRESET_FILE, load_preset, load_run_preset, preset_from_dict

    if saved is not None:
        return preset_from_dict(saved, "checkpoint preset", cfg_model_name)
    if run_dir is not None and (run_dir / PRESET_FILE).is_file():
        return load_run_preset(run_dir / PRESET_FILE)
    log.warning(
        "%s holds no %s (written before runs saved their preset): building today's preset %r",
        run_dir,
        PRESET_FILE,
        cfg_model_name,
    )
    return load_preset(cfg_model_name)


def preset_for_training(cfg, resume_from: Path | None):
    """The preset a run trains: a resumed run's own (from its checkpoint), else ``cfg.model.name``'s."""
    from vlp.presets import load_preset

    if resume_from is None:
        return load_preset(cfg.model.name)
    trainer = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=True)
    return run_preset(cfg.model.name, run_dir_of(resume_from), trainer.get("preset"))


def load_trained_model(path: str | Path, map_location: str = "cpu"):
    """Rebuild a trained DualTower and its PretrainConfig from a run directory, checkpoint directory or file.

    Accepts a run directory (``model.safetensors`` or ``checkpoint.pt`` beside ``config.yaml``, else its latest
    checkpoint), a checkpoint directory (``checkpoints/step-N``, DeepSpeed ZeRO shards are consolidated), a ``.pt``
    checkpoint holding ``model`` and ``config``, or a ``.safetensors`` file with ``config.yaml`` beside it. The
    architecture and preprocessing are the run's own (its checkpoint's preset or ``preset.yaml``), not today's
    configs/models/ file, so a run directory copied anywhere reloads as it was trained.
    """
    from vlp.config import ConfigError, load_yaml
    from vlp.model import build_model

    path = Path(path)
    if path.is_dir() and is_complete(path):  # one checkpoint directory (checkpoints/step-N)
        trainer = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        cfg = saved_pretrain_config(trainer["config"])
        model = build_model(run_preset(cfg.model.name, run_dir_of(path), trainer.get("preset")), cfg.loss)
        load_objective_state(model, consolidated_state_dict(path))
        return model, cfg
    if path.is_dir():
        candidates = [path / EXPORT_NAME, path / "checkpoint.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            latest = read_latest(path / CHECKPOINTS)
            if latest is not None:
                return load_trained_model(latest, map_location)
            raise ConfigError(f"{path}: no {EXPORT_NAME}, checkpoint.pt or checkpoints/latest in this run directory")
        path = found
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    saved_preset = None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=map_location)
        cfg_file = path.with_name("config.yaml")
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: expected config.yaml beside the weights")
        cfg_dict = load_yaml(cfg_file)
    else:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if "model" not in ckpt or "config" not in ckpt:
            raise ConfigError(f"{path}: not a vlp checkpoint (needs 'model' and 'config' entries)")
        state, cfg_dict, saved_preset = ckpt["model"], ckpt["config"], ckpt.get("preset")
    cfg = saved_pretrain_config(cfg_dict)
    model = build_model(run_preset(cfg.model.name, path.parent, saved_preset), cfg.loss)
    model.load_state_dict(state)
    return model, cfg


# --------------------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory entry (directories: so that renames and new entries are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def step_of(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def is_complete(directory: Path) -> bool:
    """A committed checkpoint directory (its trainer state is written last, before the commit)."""
    return directory.is_dir() and step_of(directory.name) is not None and (directory / TRAINER_STATE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if is_complete(d)]
    return sorted(found, key=lambda d: (step_of(d.name), d.stat().st_mtime_ns))


def read_latest(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is no pointer."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not is_complete(target):
        raise FileNotFoundError(f"{pointer} names {target.name}, which is not a complete checkpoint")
    return target


def write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name`` atomically and durably."""
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_path(root)


def resolve_resume(spec: str, run_dir: Path | None) -> Path | None:
    """The checkpoint directory ``--resume`` names: 'latest' of ``run_dir`` (None when it has none yet), a run
    directory (its latest) or a checkpoint directory."""
    from vlp.config import ConfigError

    if spec == "latest":
        if run_dir is None:
            raise ConfigError("--resume latest needs --output-dir (the run directory to continue)")
        try:
            return read_latest(run_dir / CHECKPOINTS)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    path = Path(spec)
    if is_complete(path):
        return path
    if path.is_dir():
        try:
            found = read_latest(path / CHECKPOINTS)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        if found is not None:
            return found
    raise ConfigError(
        f"--resume {spec}: not a checkpoint directory (checkpoints/step-N with {TRAINER_STATE}) or a "
        "run directory with checkpoints/latest"
    )


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint directory belongs to."""
    return checkpoint.parent.parent


# --------------------------------------------------------------------------------------------------------------
# Consolidated export
# --------------------------------------------------------------------------------------------------------------


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained objective from a checkpoint directory (no engine needed).

    DeepSpeed ZeRO checkpoints are merged from their shards with DeepSpeed's zero_to_fp32 (the fp32 master
    weights, also for bf16/fp16 runs); checkpoints written without DeepSpeed hold the state dict as is.
    """
    checkpoint = Path(checkpoint)
    native = checkpoint / "objective.pt"
    if native.is_file():
        return torch.load(native, map_location="cpu", weights_only=True)
    ds_dir = checkpoint / "ds"
    if not ds_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint}: neither objective.pt nor a DeepSpeed 'ds' directory")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if any(ds_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    else:  # ZeRO stage 0: DeepSpeed saved the module's state dict whole
        files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{ds_dir}: no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_objective_state(model, objective_state: dict[str, torch.Tensor]) -> None:
    """Load a DualTower from a checkpointed objective's state: the ``model.*`` entries of the image-text objectives,
    or the ``visual.*`` entries of a standalone SSL objective (which trains the image tower alone: the text tower
    and logit scale/bias keep ``model``'s own values)."""
    if any(k.startswith("model.") for k in objective_state):
        model.load_state_dict(dualtower_state(objective_state))
        return
    visual = {f"clip.visual.{k[len('visual.') :]}": v for k, v in objective_state.items() if k.startswith("visual.")}
    if not visual:
        raise KeyError("the objective's state dict holds no DualTower ('model.*') or image tower ('visual.*')")
    missing, unexpected = model.load_state_dict(visual, strict=False)
    if unexpected or any(k.startswith("clip.visual.") for k in missing):
        raise KeyError(
            f"the image tower's state does not fit the preset (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def dualtower_state(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DualTower's entries (``model.*``) of an objective's state dict, with their own key names."""
    out = {k[len("model.") :]: v for k, v in objective_state.items() if k.startswith("model.")}
    if not out:
        raise KeyError("the objective's state dict has no 'model.' entries (no DualTower to export)")
    return out


def export_model(dualtower: dict[str, torch.Tensor], run_dir: Path) -> Path:
    """Write ``run_dir/model.safetensors`` (fp32, own storage per tensor) atomically; returns its path."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    tensors = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
        for k, v in dualtower.items()
    }
    path = run_dir / EXPORT_NAME
    tmp = run_dir / f".{EXPORT_NAME}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "vlp"})
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(run_dir)
    return path
