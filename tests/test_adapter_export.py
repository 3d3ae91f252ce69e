"""LLaVA export: the folder loads in transformers and gives our logits, with <image> expanded by its processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.models import register_model
from timm.models.vision_transformer import vit_base_patch16_siglip_224

from adapters.data import CaptionCollator
from adapters.export import export_llava, load_projector_state, save_projector
from adapters.llm import load_llm
from adapters.model import LlavaAdapter
from adapters.projector import build_projector
from adapters.testing import save_tiny_hf_vision
from adapters.vision import load_vision_tower
from vlp.config import ConfigError

CAPTIONS = ["a large red star in the top left of the image", "a ring"]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from adapters.llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("export_llm") / "tiny", text_steps=0)


def _images(size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in CAPTIONS]


def _adapter(tower, llm, projector_type: str) -> LlavaAdapter:
    torch.manual_seed(1)
    projector = build_projector(projector_type, tower.hidden_size, llm.model.config.hidden_size)
    with torch.no_grad():  # larger than default init so that the image features matter in the comparison
        for p in projector.parameters():
            p.mul_(3.0)
    return LlavaAdapter(tower, projector, llm.model, llm.image_token_id, projector_type)


def _check_llava_matches(tmp_path, tower, llm, projector_type: str, image_size: int) -> dict[str, float]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = _adapter(tower, llm, projector_type)
    out = export_llava(
        tower,
        model.projector,
        projector_type,
        llm.model,
        llm.tokenizer,
        "<image>",
        llm.image_token_id,
        tmp_path / "llava",
    )
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert hf.config.image_token_id == llm.image_token_id
    assert hf.config.vision_feature_layer == tower.feature_layer
    assert hf.config.vision_feature_select_strategy == ("default" if tower.select == "patch" else "full")

    collator = CaptionCollator(llm.tokenizer, "<image>", llm.image_token_id, tower.num_positions, "<image>\n", 256)
    images = _images(image_size)
    ours = collator([{"pixel_values": tower.image_transform(im), "text": c} for im, c in zip(images, CAPTIONS)])
    enc = processor(images=images, text=["<image>\n" + c for c in CAPTIONS], return_tensors="pt", padding=True)
    diffs = {"logits": 0.0}
    with torch.no_grad():
        our_logits = model(ours["pixel_values"], ours["input_ids"], ours["attention_mask"])
        hf_logits = hf(**enc).logits
    for i in range(len(CAPTIONS)):
        n = int(enc["attention_mask"][i].sum())
        # the processor expands <image> to the same number of tokens; our sequence only adds the end token
        assert (enc["input_ids"][i, :n] == llm.image_token_id).sum() == tower.num_positions
        assert enc["input_ids"][i, :n].tolist() == ours["input_ids"][i, :n].tolist()
        assert ours["input_ids"][i, n].item() == llm.tokenizer.eos_token_id
        diffs["logits"] = max(diffs["logits"], (hf_logits[i, :n] - our_logits[i, :n]).abs().max().item())
    diffs["pixels"] = (enc["pixel_values"] - ours["pixel_values"]).abs().max().item()
    # same model inputs straight into transformers (our pixels and ids, eos included)
    with torch.no_grad():
        direct = hf(
            input_ids=ours["input_ids"], pixel_values=ours["pixel_values"], attention_mask=ours["attention_mask"]
        ).logits
    mask = ours["attention_mask"].bool()
    diffs["direct"] = (direct - our_logits)[mask].abs().max().item()
    print(
        f"LLaVA export ({type(tower).__name__}, {projector_type}, {tower.select}): max |logit diff| "
        f"{diffs['logits']:.3g} (processor inputs), {diffs['direct']:.3g} (our inputs); pixels {diffs['pixels']:.3g}"
    )
    assert diffs["logits"] < 1e-4 and diffs["direct"] < 1e-4 and diffs["pixels"] < 1e-5, diffs
    assert our_logits.abs().max() > 0.1  # not a trivially zero comparison
    with torch.no_grad():  # and the images matter: swapping them changes transformers' caption logits
        swapped = hf(**{**enc, "pixel_values": enc["pixel_values"].flip(0)}).logits
    n0 = int(enc["attention_mask"][0].sum())
    assert (swapped[0, :n0] - hf_logits[0, :n0]).abs().max() > 1e-3
    return diffs


def test_llava_export_hf_clip_tower_mlp2x(tmp_path, llm_dir):
    tower = load_vision_tower(
        str(save_tiny_hf_vision(tmp_path / "clip", "clip", image_size=32, patch_size=8)),
        feature_layer=-2,
        select="patch",
    )
    _check_llava_matches(tmp_path, tower, load_llm(llm_dir), "mlp2x_gelu", image_size=40)


def test_llava_export_hf_siglip_tower_linear_full(tmp_path, llm_dir):
    tower = load_vision_tower(
        str(save_tiny_hf_vision(tmp_path / "sig", "siglip", image_size=32, patch_size=8)),
        feature_layer=1,
        select="full",
    )
    _check_llava_matches(tmp_path, tower, load_llm(llm_dir), "linear", image_size=32)


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_llava_export_our_tower(tmp_path, llm_dir, select):
    """A tower of this project (tiny preset) goes through vlp.export's HF vision export into the LLaVA folder."""
    tower = load_vision_tower(None, "tiny", feature_layer=-2, select=select)
    _check_llava_matches(tmp_path, tower, load_llm(llm_dir), "mlp2x_gelu", image_size=64)


