"""vlp.centre_init: the towers' outputs centred on a batch, on every kind of tower, across ranks, and in a run."""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed_harness import run_distributed
from tests.test_pretrain import small_run_args
from vlp.centre_init import centre_outputs, image_output_map, text_output_map
from vlp.config import PRETRAIN_ALIASES, ConfigError, LossConfig, PretrainConfig, parse_cli
from vlp.model import build_model, load_preset
from vlp.train.metrics import read_metrics


def _batch(n: int = 24, seed: int = 0, context: int = 16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=g)
    tokens = torch.randint(1, 400, (n, context), generator=g)
    tokens[:, -1] = 49407  # an end token where every tokenizer of these presets puts the argmax
    return images, tokens


def _model(preset: str = "tiny-resnet-hr"):
    torch.manual_seed(0)
    return build_model(load_preset(preset), LossConfig(name="siglip", init_logit_scale=1.0, init_logit_bias=-2.0))


@pytest.mark.parametrize("preset", ["tiny-resnet-hr", "tiny"])
def test_centring_zeroes_the_batch_mean_and_removes_only_that_direction(preset):
    """On the batch it was centred on, each tower's raw outputs have mean 0 and equal y - (y.d) d, d the unit mean
    of the outputs before; the normalised embeddings no longer crowd (mean norm from > 0.5 to < 0.1)."""
    model = _model(preset)
    images, tokens = _batch(context=model.preset.text_cfg["context_length"])
    before = {"image": model.encode_image(images, False).detach(), "text": model.encode_text(tokens, False).detach()}
    keys = set(model.state_dict())
    stats = centre_outputs(model, images, tokens)
    after = {"image": model.encode_image(images, False).detach(), "text": model.encode_text(tokens, False).detach()}
    assert set(model.state_dict()) == keys
    for tower in ("image", "text"):
        y, y2 = before[tower], after[tower]
        d = F.normalize(y.mean(0), dim=0)
        torch.testing.assert_close(y2, y - torch.outer(y @ d, d), rtol=1e-4, atol=1e-5)
        assert y2.mean(0).norm() < 1e-5 * y.norm(dim=1).mean()
        assert stats[f"init/{tower}_mean_norm_before"] > 0.5
        assert stats[f"init/{tower}_mean_norm_after"] < 0.1


def test_output_maps_of_every_tower_kind():
    """The last linear map is found for open_clip's ViT and text transformer (matrix parameters), a timm tower with
    open_clip's linear head and a custom text tower's projection; a timm ViT with attention pooling and no projection
    (the SigLIP presets) has none."""
    tiny, resnet = _model("tiny").clip, _model("tiny-resnet-hr").clip
    assert image_output_map(tiny).where == "visual.proj" and text_output_map(tiny).where == "text_projection"
    assert image_output_map(resnet).where == "visual.head.proj"
    preset = load_preset("vit-b-16-siglip")
    small = {**preset.vision_cfg, "timm_model_name": "vit_tiny_patch16_224", "image_size": 32}
    text = {**preset.text_cfg, "width": 64, "heads": 2, "layers": 1}
    siglip = build_model(
        preset.__class__(**{**preset.__dict__, "embed_dim": 64, "vision_cfg": small, "text_cfg": text}),
        LossConfig(name="siglip", init_logit_scale=1.0, init_logit_bias=-2.0),
    ).clip
    assert image_output_map(siglip) is None
    assert text_output_map(siglip).where == "text.text_projection"


def _centre_on_share(rank: int, world_size: int) -> list[torch.Tensor]:
    model = _model()
    images, tokens = _batch(n=24)
    share = slice(rank * 12, (rank + 1) * 12)
    centre_outputs(model, images[share], tokens[share])
    return [model.clip.visual.head.proj.weight.detach().clone(), model.clip.text_projection.detach().clone()]


def test_two_ranks_centre_on_the_global_batch():
    """Two gloo ranks, each with half the batch, make the change one process makes on the whole batch, identically."""
    ranks = run_distributed(_centre_on_share, world_size=2)
    model = _model()
    centre_outputs(model, *_batch(n=24))
    expected = [model.clip.visual.head.proj.weight.detach(), model.clip.text_projection.detach()]
    for got in ranks:
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _first_batch_and_init(tmp_path, name, extra):
    out = tmp_path / name
    args = small_run_args(tmp_path, out, steps=1) + ["--eval.zeroshot", "false", "--train.save_first_batch", "true"]
    from vlp.train.trainer import run_pretraining

    run_pretraining(parse_cli(PretrainConfig, args + extra, PRETRAIN_ALIASES))
    first = read_metrics(out / "metrics.jsonl")[0]
    return torch.load(out / "first_batch_rank0.pt", weights_only=True), first


def test_a_siglip_run_centres_on_its_first_batch_and_still_trains_on_it(tmp_path):
    """SigLIP centres both towers by default (step-0 figures in metrics.jsonl), CLIP neither; --loss.centre_init
    image leaves the text tower as built, off turns it off; the first step's batch is the same either way."""
    batch_on, first_on = _first_batch_and_init(tmp_path, "on", [])
    batch_off, first_off = _first_batch_and_init(tmp_path, "off", ["--loss.centre_init", "off"])
    _, first_image = _first_batch_and_init(tmp_path, "image", ["--loss.centre_init", "image"])
    _, first_clip = _first_batch_and_init(tmp_path, "clip", ["--loss", "clip"])
    assert first_on["step"] == 0 and first_on["init/image_mean_norm_before"] > 0.5
    assert first_on["init/image_mean_norm_after"] < 0.3 and first_on["init/text_mean_norm_after"] < 0.3
    assert first_on["init/text_mean_norm_before"] > 0.5
    assert first_image["init/image_mean_norm_after"] < 0.3 and "init/text_mean_norm_after" not in first_image
    assert first_off["step"] == 1 and first_clip["step"] == 1
    for k in batch_on:
        torch.testing.assert_close(batch_on[k], batch_off[k])


def test_centre_init_values():
    """none / image / text / both name the towers; YAML's true and false mean both and none; anything else is an
    error that lists the valid values."""
    assert LossConfig(name="siglip").resolved_centre_towers == ("image", "text")
    assert LossConfig(name="clip").resolved_centre_towers == ()
    assert LossConfig(name="clip", centre_init="text").resolved_centre_towers == ("text",)
    assert LossConfig(name="siglip", centre_init=True).resolved_centre_towers == ("image", "text")
    assert LossConfig(name="siglip", centre_init=False).resolved_centre_towers == ()
    with pytest.raises(ConfigError, match="valid: off, image, text, both"):
        LossConfig(name="siglip", centre_init="images")


def test_pretrained_weights_and_locked_towers_are_not_centred(tmp_path):
    _first_batch_and_init(tmp_path, "base", ["--loss.centre_init", "off"])
    _, first = _first_batch_and_init(tmp_path, "from", ["--model.pretrained", str(tmp_path / "base")])
    assert "init/image_mean_norm_before" not in first
    _, first = _first_batch_and_init(tmp_path, "locked", ["--model.lock_image", "true"])
    assert "init/image_mean_norm_before" not in first and first["init/text_mean_norm_after"] < 0.3
