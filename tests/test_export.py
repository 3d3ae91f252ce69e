"""Export to transformers / open_clip and import back, tested by loading the exported folders and comparing outputs.

Every representable preset is exported at a CPU-sized width/depth (same structure: patch size, image size, pooling,
activations, eps, masks, context length, MLP ratio) and compared numerically; the full-size presets are checked
for complete key and shape coverage on the meta device.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from timm.models import register_model
from timm.models.vision_transformer import vit_base_patch16_siglip_224, vit_so400m_patch14_siglip_224

from vlp.config import ConfigError, LossConfig, PretrainConfig, to_dict
from vlp.eval.zeroshot import build_zeroshot_classifier
from vlp.export import (
    KeyMapError,
    NotRepresentableError,
    export_hf_full,
    export_hf_vision,
    export_open_clip,
    hf_full_config,
    hf_full_state,
    hf_vision_config,
    hf_vision_state,
    import_hf,
    load_hf_weights,
    ours_to_hf,
)
from vlp.export import keymaps as km
from vlp.export.hf import build_hf_tokenizer, image_processor_dict
from vlp.model import ModelPreset, build_model, build_tokenizer, build_transforms, load_preset

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["tiny", "small", "vit-b-16-clip", "vit-l-14-clip", "vit-b-16-siglip", "so400m-14-siglip"]
TOL = 1e-5


# Same structure as timm's SigLIP B/16 and SO400M/14 trunks (MAP head, no class token, eps 1e-6, their activation
# and MLP ratio), only narrower and shallower.
@register_model
def vit_vlptest_patch16_siglip_224(pretrained: bool = False, **kwargs):
    return vit_base_patch16_siglip_224(pretrained=False, **{"embed_dim": 64, "depth": 2, "num_heads": 2, **kwargs})


@register_model
def vit_vlptest_patch14_siglip_224(pretrained: bool = False, **kwargs):
    return vit_so400m_patch14_siglip_224(pretrained=False, **{"embed_dim": 64, "depth": 2, "num_heads": 2, **kwargs})


SMALL_TIMM = {
    "vit_base_patch16_siglip_224": "vit_vlptest_patch16_siglip_224",
    "vit_so400m_patch14_siglip_224": "vit_vlptest_patch14_siglip_224",
}


def cpu_preset(name: str) -> ModelPreset:
    """The preset with the same structure at width 64 and depth 2 (tiny stays as it is)."""
    p = load_preset(name)
    if name == "tiny":
        return p
    p = copy.deepcopy(p)
    if p.vision_cfg.get("timm_model_name"):
        p.vision_cfg["timm_model_name"] = SMALL_TIMM[p.vision_cfg["timm_model_name"]]
        p.embed_dim = 64  # the MAP-pooled features are the image embedding
    else:
        p.vision_cfg.update(width=64, head_width=32, layers=2)
        p.embed_dim = 32
    p.text_cfg.update(width=64, heads=2, layers=2)
    p.name = f"{name}-cpu"
    return p


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random-init towers have zero biases and unit LayerNorms; perturb every tensor so that a swapped or dropped
    weight shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_model(name: str, loss: str = "siglip", seed: int = 0):
    torch.manual_seed(seed)
    return perturbed(build_model(cpu_preset(name), LossConfig(name=loss)), seed)


def images(size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def family(name: str) -> str:
    return "siglip" if "siglip" in name else "clip"


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def ours_vision(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our embedding, pooled backbone features and last hidden state (as transformers defines it per family)."""
    clip = model.clip
    out = {"embeds": clip.encode_image(x), "pooled": model.image_backbone_features(x)}
    if family(model.preset.name) == "clip":
        v = clip.visual
        out["last_hidden_state"] = v.transformer(v._embeds(x))  # HF: encoder output, before post_layernorm
    else:
        out["last_hidden_state"] = clip.visual.trunk.forward_features(x)  # HF: after post_layernorm
    return out


