"""Model presets build the towers open_clip builds, and the DualTower exposes what training needs."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError, LossConfig
from vlp.model import available_presets, build_model, build_tokenizer, build_transforms, load_preset


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_presets_listed():
    assert {"tiny", "small", "vit-b-16-clip", "vit-l-14-clip", "vit-b-16-siglip", "so400m-14-siglip"} <= set(
        available_presets()
    )


def test_unknown_preset_names_valid_ones():
    with pytest.raises(ConfigError, match="unknown model preset 'vit-z'.*valid: .*tiny"):
        load_preset("vit-z")


@pytest.mark.parametrize("ours, theirs", [("vit-b-16-clip", "ViT-B-16"), ("vit-l-14-clip", "ViT-L-14")])
def test_clip_presets_match_open_clip_parameter_counts(ours, theirs):
    with torch.device("meta"):
        mine = build_model(ours, LossConfig(name="clip"))
        ref = open_clip.create_model(theirs, device="meta")
    assert n_params(mine.visual) == n_params(ref.visual)
    assert n_params(mine) == n_params(ref)
    assert [tuple(p.shape) for p in mine.clip.parameters()] == [tuple(p.shape) for p in ref.parameters()]


@pytest.mark.parametrize(
    "ours, theirs", [("vit-b-16-siglip", "ViT-B-16-SigLIP"), ("so400m-14-siglip", "ViT-SO400M-14-SigLIP")]
)
def test_siglip_presets_match_open_clip_vision_and_text_shapes(ours, theirs):
    with torch.device("meta"):
        mine = build_model(ours, LossConfig(name="siglip"))
        ref = open_clip.create_model(theirs, device="meta")
    assert n_params(mine.visual) == n_params(ref.visual)
    # Same text transformer; only the vocabulary differs (open_clip BPE 49408 rows vs SigLIP's 32000).
    width = mine.clip.text.token_embedding.weight.shape[1]
    vocab_delta = mine.clip.text.token_embedding.weight.shape[0] - ref.text.token_embedding.weight.shape[0]
    assert vocab_delta == 49408 - 32000
    assert n_params(mine.clip.text) - n_params(ref.text) == vocab_delta * width


def test_tiny_forward_and_backbone_projection():
    preset = load_preset("tiny")
    model = build_model(preset, LossConfig(name="siglip")).eval()
    tok = build_tokenizer(preset)
    images = torch.randn(3, 3, preset.image_size, preset.image_size)
    tokens = tok(["a red circle", "a blue star", "a big green square"])
    img, txt, t, b = model(images, tokens)
    assert img.shape == txt.shape == (3, preset.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert t.item() == pytest.approx(2.302585, abs=1e-5) and b.item() == -10.0
    feats = model.image_backbone_features(images)
    assert feats.shape == (3, preset.vision_cfg["width"])
    torch.testing.assert_close(F.normalize(model.project_image(feats), dim=-1), img)


def test_clip_loss_init_has_no_bias_and_clip_temperature():
    model = build_model("tiny", LossConfig(name="clip"))
    assert model.logit_bias is None
    assert model.logit_scale.item() == pytest.approx(2.659260, abs=1e-5)


def test_transforms_follow_preset():
    preset = load_preset("vit-b-16-siglip")
    tf = build_transforms(preset, is_train=False)
    from PIL import Image

    x = tf(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[0].mean(), torch.tensor(1.0))  # (1 - 0.5) / 0.5


@pytest.mark.parametrize("name, grid", [("tiny-resnet", 2), ("tiny-resnet-hr", 4)])
def test_tiny_resnet_outputs_do_not_depend_on_batch_mates(name, grid):
    """GroupNorm, not BatchNorm: a sample's embedding is the same alone or in a batch (exact multi-process)."""
    model = build_model(name, LossConfig()).train()
    images = torch.randn(5, 3, 64, 64)
    together = model.encode_image(images)
    alone = torch.cat([model.encode_image(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert model.image_backbone_features(images).shape == (5, 256)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.visual.trunk.forward_features(images).shape[-2:] == (grid, grid)  # output stride 32 / 16


def test_demo_tower_shapes():
    """tiny-resnet-hr: timm's own resnet18 builder with JSON arguments: deep stem 3 -> 32 -> 32 -> 64 whose two
    32-channel convolutions are normalised per channel (timm's GroupNorm, 32 groups), output stride 16."""
    import timm

    trunk = build_model("tiny-resnet-hr", LossConfig()).visual.trunk
    assert type(trunk) is timm.models.resnet.ResNet and trunk.pretrained_cfg["architecture"] == "resnet18"
    assert [c.out_channels for c in trunk.conv1 if isinstance(c, torch.nn.Conv2d)] == [32, 32, 64]
    assert [trunk.get_submodule(f"layer{i}")[0].conv2.out_channels for i in (1, 2, 3, 4)] == [32, 64, 128, 256]
    norms = [m for m in trunk.conv1 if isinstance(m, torch.nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(32, 32), (32, 32)]
    assert sum(p.numel() for p in trunk.parameters()) == 1265568
    # timm alone builds the same tower from the preset's name and arguments (what TimmWrapperModel does)
    vc = load_preset("tiny-resnet-hr").vision_cfg
    alone = timm.create_model(vc["timm_model_name"], num_classes=0, **vc["timm_model_kwargs"])
    assert {k: v.shape for k, v in alone.state_dict().items()} == {k: v.shape for k, v in trunk.state_dict().items()}


@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_timm_model_kwargs_that_change_the_trunk_width_resize_the_projection(proj):
    """open_clip sizes its TimmModel head for the named model's default width (resnet18: 512); a trunk narrowed by
    timm_model_kwargs (here 96 features) gets a head of its own width, with open_clip's module names."""
    import copy

    preset = copy.deepcopy(load_preset("tiny-resnet"))
    preset.vision_cfg["timm_model_kwargs"] = {**preset.vision_cfg["timm_model_kwargs"], "channels": [32, 32, 64, 96]}
    preset.vision_cfg["timm_proj"] = proj
    model = build_model(preset, LossConfig())
    first = model.visual.head.proj if proj == "linear" else model.visual.head.mlp.fc1
    assert model.visual.trunk.num_features == first.in_features == 96
    assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    names = {k.split(".")[3] for k in model.state_dict() if k.startswith("clip.visual.head.")}
    assert names == ({"proj"} if proj == "linear" else {"mlp"})
