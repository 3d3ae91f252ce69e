"""LLaVA export: the folder loads in transformers and gives our logits, with <image> expanded by its processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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
    out = export_llava(tower, model.projector, projector_type, llm.model, llm.tokenizer, "<image>",
                       llm.image_token_id, tmp_path / "llava")
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
        direct = hf(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"],
                    attention_mask=ours["attention_mask"]).logits
    mask = ours["attention_mask"].bool()
    diffs["direct"] = (direct - our_logits)[mask].abs().max().item()
    print(f"LLaVA export ({type(tower).__name__}, {projector_type}, {tower.select}): max |logit diff| "
          f"{diffs['logits']:.3g} (processor inputs), {diffs['direct']:.3g} (our inputs); pixels {diffs['pixels']:.3g}")
    assert diffs["logits"] < 1e-4 and diffs["direct"] < 1e-4 and diffs["pixels"] < 1e-5, diffs
    assert our_logits.abs().max() > 0.1  # not a trivially zero comparison
    return diffs


def test_llava_export_hf_clip_tower_mlp2x(tmp_path, llm_dir):
    tower = load_vision_tower(str(save_tiny_hf_vision(tmp_path / "clip", "clip", image_size=32, patch_size=8)),
                              feature_layer=-2, select="patch")
    _check_llava_matches(tmp_path, tower, load_llm(llm_dir), "mlp2x_gelu", image_size=40)


def test_llava_export_hf_siglip_tower_linear_full(tmp_path, llm_dir):
    tower = load_vision_tower(str(save_tiny_hf_vision(tmp_path / "sig", "siglip", image_size=32, patch_size=8)),
                              feature_layer=1, select="full")
    _check_llava_matches(tmp_path, tower, load_llm(llm_dir), "linear", image_size=32)


@pytest.mark.parametrize("select", ["patch", "cls_patch"])
def test_llava_export_our_tower(tmp_path, llm_dir, select):
    """A tower of this project (tiny preset) goes through vlp.export's HF vision export into the LLaVA folder."""
    tower = load_vision_tower(None, "tiny", feature_layer=-2, select=select)
    _check_llava_matches(tmp_path, tower, load_llm(llm_dir), "mlp2x_gelu", image_size=64)


def test_unrepresentable_projector_and_checkpoint_roundtrip(tmp_path, llm_dir):
    llm = load_llm(llm_dir)
    tower = load_vision_tower(None, "tiny")
    model = _adapter(tower, llm, "mlp3x_gelu")
    with pytest.raises(ConfigError, match="mlp3x_gelu.*cannot be exported"):
        export_llava(tower, model.projector, "mlp3x_gelu", llm.model, llm.tokenizer, "<image>", llm.image_token_id,
                     tmp_path / "x")
    save_projector(model.projector, {"projector_type": "mlp3x_gelu", "step": 7}, tmp_path / "run")
    state, meta = load_projector_state(tmp_path / "run")
    assert meta == {"projector_type": "mlp3x_gelu", "step": 7}
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    for k, v in model.projector.state_dict().items():
        assert torch.equal(state[k], v)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast and does not fight other processes for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