# --------------------------------------------------------------------------------------------------------------
# hf-vision: exported tower == ours, loaded by the installed transformers with no missing/unexpected keys
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_hf_vision_export_matches_ours(name, tmp_path):
    from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

    model = make_model(name)
    export_hf_vision(model, tmp_path)
    cls = SiglipVisionModel if family(name) == "siglip" else CLIPVisionModelWithProjection
    hf, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    x = images(model.preset.image_size)
    with torch.no_grad():
        ours = ours_vision(model, x)
        out = hf(pixel_values=x)
        if family(name) == "siglip":
            got = {"embeds": out.pooler_output, "pooled": out.pooler_output, "last_hidden_state": out.last_hidden_state}
        else:
            inner = hf.vision_model(pixel_values=x)
            got = {
                "embeds": out.image_embeds,
                "pooled": inner.pooler_output,
                "last_hidden_state": out.last_hidden_state,
            }
    diffs = {k: maxdiff(got[k], ours[k]) for k in ours}
    print(f"\n[hf-vision {name}] max |diff|: {diffs}")
    assert max(diffs.values()) < TOL, diffs
    # the activation and eps were read from the modules and written out
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["layer_norm_eps"] == (1e-6 if family(name) == "siglip" else 1e-5)
    assert cfg["hidden_act"] == "gelu"
    assert cfg["architectures"] == [cls.__name__]


def test_quick_gelu_and_tanh_gelu_are_carried_exactly(tmp_path):
    """Activation flavour is read from the modules: QuickGELU -> quick_gelu, tanh GELU -> gelu_pytorch_tanh."""
    from transformers import CLIPModel

    p = cpu_preset("tiny")
    p = copy.deepcopy(p)
    p.quick_gelu = True
    torch.manual_seed(1)
    quick = perturbed(build_model(p, LossConfig(name="clip")))
    assert hf_full_config(quick).vision_config.hidden_act == "quick_gelu"
    p2 = copy.deepcopy(cpu_preset("tiny"))
    p2.vision_cfg["act_kwargs"] = {"approximate": "tanh"}
    p2.text_cfg["act_kwargs"] = {"approximate": "tanh"}
    p2.vision_cfg["norm_kwargs"] = {"eps": 1e-6}
    tanh = perturbed(build_model(p2, LossConfig(name="clip")))
    cfg = hf_full_config(tanh)
    assert cfg.vision_config.hidden_act == "gelu_pytorch_tanh" and cfg.vision_config.layer_norm_eps == 1e-6
    for model, sub in ((quick, "q"), (tanh, "t")):
        export_hf_full(model, tmp_path / sub)
        hf = CLIPModel.from_pretrained(tmp_path / sub).eval()
        x = images(model.preset.image_size)
        tokens = build_tokenizer(model.preset)(["a photo of a dog", "two red squares!"])
        with torch.no_grad():
            d_img = maxdiff(hf.get_image_features(pixel_values=x).pooler_output, model.clip.encode_image(x))
            d_txt = maxdiff(hf.get_text_features(input_ids=tokens).pooler_output, model.clip.encode_text(tokens))
        assert d_img < TOL and d_txt < TOL, (sub, d_img, d_txt)


# --------------------------------------------------------------------------------------------------------------
# hf-full: both towers, tokenizer, logit scale/bias
# --------------------------------------------------------------------------------------------------------------

PROMPTS = [
    "This is a photo of a red circle.",
    "two BLUE squares!!",
    "it's a dog's life; don't stop",
    "café, naïve",
    "  extra   spaces\tand\nnewlines ",
    "x " * 80,
]


