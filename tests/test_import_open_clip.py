"""Import of open_clip checkpoints (a local-dir folder, or a weights file with its model config), compared with
open_clip's own forward and tokenizer: an open_clip ViT-B-32 and a timm-tower (ResNet) model."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from tests.hf_fixtures import CORPUS
from vlp.checkpointing import load_trained_model
from vlp.config import ConfigError
from vlp.export import ExportConfig, run_export
from vlp.export.open_clip_format import preset_from_open_clip
from vlp.model import build_model, build_tokenizer

TOL = 1e-5

TIMM_RESNET = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 64,
        "timm_model_name": "resnet10t",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def vit_b_32(layers: int | None = 1) -> dict:
    """open_clip's own ViT-B-32 config (shrunk to ``layers`` blocks per tower for CPU numbers)."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-32"))
    if layers:
        cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = layers
    return cfg


def random_open_clip(model_cfg: dict, seed: int = 0) -> torch.nn.Module:
    """open_clip's model for a config, every tensor perturbed (random init has zero biases and unit norms)."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in model_cfg.items() if k not in ("custom_text",)}
    model = (open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP)(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_local_dir(model: torch.nn.Module, model_cfg: dict, folder, preprocess: dict | None = None):
    folder.mkdir(parents=True)
    size = model_cfg["vision_cfg"]["image_size"]
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess or {"size": size}})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def assert_same_as_open_clip(run, folder, size: int):
    """Our imported run against open_clip's own loading of the source folder: tokens, embeddings, t and b."""
    ref, _, ref_pre = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    ref.eval()
    ref_tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    model, _ = load_trained_model(run)
    model.eval()
    ids = build_tokenizer(model.preset)(CORPUS)
    assert torch.equal(ids, ref_tok(CORPUS))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.encode_image(x, normalize=False) - ref.encode_image(x)).abs().max() <= TOL
        assert (model.encode_text(ids, normalize=False) - ref.encode_text(ids)).abs().max() <= TOL
    assert torch.equal(model.logit_scale, ref.logit_scale)
    assert (model.logit_bias is None) == (getattr(ref, "logit_bias", None) is None)
    return model


def test_vit_b_32_local_dir_imports_exactly(tmp_path):
    cfg = vit_b_32()
    folder = write_local_dir(random_open_clip(cfg), cfg, tmp_path / "vit-b-32")
    run = run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "run"), format="import-open_clip"))
    model = assert_same_as_open_clip(run, folder, 224)
    assert model.logit_bias is None and json.loads((run / "source.json").read_text())["format"] == "open_clip"


def test_full_size_vit_b_32_builds_the_same_tensors_on_meta():
    cfg = vit_b_32(layers=None)
    preset = preset_from_open_clip("ViT-B-32", cfg, {}, None)
    with torch.device("meta"):
        ours = build_model(preset).clip.state_dict()
        ref = open_clip.create_model("ViT-B-32", device="meta").state_dict()
    ours.pop("logit_bias")  # our default loss is siglip; the import picks clip for a checkpoint without a bias
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_weights_file_with_model_config_and_sigmoid_bias(tmp_path):
    cfg = dict(TIMM_RESNET, init_logit_bias=-10.0)
    model = random_open_clip(cfg)
    folder = write_local_dir(model, cfg, tmp_path / "ref")
    weights = tmp_path / "weights.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = run_export(
        ExportConfig(
            checkpoint=str(weights),
            output=str(tmp_path / "run"),
            format="import-open_clip",
            model_config=str(tmp_path / "cfg.json"),
        )
    )
    ours = assert_same_as_open_clip(run, folder, 64)
    assert torch.equal(ours.logit_bias, model.logit_bias)
    with pytest.raises(ConfigError, match="pass --model-config"):
        run_export(ExportConfig(checkpoint=str(weights), output=str(tmp_path / "r2"), format="import-open_clip"))


