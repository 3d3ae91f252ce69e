"""Retrieval recall equals a brute-force reference, on random features and end to end on captioned shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.eval_fixtures import tiny_model, write_labelled_copies
from vlp.eval.engine import EvalOptions, EvalSet, ZeroShotModel, evaluate
from vlp.eval.retrieval import retrieval_metrics
from vlp.eval.sources import WebDatasetSource


def brute_force_recall(img: torch.Tensor, txt: torch.Tensor, owner: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Rank by counting strictly better candidates, one query at a time, in float64."""
    img, txt = img.double(), txt.double()
    out = {}
    for k in ks:
        hits = 0
        for i in range(img.shape[0]):
            s = txt @ img[i]
            ranks = [int((s > s[j]).sum()) for j in range(len(owner)) if owner[j] == i]
            hits += bool(ranks) and min(ranks) < k
        out[f"image_to_text_R{k}"] = hits / img.shape[0]
        hits = 0
        for j in range(txt.shape[0]):
            s = img @ txt[j]
            hits += int((s > s[owner[j]]).sum()) < k
        out[f"text_to_image_R{k}"] = hits / txt.shape[0]
    return out


def test_recall_equals_brute_force_with_several_captions_per_image():
    g = torch.Generator().manual_seed(3)
    n_img, dim = 40, 16
    counts = torch.randint(1, 4, (n_img,), generator=g).tolist()
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    perm = torch.randperm(len(owner), generator=g).tolist()  # captions in any order
    owner = [owner[p] for p in perm]
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    # captions close to their image, so recall is far from both 0 and 1
    txt = F.normalize(img[owner] + 1.2 * torch.randn(len(owner), dim, generator=g), dim=-1)
    ours = retrieval_metrics(img, txt, torch.tensor(owner), chunk_size=7)
    ref = brute_force_recall(img, txt, owner)
    assert ours["num_images"] == 40 and ours["num_captions"] == len(owner) == sum(counts)
    for key, value in ref.items():
        assert ours[key] == value, key
    assert 0.1 < ours["image_to_text_R1"] < 0.9 and ours["image_to_text_R10"] >= ours["image_to_text_R5"]
    # counting every caption of an image: one caption per image would give a lower image->text recall
    first = {}
    for j, i in enumerate(owner):
        first.setdefault(i, j)
    keep = sorted(first.values())
    single = retrieval_metrics(img, txt[keep], torch.tensor([owner[j] for j in keep]))
    assert single["image_to_text_R5"] <= ours["image_to_text_R5"]


def test_bad_mapping_is_an_error():
    x = F.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="index of an existing image"):
        retrieval_metrics(x, x, torch.tensor([0, 1, 3]))


def test_engine_retrieval_on_captioned_shards_equals_brute_force(synthetic_data, tmp_path):
    from PIL import Image

    from vlp.model import build_tokenizer, build_transforms

    copies = write_labelled_copies(synthetic_data.eval_shards, tmp_path)
    model = tiny_model("clip")
    zs = ZeroShotModel.from_dual_tower(model)
    source = WebDatasetSource(copies.shards, caption_key="json:captions", name="captions")
    res = evaluate(zs, [EvalSet(source, {}, retrieval="captions")], EvalOptions(batch_size=64)).results
    ours = res["retrieval"]["captions"]
    assert ours["num_images"] == 100 and ours["num_captions"] == 200  # two captions per image
    # reference: embed independently, one image and one caption list at a time
    import io

    tf, tok = build_transforms(model.preset, is_train=False), build_tokenizer(model.preset)
    with torch.no_grad():
        img = torch.cat([model.encode_image(tf(Image.open(io.BytesIO(b)).convert("RGB"))[None]) for b in copies.jpegs])
        caps = [c for cs in copies.captions for c in cs]
        txt = model.encode_text(tok(caps))
    owner = [i for i, cs in enumerate(copies.captions) for _ in cs]
    ref = brute_force_recall(img, txt, owner)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert res["model"]["logit_bias"] is None