@pytest.mark.parametrize("name", PRESETS)
def test_hf_full_export_matches_ours(name, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    loss = "siglip" if family(name) == "siglip" else "clip"
    model = make_model(name, loss=loss)
    export_hf_full(model, tmp_path)
    hf, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf).__name__ == ("SiglipModel" if loss == "siglip" else "CLIPModel")
    hf.eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ctx = model.preset.context_length
    ours_tokens = build_tokenizer(model.preset)(PROMPTS)
    # the pipeline's tokenizer call for this family (CLIP: longest padding; SigLIP: max_length padding)
    padding = "max_length" if loss == "siglip" else "longest"
    kwargs = dict(padding=padding, max_length=ctx, truncation=True)
    hf_tokens = tok(PROMPTS, return_tensors="pt", **kwargs)
    x = images(model.preset.image_size)
    with torch.no_grad():
        t_hf = hf.get_text_features(**hf_tokens).pooler_output
        i_hf = hf.get_image_features(pixel_values=x).pooler_output
        d_txt = maxdiff(t_hf, model.clip.encode_text(ours_tokens))
        d_img = maxdiff(i_hf, model.clip.encode_image(x))
    print(f"\n[hf-full {name}] max |diff| image {d_img:.2e} text {d_txt:.2e}")
    assert d_txt < TOL and d_img < TOL
    assert torch.equal(hf.logit_scale.detach().reshape(()), model.clip.logit_scale.detach())
    if loss == "siglip":
        assert torch.equal(hf.logit_bias.detach().reshape(()), model.clip.logit_bias.detach())
        assert "attention_mask" not in hf_tokens  # the bidirectional tower attends to padding, as in training


def test_clip_export_of_a_sigmoid_trained_model_keeps_bias_in_config(tmp_path):
    from transformers import CLIPModel

    model = make_model("tiny", loss="siglip")
    export_hf_full(model, tmp_path)
    hf = CLIPModel.from_pretrained(tmp_path)
    assert hf.config.logit_bias == model.clip.logit_bias.item()
    fresh = make_model("tiny", loss="siglip", seed=5)
    load_hf_weights(fresh, tmp_path)
    assert torch.equal(fresh.clip.logit_bias, model.clip.logit_bias)