@register_model
def vit_vlpadaptertest_patch16_siglip_224(pretrained: bool = False, **kwargs):
    """timm's SigLIP B/16 trunk structure (MAP head, no class token), narrow and shallow for tests."""
    return vit_base_patch16_siglip_224(pretrained=False, **{"embed_dim": 64, "depth": 3, "num_heads": 2, **kwargs})


def _tiny_siglip_preset(folder) -> str:
    path = folder / "tiny-siglip.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "embed_dim": 64,
                "custom_text": True,
                "vision_cfg": {
                    "image_size": 224,
                    "timm_model_name": "vit_vlpadaptertest_patch16_siglip_224",
                    "timm_model_pretrained": False,
                    "timm_pool": "map",
                    "timm_proj": "none",
                },
                "text_cfg": {
                    "context_length": 16,
                    "vocab_size": 49408,
                    "width": 64,
                    "heads": 2,
                    "layers": 1,
                    "no_causal_mask": True,
                    "proj_bias": True,
                    "pool_type": "last",
                    "norm_kwargs": {"eps": 1e-6},
                },
                "preprocess": {
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                    "interpolation": "bicubic",
                    "resize_mode": "squash",
                },
            }
        )
    )
    return str(path)


def test_llava_export_our_siglip_tower(tmp_path, llm_dir):
    """A SigLIP-style (timm, no class token) tower of this project: select=full, hidden states of block 2."""
    tower = load_vision_tower(None, _tiny_siglip_preset(tmp_path), feature_layer=2, select="full")
    assert tower.num_positions == 196 and tower.num_prefix_tokens == 0
    _check_llava_matches(tmp_path, tower, load_llm(llm_dir), "mlp2x_gelu", image_size=224)


def test_our_towers_hidden_states_equal_hf_export(tmp_path):
    """Every hidden state of our towers equals transformers' hidden_states of the exported tower (same indexing)."""
    from adapters.export import hf_vision_tower

    for preset, size in (("tiny", 64), (_tiny_siglip_preset(tmp_path), 224)):
        tower = load_vision_tower(None, preset, select="full")
        hf, _ = hf_vision_tower(tower)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ours = tower.hidden_states(x)
            theirs = hf(pixel_values=x, output_hidden_states=True).hidden_states
        assert len(ours) == len(theirs) == tower.num_layers + 1
        diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
        print(f"{type(tower).__name__}: max |hidden state diff| over {len(ours)} states {diff:.3g}")
        assert diff < 1e-5


def test_unrepresentable_projector_and_checkpoint_roundtrip(tmp_path, llm_dir):
    llm = load_llm(llm_dir)
    tower = load_vision_tower(None, "tiny")
    model = _adapter(tower, llm, "mlp3x_gelu")
    with pytest.raises(ConfigError, match="mlp3x_gelu.*cannot be exported"):
        export_llava(
            tower,
            model.projector,
            "mlp3x_gelu",
            llm.model,
            llm.tokenizer,
            "<image>",
            llm.image_token_id,
            tmp_path / "x",
        )
    save_projector(model.projector, {"projector_type": "mlp3x_gelu", "step": 7}, tmp_path / "run")
    state, meta = load_projector_state(tmp_path / "run")
    assert meta == {"projector_type": "mlp3x_gelu", "step": 7}
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    for k, v in model.projector.state_dict().items():
        assert torch.equal(state[k], v)