def test_timm_tower_model_imports_exactly_and_exports_to_open_clip_and_timm_wrapper(tmp_path):
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModel

    from vlp.model import build_transforms

    cfg = TIMM_RESNET
    folder = write_local_dir(random_open_clip(cfg), cfg, tmp_path / "resnet")
    run = run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "run"), format="import-open_clip"))
    ours = assert_same_as_open_clip(run, folder, 64)
    out = run_export(ExportConfig(checkpoint=str(run), output=str(tmp_path / "oc"), format="open_clip"))
    assert_same_as_open_clip(run, out, 64)  # timm registers resnet10t itself: open_clip rebuilds it unaided
    # hf-vision: transformers' TimmWrapperModel for the trunk, the projection in image_projection.safetensors
    tw = run_export(ExportConfig(checkpoint=str(run), output=str(tmp_path / "tw"), format="hf-vision"))
    wrapper = AutoModel.from_pretrained(str(tw)).eval()
    assert type(wrapper).__name__ == "TimmWrapperModel"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (131, 97, 3), dtype=np.uint8))
    pixels = AutoImageProcessor.from_pretrained(str(tw))(img)["pixel_values"]
    assert torch.equal(pixels, build_transforms(ours.preset, is_train=False)(img)[None])
    proj = load_file(str(tw / "image_projection.safetensors"))
    assert set(proj) == {"weight"}  # open_clip's timm_proj linear has no bias
    with torch.no_grad():
        emb = wrapper(pixel_values=pixels).pooler_output @ proj["weight"].T
        assert (emb - ours.encode_image(pixels, normalize=False)).abs().max() <= TOL
    with pytest.raises(ConfigError) as e:
        run_export(ExportConfig(checkpoint=str(run), output=str(tmp_path / "full"), format="hf-full"))
    assert "timm ResNet 'resnet10t'" in str(e.value) and "use --format hf-vision (TimmWrapperModel)" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "full").exists()


def test_hub_tokenizer_and_coca_are_refused_by_name():
    cfg = vit_b_32()
    cfg["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    with pytest.raises(ConfigError, match="names a hub tokenizer"):
        preset_from_open_clip("x", cfg, {}, None)
    with pytest.raises(ConfigError, match="multimodal_cfg"):
        preset_from_open_clip("x", dict(vit_b_32(), multimodal_cfg={"width": 8}), {}, None)


def test_siglip_style_model_with_its_own_hf_tokenizer_round_trips_through_open_clip(tmp_path):
    """open_clip's SigLIP models (e.g. the timm/ViT-B-16-SigLIP folders) ship a transformers tokenizer that open_clip
    calls through its HFTokenizer with text cleaning (tokenizer_kwargs): the import tokenizes the same way, and the
    open_clip export carries the tokenizer so that open_clip loads it back."""
    from transformers import AutoTokenizer

    from tests.hf_fixtures import gemma_tokenizer

    tok_dir = gemma_tokenizer(tmp_path)  # case- and punctuation-sensitive: open_clip's cleaning changes its ids
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    cfg = {
        "embed_dim": 64,
        "custom_text": True,
        "init_logit_bias": -10.0,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "head_width": 32, "layers": 2},
        "text_cfg": {
            "context_length": 64,
            "vocab_size": vocab,
            "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
            "tokenizer_kwargs": {"clean": "canonicalize"},
            "width": 64,
            "heads": 2,
            "layers": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
        },
    }
    folder = write_local_dir(random_open_clip(cfg), cfg, tmp_path / "siglip-oc")
    for f in tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    run = run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "run"), format="import-open_clip"))
    ours = assert_same_as_open_clip(run, folder, 32)
    text = ["A Photo, of a RED circle!"]
    ids = build_tokenizer(ours.preset)(text)
    assert torch.equal(ids, open_clip.get_tokenizer(f"local-dir:{folder}")(text))
    plain = AutoTokenizer.from_pretrained(str(tok_dir))(text, padding="max_length", max_length=64, return_tensors="pt")[
        "input_ids"
    ]
    assert not torch.equal(ids, plain)  # the cleaning (canonicalize) was applied, as open_clip applies it
    out = run_export(ExportConfig(checkpoint=str(run), output=str(tmp_path / "oc"), format="open_clip"))
    assert_same_as_open_clip(run, out, 32)


def test_convnext_tower_as_open_clip_configures_it_exports_through_timm_wrapper(tmp_path):
    """open_clip's ConvNeXt models pool with timm's own head (timm_pool ''): TimmWrapperModel pools the same way."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    cfg = {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "timm_model_name": "convnext_atto",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "timm_drop": 0.0,
            "timm_drop_path": 0.1,
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    folder = write_local_dir(random_open_clip(cfg), cfg, tmp_path / "convnext")
    run = run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "run"), format="import-open_clip"))
    ours = assert_same_as_open_clip(run, folder, 64)
    out = run_export(ExportConfig(checkpoint=str(run), output=str(tmp_path / "tw"), format="hf-vision"))
    wrapper, proj = AutoModel.from_pretrained(str(out)).eval(), load_file(str(out / "image_projection.safetensors"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = wrapper(pixel_values=x).pooler_output @ proj["weight"].T
        assert (emb - ours.encode_image(x, normalize=False)).abs().max() <= TOL
