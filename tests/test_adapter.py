"""Adapter building blocks: projectors, tower hidden states, caption collation, label masking and the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.data import IGNORE_INDEX, CaptionCollator
from adapters.llm import build_tiny_llm, load_llm
from adapters.model import LlavaAdapter, caption_loss
from adapters.projector import build_projector, projector_depth
from adapters.testing import save_tiny_hf_vision
from adapters.vision import HFTower, OpenClipTower, TimmTower, load_vision_tower
from vlp.config import ConfigError


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("adapter_llm") / "tiny", text_steps=0)


@pytest.fixture(scope="module")
def llm(tiny_llm_dir):
    return load_llm(tiny_llm_dir)


# ---------------------------------------------------------------------------------------------------------------
# Projectors
# ---------------------------------------------------------------------------------------------------------------


def test_projector_types_shapes_and_layers():
    lin = build_projector("linear", 12, 20)
    assert [type(m) for m in lin] == [nn.Linear] and lin[0].weight.shape == (20, 12)
    mlp2 = build_projector("mlp2x_gelu", 12, 20)
    assert [type(m) for m in mlp2] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp2[0].weight.shape == (20, 12) and mlp2[2].weight.shape == (20, 20)
    mlp3 = build_projector("mlp3x_gelu", 12, 20)
    assert [type(m) for m in mlp3] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert mlp3(torch.randn(2, 5, 12)).shape == (2, 5, 20)
    assert projector_depth("mlp1x_gelu") == 1
    for bad in ("mlp", "mlp0x_gelu", "mlp2x_relu", "conv"):
        with pytest.raises(ConfigError, match="valid: linear, mlp2x_gelu"):
            build_projector(bad, 4, 4)


# ---------------------------------------------------------------------------------------------------------------
# Vision towers: hidden-state indexing follows transformers' hidden_states (0 = embeddings after pre-norm)
# ---------------------------------------------------------------------------------------------------------------


def test_open_clip_tower_hidden_states_match_open_clip_blocks():
    tower = load_vision_tower(None, "tiny", feature_layer=-2, select="patch")
    assert isinstance(tower, OpenClipTower)
    visual = tower.visual
    x = torch.randn(2, 3, 64, 64)
    states = tower.hidden_states(x)
    assert len(states) == tower.num_layers + 1 == 4
    with torch.no_grad():
        emb = visual._embeds(x)
        _, inter = visual.transformer.forward_intermediates(emb, indices=[0, 1, 2])
    torch.testing.assert_close(states[0], emb, rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(states[i + 1], inter[i], rtol=0, atol=0)
    feats = tower(x)  # layer -2 = output of block 2 of 3, class token dropped
    assert feats.shape == (2, 64, 128) and tower.num_positions == 64
    torch.testing.assert_close(feats, inter[1][:, 1:], rtol=0, atol=0)
    tower.select = "cls_patch"
    assert tower(x).shape == (2, 65, 128) and tower.num_positions == 65
    assert not feats.requires_grad and not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training


def test_timm_tower_without_class_token_needs_full_selection():
    import timm

    trunk = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        class_token=False,
        global_pool="avg",
        num_classes=0,
    )
    visual = nn.Module()
    visual.trunk = trunk
    tower = TimmTower(visual, preset=None, source={"kind": "test"}, feature_layer=1, select="full").freeze()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inter = trunk.forward_intermediates(x, indices=[0, 1, 2], norm=False, intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(tower(x), inter[0], rtol=0, atol=0)
    assert tower.num_positions == 16 and tower.num_prefix_tokens == 0
    with pytest.raises(ConfigError, match="use vision.select=full"):
        TimmTower(visual, None, {}, -2, "patch").freeze()


def test_hf_tower_layers_and_errors(tmp_path):
    folder = save_tiny_hf_vision(tmp_path / "clip", "clip", image_size=32, patch_size=8, layers=3)
    tower = load_vision_tower(str(folder), feature_layer=-2, select="patch")
    assert isinstance(tower, HFTower) and tower.num_positions == 16 and tower.hidden_size == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hs = tower.model(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hs) == 4
    torch.testing.assert_close(tower(x), hs[-2][:, 1:], rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"valid: -4\.\.3"):
        load_vision_tower(str(folder), feature_layer=4)
    with pytest.raises(ConfigError, match="does not exist"):
        load_vision_tower(str(tmp_path / "missing"))
    sig = save_tiny_hf_vision(tmp_path / "sig", "siglip", image_size=32, patch_size=8)
    with pytest.raises(ConfigError, match="no class token|needs a class token"):
        load_vision_tower(str(sig), select="cls_patch")
    assert load_vision_tower(str(sig), select="full").num_positions == 16


# ---------------------------------------------------------------------------------------------------------------
# Collation, label masking, padding, truncation
# ---------------------------------------------------------------------------------------------------------------


def _hand_built(tok, image_id: int, n_img: int, caption: str) -> tuple[list[int], list[int]]:
    """bos, n image tokens, '\\n', caption, eos; labels only on caption + eos (tokens built piece by piece)."""
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    cap = tok(caption, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id] + [image_id] * n_img + newline + cap + [tok.eos_token_id]
    labels = [IGNORE_INDEX] * (1 + n_img + len(newline)) + cap + [tok.eos_token_id]
    return ids, labels


def test_collator_labels_padding_and_truncation(llm):
    tok = llm.tokenizer
    n_img = 5
    col = CaptionCollator(tok, "<image>", llm.image_token_id, n_img, "<image>\n", max_length=64)
    caps = ["a large red star in the top left", "a circle"]
    batch = col.pad([col.encode(c) for c in caps])
    for i, cap in enumerate(caps):
        ids, labels = _hand_built(tok, llm.image_token_id, n_img, cap)
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["labels"][i, :n].tolist() == labels
        assert batch["attention_mask"][i].sum().item() == n
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"] == llm.image_token_id).sum().item() == 2 * n_img
    # truncation cuts the caption's end, never the image positions
    short = CaptionCollator(tok, "<image>", llm.image_token_id, n_img, "<image>\n", max_length=10)
    enc = short.encode(caps[0])
    full_ids, full_labels = _hand_built(tok, llm.image_token_id, n_img, caps[0])
    assert enc.input_ids == full_ids[:10] and enc.labels == full_labels[:10]
    with pytest.raises(ConfigError, match="leaves no room for the caption"):
        CaptionCollator(tok, "<image>", llm.image_token_id, n_img, "<image>\n", max_length=7)
    with pytest.raises(ConfigError, match="exactly once"):
        CaptionCollator(tok, "<image>", llm.image_token_id, n_img, "describe:", max_length=64)
    # an image token inside a caption is not expanded a second time
    assert col.encode("a <image> square").input_ids.count(llm.image_token_id) == n_img


def test_loss_is_mean_cross_entropy_over_caption_tokens_only(llm):
    """A hand-built two-sample batch: the loss is the mean CE over caption (+ end) tokens, nothing else."""
    torch.manual_seed(0)
    tower = load_vision_tower(None, "tiny")
    projector = build_projector("mlp2x_gelu", tower.hidden_size, llm.model.config.hidden_size)
    model = LlavaAdapter(tower, projector, llm.model, llm.image_token_id)
    col = CaptionCollator(llm.tokenizer, "<image>", llm.image_token_id, tower.num_positions, "<image>\n", 128)
    caps = ["a small blue ring at the bottom of the image", "a cross"]
    pixels = torch.randn(2, 3, 64, 64)
    batch = col([{"pixel_values": pixels[i], "text": c} for i, c in enumerate(caps)])
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    loss, value = caption_loss(logits, batch["labels"])

    # by hand: caption token positions from the hand-built layout, log-softmax at the preceding position
    nll, count = [], 0
    for i, cap in enumerate(caps):
        ids, labels = _hand_built(llm.tokenizer, llm.image_token_id, tower.num_positions, cap)
        first = labels.index(next(t for t in labels if t != IGNORE_INDEX))
        n_cap = len(ids) - first
        assert n_cap == len(llm.tokenizer(cap, add_special_tokens=False)["input_ids"]) + 1
        for p in range(first, len(ids)):
            nll.append(-F.log_softmax(logits[i, p - 1].double(), -1)[ids[p]])
            count += 1
        # padding does not change a shorter sample's logits: run it alone
        alone = col([{"pixel_values": pixels[i], "text": cap}])
        solo = model(alone["pixel_values"], alone["input_ids"], alone["attention_mask"])
        torch.testing.assert_close(solo[0], logits[i, : len(ids)], rtol=1e-5, atol=1e-5)
    expected = torch.stack(nll).mean()
    print(
        f"caption loss {value:.6f}, hand-built mean CE over {count} caption tokens {expected.item():.6f}: "
        f"|diff| {abs(value - expected.item()):.3g}"
    )
    assert abs(value - expected.item()) < 1e-5
    assert abs(loss.item() - expected.item()) < 1e-5
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # gradient reaches the projector only
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in llm.model.parameters())


def test_image_token_added_to_an_llm_without_one(tmp_path):
    folder = build_tiny_llm(tmp_path / "llm", image_token="<img>", text_steps=0)
    a = load_llm(folder, image_token="<image>")
    b = load_llm(folder, image_token="<image>")
    emb = a.model.get_input_embeddings().weight
    assert len(a.tokenizer) == emb.shape[0] == a.image_token_id + 1
    torch.testing.assert_close(emb[-1], emb[:-1].mean(0), rtol=0, atol=0)
    head = a.model.get_output_embeddings().weight
    torch.testing.assert_close(head[-1], head[:-1].mean(0), rtol=0, atol=0)
    assert torch.equal(emb, b.model.get_input_embeddings().weight)  # deterministic
    assert a.tokenizer.encode("<image>", add_special_tokens=False) == [a.image_token_id]
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        load_llm(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def test_adapter_configs_and_cli_errors():
    from pathlib import Path

    from adapters.config import ADAPTER_ALIASES, AdapterConfig
    from vlp.config import parse_cli

    root = Path(__file__).resolve().parents[1] / "configs" / "adapter"
    tiny = parse_cli(AdapterConfig, ["--config", str(root / "tiny.yaml")], ADAPTER_ALIASES)
    assert tiny.vision.tower is None and tiny.llm.path is None and tiny.train.steps == 100
    stage1 = parse_cli(
        AdapterConfig,
        ["--config", str(root / "llava-stage1.yaml"), "--tower", "/m/clip", "--llm", "/m/llm", "--deepspeed", "zero2"],
        ADAPTER_ALIASES,
    )
    assert (stage1.optim.lr, stage1.optim.weight_decay, stage1.optim.warmup_ratio) == (1e-3, 0.0, 0.03)
    assert stage1.projector.type == "mlp2x_gelu" and stage1.vision.feature_layer == -2
    assert stage1.export.format == "llava" and stage1.vision.tower == "/m/clip" and stage1.train.deepspeed == "zero2"
    defaults = AdapterConfig()
    assert (defaults.optim.lr, defaults.optim.weight_decay, defaults.optim.warmup_ratio) == (1e-3, 0.0, 0.03)
    assert defaults.train.precision == "auto"
    with pytest.raises(ConfigError, match="valid: patch, cls_patch, full"):
        parse_cli(AdapterConfig, ["--select", "cls"], ADAPTER_ALIASES)
    with pytest.raises(ConfigError, match="exactly once"):
        parse_cli(AdapterConfig, ["--llm.prompt", "describe:"], ADAPTER_ALIASES)
    with pytest.raises(ConfigError, match="valid: projector, llava"):
        parse_cli(AdapterConfig, ["--format", "gguf"], ADAPTER_ALIASES)
    # a projector LlavaForConditionalGeneration cannot hold is refused when the command line is read
    with pytest.raises(ConfigError, match="'mlp3x_gelu' cannot be exported to LlavaForConditionalGeneration"):
        parse_cli(AdapterConfig, ["--projector", "mlp3x_gelu", "--format", "llava"], ADAPTER_ALIASES)
    assert parse_cli(AdapterConfig, ["--projector", "mlp3x_gelu"], ADAPTER_ALIASES).projector.type == "mlp3x_gelu"
    assert parse_cli(AdapterConfig, ["--projector", "linear", "--format", "llava"], ADAPTER_ALIASES)
    with pytest.raises(ConfigError, match="unknown projector type 'mlp2x_relu'"):
        parse_cli(AdapterConfig, ["--projector", "mlp2x_relu"], ADAPTER_ALIASES)


def test_llava_projector_refused_before_training(tmp_path):
    """A config changed after parsing is checked again before anything is built or trained."""
    from adapters.config import AdapterConfig
    from vlp.train.trainer import run_training

    cfg = AdapterConfig(output_dir=str(tmp_path / "run"))
    cfg.projector.type, cfg.export.format = "mlp4x_gelu", "llava"
    with pytest.raises(ConfigError, match="'mlp4x_gelu' cannot be exported.*--format projector"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_precision_bf16_on_gpu_fp32_on_cpu(monkeypatch):
    from adapters.objective import compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_dtype("auto") == ("no", torch.float32)
    assert compute_dtype("fp32") == ("no", torch.float32)
    with pytest.raises(ConfigError, match="train.precision=bf16 needs a GPU"):
        compute_dtype("bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_dtype("auto") == ("bf16", torch.bfloat16)
    assert compute_dtype("fp16") == ("fp16", torch.float16)