def test_exported_tokenizer_gives_open_clip_ids():
    """Same ids as open_clip's SimpleTokenizer up to the end-of-text token; padding per family."""
    ours = build_tokenizer(load_preset("vit-b-16-siglip"))(PROMPTS)  # context 64
    clip_tok = build_hf_tokenizer(64)
    siglip_tok = build_hf_tokenizer(64, pad_token="<|pad|>", attention_mask=False)
    c = clip_tok(PROMPTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
    s = siglip_tok(PROMPTS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
    pad = ours == 0
    assert torch.equal(c[~pad], ours[~pad]) and bool((c[pad] == 49407).all())
    assert torch.equal(s[~pad], ours[~pad]) and bool((s[pad] == 49408).all())
    assert int((ours == 49407).sum()) == len(PROMPTS)  # one end-of-text each, truncated prompt included


def test_image_processor_reproduces_eval_transform():
    """preprocessor_config.json == our eval transform: bit-exact with transformers' PIL backend at any size; the
    default (torchvision) backend matches to float rounding when no resampling happens."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    rng = np.random.default_rng(0)
    for name in ("tiny", "vit-b-16-siglip"):
        preset = load_preset(name)
        d = image_processor_dict(preset, family(name))
        args = {k: v for k, v in d.items() if k not in ("image_processor_type", "processor_class")}
        pil_cls, tv_cls = (
            (SiglipImageProcessorPil, SiglipImageProcessor)
            if family(name) == "siglip"
            else (CLIPImageProcessorPil, CLIPImageProcessor)
        )
        tf = build_transforms(preset, is_train=False)
        n = preset.image_size
        for w, h in ((n, n), (n + 16, n), (97, 131), (300, 200)):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ours = tf(img)
            assert maxdiff(pil_cls(**args)(images=[img], return_tensors="pt")["pixel_values"][0], ours) == 0.0
            if (w, h) == (n, n):
                assert maxdiff(tv_cls(**args)(images=[img], return_tensors="pt")["pixel_values"][0], ours) < 1e-6


# --------------------------------------------------------------------------------------------------------------
# zero-shot pipeline == our zero-shot code
# --------------------------------------------------------------------------------------------------------------

LABELS = ["red circle", "blue square", "green triangle", "yellow star"]
TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis template


def our_probabilities(model, pil_images, siglip: bool, raw: bool = False) -> torch.Tensor:
    """Class probabilities from our zero-shot classifier (raw: the cosine similarities)."""
    tok = build_tokenizer(model.preset)
    tf = build_transforms(model.preset, is_train=False)
    with torch.no_grad():
        weights = build_zeroshot_classifier(model.encode_text, tok, LABELS, [TEMPLATE])
        feats = model.encode_image(torch.stack([tf(im) for im in pil_images]))
        if raw:
            return feats @ weights
        logits = model.clip.logit_scale.exp() * feats @ weights
        if siglip:
            return torch.sigmoid(logits + model.clip.logit_bias)
        return logits.softmax(dim=-1)


def pipeline_probabilities(pipe, pil_images) -> torch.Tensor:
    out = pipe(pil_images, candidate_labels=LABELS)
    return torch.tensor([[next(r["score"] for r in res if r["label"] == lab) for lab in LABELS] for res in out])


@pytest.mark.parametrize("name", ["tiny", "vit-b-16-siglip"])
def test_zero_shot_pipeline_matches_our_zero_shot(name, tmp_path):
    from transformers import AutoImageProcessor, pipeline

    siglip = family(name) == "siglip"
    model = make_model(name, loss="siglip" if siglip else "clip")
    rng = np.random.default_rng(1)
    n = model.preset.image_size
    at_size = [Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8)) for _ in range(3)]
    any_size = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((97, 131), (300, 200))]
    with torch.no_grad():  # temperature (and bias) that spread the probabilities, so the comparison is not trivial
        model.clip.logit_scale.zero_()
        if siglip:
            model.clip.logit_bias.zero_()
        cos = our_probabilities(model, at_size + any_size, siglip=False, raw=True)
        model.clip.logit_scale.fill_(math.log(3.0 / float(cos.std())))
        if siglip:
            model.clip.logit_bias.fill_(-float(cos.mean()) * 3.0 / float(cos.std()))
    export_hf_full(model, tmp_path)
    pipe = pipeline("zero-shot-image-classification", model=str(tmp_path))
    d_default = maxdiff(pipeline_probabilities(pipe, at_size), our_probabilities(model, at_size, siglip))
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    pipe_pil = pipeline(
        "zero-shot-image-classification", model=pipe.model, tokenizer=pipe.tokenizer, image_processor=pil
    )
    d_pil = maxdiff(pipeline_probabilities(pipe_pil, any_size), our_probabilities(model, any_size, siglip))
    spread = float(our_probabilities(model, at_size, siglip).std())
    print(
        f"\n[pipeline {name}] max |p diff| default backend {d_default:.2e}, PIL backend (resized) {d_pil:.2e}; "
        f"std of p {spread:.3f}"
    )
    assert spread > 1e-3
    assert d_default < 1e-4 and d_pil < 1e-4


# --------------------------------------------------------------------------------------------------------------
# open_clip folder
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "vit-b-16-clip", pytest.param("vit-b-16-siglip", marks=pytest.mark.slow)])
def test_open_clip_export_gives_identical_embeddings(name, tmp_path):
    if name == "vit-b-16-siglip":  # open_clip must build the tower from timm's own registry: the real B/16 trunk
        preset = cpu_preset(name)
        preset.vision_cfg["timm_model_name"], preset.embed_dim = "vit_base_patch16_siglip_224", 768
        torch.manual_seed(0)
        model = perturbed(build_model(preset, LossConfig(name="siglip")))
    else:
        model = make_model(name)
    export_open_clip(model, tmp_path)
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    oc.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    x = images(model.preset.image_size)
    tokens = tokenizer(PROMPTS)
    assert torch.equal(tokens, build_tokenizer(model.preset)(PROMPTS))
    with torch.no_grad():
        assert torch.equal(oc.encode_image(x), model.clip.encode_image(x))
        assert torch.equal(oc.encode_text(tokens), model.clip.encode_text(tokens))
    assert torch.equal(oc.logit_scale, model.clip.logit_scale) and torch.equal(oc.logit_bias, model.clip.logit_bias)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (131, 97, 3), dtype=np.uint8))
    assert torch.equal(preprocess(img), build_transforms(model.preset, is_train=False)(img))


# --------------------------------------------------------------------------------------------------------------
# Round trips, bit-exact
# --------------------------------------------------------------------------------------------------------------


def _hf_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            hidden_act="quick_gelu",
            eos_token_id=2,
        ),  # an old-style config: pools at argmax(input_ids)
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=48,
        logit_scale_init_value=3.1,
    )
    torch.manual_seed(seed)
    return perturbed(CLIPModel(cfg), seed)


def _hf_siglip(seed: int = 0):
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(
        text_config=dict(
            vocab_size=49409,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            projection_size=64,
            pad_token_id=49408,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=16,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        ),
    )
    torch.manual_seed(seed)
    model = perturbed(SiglipModel(cfg), seed)
    with torch.no_grad():
        emb = model.text_model.embeddings.token_embedding.weight
        emb[-1] = emb[0]  # the padding row of our layout
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_to_ours_to_hf_is_bit_exact(kind, tmp_path):
    """A transformers-saved model (its own save_pretrained) -> our preset + weights -> HF state: every tensor equal."""
    hf = _hf_clip() if kind == "clip" else _hf_siglip()
    hf.save_pretrained(tmp_path / "hf")
    if kind == "clip":  # as OpenAI's folders have it: shortest-side resize + centre crop at the model's size
        pp = _with("tiny", vision={"image_size": 32})
        (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(image_processor_dict(pp, "clip")))
    model, loss = import_hf(tmp_path / "hf")
    assert loss.name == kind and (model.clip.logit_bias is None) == (kind == "clip")
    if kind == "siglip":
        assert model.preset.vision_cfg["timm_model_name"] == "vit_vlptest_patch16_siglip_224"
    else:
        assert model.preset.quick_gelu and model.preset.preprocess["resize_mode"] == "shortest"
    back = hf_full_state(model)
    orig = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(orig)
    unequal = [k for k in orig if not torch.equal(back[k], orig[k].reshape(back[k].shape))]
    assert not unequal, unequal[:5]
    assert all(back[k].shape == orig[k].shape for k in orig)
    # and the imported model computes what the HF model computes
    x = images(model.preset.image_size)
    with torch.no_grad():
        assert maxdiff(hf.get_image_features(pixel_values=x).pooler_output, model.clip.encode_image(x)) < TOL


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_vision_only_to_ours_to_hf_is_bit_exact(kind, tmp_path):
    """Vision towers saved by transformers 5.x itself (a bare SiglipVisionModel has no ``vision_model.`` prefix)."""
    from transformers import CLIPVisionModelWithProjection, SiglipVisionModel

    full = _hf_clip() if kind == "clip" else _hf_siglip()
    if kind == "clip":
        tower = CLIPVisionModelWithProjection(
            full.config.vision_config.__class__(**{**full.config.vision_config.to_dict(), "projection_dim": 48})
        )
    else:
        tower = SiglipVisionModel(full.config.vision_config)
    perturbed(tower, 3)
    tower.save_pretrained(tmp_path / "hf")
    preset = cpu_preset("tiny" if kind == "clip" else "vit-b-16-siglip")
    preset = copy.deepcopy(preset)
    if kind == "clip":
        preset.quick_gelu = True
        preset.embed_dim = 48
        preset.vision_cfg.update(image_size=32, patch_size=8, width=64, head_width=32, layers=2, mlp_ratio=4.0)
    model, _ = import_hf(tmp_path / "hf", preset=preset)
    back = hf_vision_state(model)
    orig = tower.state_dict()
    if kind == "siglip":
        orig = {f"vision_model.{k}": v for k, v in orig.items()}
    orig = {k: v for k, v in orig.items() if not k.endswith("position_ids")}
    assert set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) for k in orig)


@pytest.mark.parametrize("name", ["tiny", "vit-b-16-siglip"])
def test_ours_to_hf_to_ours_is_bit_exact(name, tmp_path):
    model = make_model(name)
    export_hf_full(model, tmp_path)
    fresh = make_model(name, seed=7)
    load_hf_weights(fresh, tmp_path)
    a, b = model.state_dict(), fresh.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_key_map_reports_missing_and_unexpected_keys():
    model = make_model("tiny")
    state = dict(model.clip.state_dict())
    rules = km.clip_vision_rules(3)
    vis = {k: v for k, v in state.items() if k.startswith("visual.")}
    vis.pop("visual.ln_pre.weight")
    vis["visual.extra"] = torch.zeros(1)
    with pytest.raises(
        KeyMapError,
        match=r"missing 1 key\(s\): visual.ln_pre.weight; unexpected 1 key\(s\): "
        r"visual.extra",
    ):
        ours_to_hf(vis, rules)


# --------------------------------------------------------------------------------------------------------------
# Full-size presets on the meta device: complete key and shape coverage against transformers' own modules
# --------------------------------------------------------------------------------------------------------------


def _shapes(state) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_presets_cover_every_key_on_meta(name):
    from transformers import AutoModel

    with torch.device("meta"):
        model = build_model(name, LossConfig(name="siglip"))
        hf_full = AutoModel.from_config(hf_full_config(model))
        vcfg = hf_vision_config(model)
        import transformers

        hf_vis = getattr(transformers, vcfg.architectures[0])(vcfg)
    ours_full = _shapes(hf_full_state(model))
    assert ours_full == _shapes(hf_full.state_dict())
    theirs_vis = _shapes(hf_vis.state_dict())
    if family(name) == "siglip":  # 5.x names a bare vision model's keys without the prefix we write (4.x layout)
        theirs_vis = {f"vision_model.{k}": v for k, v in theirs_vis.items()}
    assert _shapes(hf_vision_state(model)) == theirs_vis
    n = sum(v.numel() for v in model.parameters())
    print(f"\n[meta {name}] {len(ours_full)} HF tensors, {n / 1e6:.0f}M parameters covered")


# --------------------------------------------------------------------------------------------------------------
# Files in the layout transformers 4.x reads
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "vit-b-16-siglip"])
def test_exported_files_use_the_transformers4_layout(name, tmp_path):
    from safetensors import safe_open

    model = make_model(name)
    export_hf_vision(model, tmp_path / "v")
    export_hf_full(model, tmp_path / "f")
    with safe_open(tmp_path / "v" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert keys and all(k.startswith(("vision_model.", "visual_projection.")) for k in keys)
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    # written in full, not as a diff against this transformers version's defaults
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
        "model_type",
        "architectures",
    ):
        assert key in cfg, key
    files = {p.name for p in (tmp_path / "f").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "special_tokens_map.json",
    } <= files
    vocab = json.loads((tmp_path / "f" / "vocab.json").read_text())
    assert vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tmp_path / "f")
    assert type(proc).__name__ == ("SiglipProcessor" if family(name) == "siglip" else "CLIPProcessor")
    ids = proc(text=["a red circle!"], return_tensors="pt")["input_ids"][0]
    assert ids.tolist()[:6] == build_tokenizer(model.preset)(["a red circle!"])[0, :6].tolist()
    assert len((tmp_path / "f" / "merges.txt").read_text().splitlines()) == 1 + 48894


HF4 = os.environ.get("VLP_TRANSFORMERS4_PATH")


@pytest.mark.slow
@pytest.mark.skipif(not HF4, reason="set VLP_TRANSFORMERS4_PATH to a folder with transformers 4.x installed")
@pytest.mark.parametrize("name", ["tiny", "vit-b-16-siglip"])
def test_transformers4_loads_the_export(name, tmp_path):
    """Load the export with a real transformers 4.x (in a subprocess, its folder first on sys.path)."""
    model = make_model(name)
    export_hf_vision(model, tmp_path / "v")
    export_hf_full(model, tmp_path / "f")
    x = images(model.preset.image_size)
    tokens = build_tokenizer(model.preset)(PROMPTS)
    with torch.no_grad():
        ref = {"x": x, "image": model.clip.encode_image(x), "text": model.clip.encode_text(tokens)}
    torch.save(ref, tmp_path / "ref.pt")
    padding = "max_length" if family(name) == "siglip" else "longest"
    code = f"""
import json, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer
ref = torch.load({str(tmp_path / "ref.pt")!r})
def load(d):
    cls = getattr(transformers, json.load(open(d + "/config.json"))["architectures"][0])
    m, info = cls.from_pretrained(d, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return m.eval()
v, f = load({str(tmp_path / "v")!r}), load({str(tmp_path / "f")!r})
assert type(AutoModel.from_pretrained({str(tmp_path / "f")!r})) is type(f)
tok = AutoTokenizer.from_pretrained({str(tmp_path / "f")!r})
AutoImageProcessor.from_pretrained({str(tmp_path / "f")!r}), AutoProcessor.from_pretrained({str(tmp_path / "f")!r})
ids = tok({PROMPTS!r}, padding={padding!r}, max_length={model.preset.context_length}, truncation=True,
          return_tensors="pt")
with torch.no_grad():
    out = v(pixel_values=ref["x"])
    d_v = ((out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output) - ref["image"]).abs().max().item()
    d_i = (f.get_image_features(pixel_values=ref["x"]) - ref["image"]).abs().max().item()
    d_t = (f.get_text_features(**ids) - ref["text"]).abs().max().item()
print(transformers.__version__, type(v).__name__, type(f).__name__, type(tok).__name__, d_v, d_i, d_t)
assert max(d_v, d_i, d_t) < 1e-5
"""
    env = {**os.environ, "PYTHONPATH": HF4}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    print(res.stdout[-500:])
    assert res.returncode == 0, res.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------
# Refusals: options transformers cannot represent are named, never exported approximately
# --------------------------------------------------------------------------------------------------------------


def _with(name: str, vision: dict | None = None, text: dict | None = None, **preset_fields) -> ModelPreset:
    p = copy.deepcopy(cpu_preset(name))
    p.vision_cfg.update(vision or {})
    p.text_cfg.update(text or {})
    for k, v in preset_fields.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize(
    "preset, fmt, needle",
    [
        (_with("tiny", vision={"ls_init_value": 0.1}), "vision", "LayerScale"),
        (_with("tiny", text={"ls_init_value": 0.1}), "full", "LayerScale"),
        (_with("tiny", vision={"qk_norm": True}), "vision", "qk_norm"),
        (_with("tiny", vision={"pool_type": "avg"}), "vision", "pool_type='avg'"),
        (_with("tiny", vision={"attentional_pool": True}), "vision", "attentional_pool"),
        (_with("tiny", vision={"no_ln_pre": True}), "vision", "no_ln_pre"),
        (_with("tiny", text={"no_causal_mask": True}), "full", "no_causal_mask"),
        (_with("tiny", text={"proj_bias": True}), "full", "proj_bias"),
        (_with("vit-b-16-siglip", vision={"timm_pool": "avg"}), "vision", "timm_pool: map"),
        (_with("vit-b-16-siglip", vision={"timm_proj": "linear"}), "vision", "timm_proj"),
        (_with("vit-b-16-siglip", text={"no_causal_mask": False}), "full", "causal text mask"),
        (_with("vit-b-16-siglip", text={"pool_type": "argmax"}), "full", "pool_type='argmax'"),
        (_with("tiny", preprocess={"resize_mode": "longest"}), "vision", "resize_mode='longest'"),
    ],
)
def test_unrepresentable_options_are_refused_by_name(preset, fmt, needle, tmp_path):
    torch.manual_seed(0)
    model = build_model(preset, LossConfig(name="siglip")).eval()
    with pytest.raises(NotRepresentableError, match=None) as err:
        (export_hf_vision if fmt == "vision" else export_hf_full)(model, tmp_path / "out")
    assert needle in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_mixed_layer_norm_eps_is_refused():
    p = _with("tiny")
    model = build_model(p, LossConfig(name="clip"))
    model.clip.visual.ln_post.eps = 1e-6
    with pytest.raises(NotRepresentableError, match=r"mixes layer-norm eps \[1e-06, 1e-05\]"):
        hf_vision_config(model)


# --------------------------------------------------------------------------------------------------------------
# The command line, end to end (tiny run checkpoint -> every format -> import back)
# --------------------------------------------------------------------------------------------------------------


def test_export_cli_every_format_and_import_back(tmp_path, capsys):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    from vlp.checkpointing import load_trained_model

    model = make_model("tiny", loss="clip")
    cfg = PretrainConfig()
    cfg.model.name = "tiny"
    cfg.loss = LossConfig(name="clip")
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, tmp_path / "checkpoint.pt")
    spec = importlib.util.spec_from_file_location("export_hf", REPO / "scripts" / "export_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = script.main  # in-process: the script is a thin parser over run_export

    for fmt in ("hf-vision", "hf-full", "open_clip"):
        assert (
            main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--output", str(tmp_path / fmt), "--format", fmt])
            == 0
        )
    x = images(64)
    with torch.no_grad():
        ref = model.clip.encode_image(x)
        assert (
            maxdiff(
                CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf-vision")(pixel_values=x).image_embeds, ref
            )
            < TOL
        )
        assert (
            maxdiff(
                CLIPModel.from_pretrained(tmp_path / "hf-full").get_image_features(pixel_values=x).pooler_output, ref
            )
            < TOL
        )
    assert (
        main(["--checkpoint", str(tmp_path / "hf-full"), "--output", str(tmp_path / "run"), "--format", "import-hf"])
        == 0
    )
    reloaded, run_cfg = load_trained_model(tmp_path / "run")
    assert run_cfg.loss.name == "clip" and run_cfg.model.pretrained.endswith("checkpoint.pt")
    a, b = model.state_dict(), reloaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a user mistake is one line and exit status 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        script.run_cli(
            main,
            [
                "--checkpoint",
                str(tmp_path / "checkpoint.pt"),
                "--output",
                str(tmp_path / "hf-full"),
                "--format",
                "hf-full",
            ],
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is not empty; pass --overwrite true" in err
    assert len(err.strip().splitlines()) == 1


def test_overwrite_only_replaces_export_files(tmp_path):
    model = make_model("tiny")
    export_hf_vision(model, tmp_path / "out")
    export_hf_vision(model, tmp_path / "out", overwrite=True)  # replaces its own files
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files an export does not write \(notes.txt\)"):
        export_hf_vision(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_import_reads_legacy_and_current_preprocessor_configs(tmp_path):
    from vlp.export.hf import _preprocess_from_hf

    legacy = {
        "feature_extractor_type": "CLIPFeatureExtractor",
        "size": 224,
        "crop_size": 224,
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    assert _preprocess_from_hf(tmp_path, 224) == {
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    squash = image_processor_dict(load_preset("vit-b-16-siglip"), "siglip")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(squash))
    assert _preprocess_from_hf(tmp_path, 224)["resize_mode"] == "squash"
    with pytest.raises(NotRepresentableError, match="differ from the model's image_size 256"):
        _preprocess_from_hf(tmp_path, 256)


def test_import_refuses_a_mismatching_preset(tmp_path):
    hf = _hf_clip()
    hf.save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError,
        match="vision hidden_size: ours 128, folder 64.*vision hidden_act: ours 'gelu', folder 'quick_gelu'",
    ):
        import_hf(tmp_path, preset="tiny")
