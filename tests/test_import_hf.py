"""Import of transformers CLIP / SigLIP / SigLIP 2 checkpoints: built from the published configs (full size on the
meta device for key coverage, shrunk for numbers), compared with transformers' own forward and tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf_fixtures import (
    CLIP_CONFIGS,
    CORPUS,
    SIGLIP_CONFIGS,
    build_hf,
    gemma_tokenizer,
    save_hf,
    sentencepiece_tokenizer,
    shrunk,
)
from vlp.checkpointing import load_trained_model
from vlp.config import ConfigError
from vlp.export import ExportConfig, run_export
from vlp.export.hf import build_hf_tokenizer, check_structure, full_rules, preset_from_hf, read_hf_state
from vlp.export.keymaps import hf_to_ours
from vlp.model import build_model, build_tokenizer, load_preset

TOL = 1e-5
ALL = [*CLIP_CONFIGS, *SIGLIP_CONFIGS]


def kind_of(name: str) -> str:
    return "clip" if name in CLIP_CONFIGS else "siglip"


def config_of(name: str) -> dict:
    return (CLIP_CONFIGS if name in CLIP_CONFIGS else SIGLIP_CONFIGS)[name]


def tokenizer_for(name: str, tmp_path):
    """The kind of tokenizer the release ships: CLIP's BPE, SigLIP's SentencePiece, SigLIP 2's Gemma."""
    if kind_of(name) == "clip":
        folder = tmp_path / "clip-tok"
        # OpenAI's HF checkpoints: CLIPTokenizer over the same BPE, padding with <|endoftext|>
        build_hf_tokenizer(77).save_pretrained(str(folder))
        return folder
    return (gemma_tokenizer if "siglip2" in name else sentencepiece_tokenizer)(tmp_path)


def processor_for(name: str, size: int) -> dict:
    if kind_of(name) == "clip":
        return {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
            "do_center_crop": True,
            "resample": 3,
        }
    return {
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": size, "width": size},
        "do_center_crop": False,
        "resample": 3,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }


@pytest.mark.parametrize("name", ALL)
def test_full_size_published_configs_cover_every_key_on_meta(name, tmp_path):
    """Every tensor of the full-size checkpoint maps onto our tower with its shape, and the structure (activation,
    eps, sizes) our export would write agrees with the folder's config."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    kind, cfg = kind_of(name), config_of(name)
    tok = tokenizer_for(name, tmp_path) if kind == "siglip" else None
    folder = tmp_path / "ckpt"
    folder.mkdir()
    hf_cfg = CLIPConfig(**cfg) if kind == "clip" else SiglipConfig(**cfg)
    (folder / "config.json").write_text(hf_cfg.to_json_string(use_diff=False))
    if tok is not None:
        for f in tok.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    with torch.device("meta"):
        hf = (CLIPModel if kind == "clip" else SiglipModel)(hf_cfg)
        preset = preset_from_hf(folder)
        ours = build_model(preset)
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    mapped = hf_to_ours(hf_state, full_rules(ours), what=name)
    target = ours.clip.state_dict()
    if kind == "clip":
        target.pop("logit_bias", None)
    assert set(mapped) == set(target)
    assert all(tuple(mapped[k].shape) == tuple(target[k].shape) for k in target)
    check_structure(ours, json.loads((folder / "config.json").read_text()), vision_only=False, what=name)
    vc = cfg["vision_config"]
    assert (
        preset.image_size == vc["image_size"] and preset.context_length == cfg["text_config"]["max_position_embeddings"]
    )
    if kind == "siglip":  # Google's towers use tanh-GELU, which timm's SigLIP registrations do not
        assert preset.vision_cfg["timm_model_kwargs"]["act_layer"] == "gelu_tanh"
        assert preset.text_cfg["act_kwargs"] == {"approximate": "tanh"} and preset.tokenizer is not None
        assert preset.text_cfg["vocab_size"] == cfg["text_config"]["vocab_size"]
    else:
        assert preset.quick_gelu and preset.tokenizer is None


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("name", ALL)
def test_shrunk_checkpoint_imports_exactly(name, tmp_path):
    """Through the command's code path (import-hf -> run directory -> load_trained_model): image and text
    embeddings within 1e-5 of transformers' forward, the same token ids as the folder's tokenizer, same t and b."""
    from transformers import AutoTokenizer

    kind, cfg = kind_of(name), config_of(name)
    patch = cfg["vision_config"]["patch_size"]
    size = 2 * patch if patch != 14 else 42
    tok_dir = tokenizer_for(name, tmp_path)
    source_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = None if kind == "clip" else len(source_tok)
    hf = build_hf(kind, shrunk(cfg, vocab_size=vocab, image_size=size))
    folder = save_hf(hf, tmp_path / name.split("/")[1], tok_dir, processor_for(name, size))
    run = run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "run"), format="import-hf"))
    model, run_cfg = load_trained_model(run)
    model.eval()
    assert run_cfg.loss.name == kind
    context = model.preset.context_length
    ids = build_tokenizer(model.preset)(CORPUS)
    ref_ids = source_tok(CORPUS, padding="max_length", max_length=context, truncation=True, return_tensors="pt")[
        "input_ids"
    ]
    if kind == "clip":  # open_clip pads with 0 after <|endoftext|>; the causal tower never looks past it
        eot = (ids == 49407).int().argmax(1)
        assert all(torch.equal(ids[i, : eot[i] + 1], ref_ids[i, : eot[i] + 1]) for i in range(len(CORPUS)))
    else:
        assert torch.equal(ids, ref_ids)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img_ref = _features(hf.get_image_features(pixel_values=x))
        txt_ref = _features(hf.get_text_features(input_ids=ref_ids))
        assert (model.encode_image(x, normalize=False) - img_ref).abs().max() <= TOL
        assert (model.encode_text(ids, normalize=False) - txt_ref).abs().max() <= TOL
    assert torch.equal(model.logit_scale.reshape(1), hf.logit_scale.reshape(1))
    if kind == "siglip":
        assert torch.equal(model.logit_bias.reshape(1), hf.logit_bias.reshape(1))
        assert (run / "tokenizer").is_dir()  # the run carries the tokenizer it trains with


def test_sentencepiece_siglip_without_tokenizer_files_is_refused_in_one_line(tmp_path):
    hf = build_hf("siglip", shrunk(SIGLIP_CONFIGS["google/siglip-base-patch16-224"], vocab_size=64, image_size=32))
    folder = save_hf(hf, tmp_path / "ckpt")
    with pytest.raises(ConfigError) as e:
        run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "run"), format="import-hf"))
    msg = str(e.value)
    assert "\n" not in msg and "vocab_size 64" in msg and "--vision-only" in msg
    assert not (tmp_path / "run").exists()


def test_siglip_vision_eps_other_than_timms_is_refused(tmp_path):
    cfg = shrunk(SIGLIP_CONFIGS["google/siglip-base-patch16-224"], vocab_size=64, image_size=32)
    cfg["vision_config"]["layer_norm_eps"] = 1e-5
    folder = save_hf(build_hf("siglip", cfg), tmp_path / "ckpt", sentencepiece_tokenizer(tmp_path))
    with pytest.raises(ConfigError, match=r"layer_norm_eps=1e-05.*valid: 1e-6"):
        preset_from_hf(folder)


def test_imported_siglip_reexports_to_transformers_bit_exactly(tmp_path):
    """HF SigLIP (tanh-GELU, SentencePiece) -> ours -> hf-full: every tensor and the tokenizer's ids identical."""
    from transformers import AutoTokenizer

    tok_dir = sentencepiece_tokenizer(tmp_path)
    hf = build_hf("siglip", shrunk(SIGLIP_CONFIGS["google/siglip-base-patch16-224"], vocab_size=64, image_size=32))
    folder = save_hf(hf, tmp_path / "ckpt", tok_dir, processor_for("google/siglip-base-patch16-224", 32))
    run = run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "run"), format="import-hf"))
    out = run_export(ExportConfig(checkpoint=str(run), output=str(tmp_path / "back"), format="hf-full"))
    a, b = read_hf_state(folder), read_hf_state(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = json.loads((out / "config.json").read_text())
    assert back["vision_config"]["hidden_act"] == back["text_config"]["hidden_act"] == "gelu_pytorch_tanh"
    ids = AutoTokenizer.from_pretrained(str(out))(CORPUS, padding="max_length", max_length=64)["input_ids"]
    ref = AutoTokenizer.from_pretrained(str(folder))(CORPUS, padding="max_length", max_length=64)["input_ids"]
    assert ids == ref
    with pytest.raises(ConfigError, match="open_clip's TimmModel does not pass.*use --format hf-full"):
        run_export(ExportConfig(checkpoint=str(run), output=str(tmp_path / "oc"), format="open_clip"))
    assert not (tmp_path / "oc").exists()


def test_google_siglip_vision_tower_alone_imports_exactly_with_a_preset_text_tower(tmp_path):
    """A SiglipVisionModel folder (tanh-GELU, no tokenizer, as LLaVA-style models ship it): the image tower comes
    from the folder, the text tower from --preset."""
    from transformers import SiglipVisionModel

    cfg = shrunk(SIGLIP_CONFIGS["google/siglip-so400m-patch14-384"], vocab_size=64, image_size=42)
    torch.manual_seed(0)
    tower = SiglipVisionModel(build_hf("siglip", cfg).config.vision_config).eval()
    tower.save_pretrained(str(tmp_path / "vision"))
    run = run_export(
        ExportConfig(
            checkpoint=str(tmp_path / "vision"), output=str(tmp_path / "run"), format="import-hf", preset="tiny"
        )
    )
    model, _ = load_trained_model(run)
    model.eval()
    assert model.preset.vision_cfg["timm_model_kwargs"]["act_layer"] == "gelu_tanh"
    assert model.preset.text_cfg == load_preset("tiny").text_cfg
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tower(pixel_values=x).pooler_output
        assert (model.encode_image(x, normalize=False) - ref).abs().max() <= TOL


def test_openai_clip_vision_tower_alone_imports_exactly_with_a_gelu_preset_text_tower(tmp_path):
    """OpenAI's QuickGELU image tower with --preset tiny (GELU): open_clip has one quick_gelu flag, so the fresh
    text tower follows the image tower's activation rather than refusing."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = shrunk(CLIP_CONFIGS["openai/clip-vit-base-patch32"], image_size=64)
    torch.manual_seed(0)
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision_config"], projection_dim=48)).eval()
    tower.save_pretrained(str(tmp_path / "vision"))
    run = run_export(
        ExportConfig(
            checkpoint=str(tmp_path / "vision"), output=str(tmp_path / "run"), format="import-hf", preset="tiny"
        )
    )
    model, _ = load_trained_model(run)
    model.eval()
    assert model.preset.quick_gelu and model.preset.embed_dim == 48
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model.encode_image(x, normalize=False) - tower(pixel_values=x).image_embeds).abs().max() <= TOL
