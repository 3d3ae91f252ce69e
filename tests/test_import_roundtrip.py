"""Import -> fine-tune -> export: a transformers SigLIP checkpoint (tanh-GELU, SentencePiece tokenizer) imported,
trained 20 steps by the Trainer from the imported run (--model.pretrained), exported to transformers, and loaded
there: equal to vlp's trained model within 1e-5."""

from __future__ import annotations

import torch

from tests.helpers import reset_accelerate
from tests.hf_fixtures import CORPUS, SIGLIP_CONFIGS, build_hf, save_hf, sentencepiece_tokenizer, shrunk
from vlp.checkpointing import load_trained_model
from vlp.config import PretrainConfig, from_dict
from vlp.export import ExportConfig, run_export
from vlp.model import build_tokenizer

TOL = 1e-5


def test_import_train_export_round_trip(tmp_path):
    from transformers import AutoTokenizer, SiglipModel

    from vlp.train.trainer import run_pretraining

    tok_dir = sentencepiece_tokenizer(tmp_path)
    hf = build_hf("siglip", shrunk(SIGLIP_CONFIGS["google/siglip-base-patch16-224"], vocab_size=64, image_size=32))
    processor = {
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": 32, "width": 32},
        "do_center_crop": False,
        "resample": 3,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    folder = save_hf(hf, tmp_path / "siglip", tok_dir, processor)
    imported = run_export(ExportConfig(checkpoint=str(folder), output=str(tmp_path / "imported"), format="import-hf"))
    cfg = from_dict(
        PretrainConfig,
        {
            "model": {"name": str(imported / "preset.yaml"), "pretrained": str(imported)},
            "loss": {"name": "siglip"},
            "output_dir": str(tmp_path / "run"),
            "train": {"steps": 20, "batch_size": 8},
            "optim": {"warmup_steps": 1},
            "data": {
                "synthetic_dir": str(tmp_path / "syn"),
                "synthetic_train_samples": 200,
                "synthetic_eval_samples": 50,
                "workers": 0,
            },
        },
    )
    reset_accelerate()
    summary = run_pretraining(cfg)
    reset_accelerate()
    assert summary["steps"] == 20 and summary["final_loss"] < summary["first_loss"]
    trained, _ = load_trained_model(tmp_path / "run")
    trained.eval()
    start, _ = load_trained_model(imported)
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(trained.state_dict().values(), start.state_dict().values(), strict=True)
    )
    assert moved > 1e-3  # the 20 steps changed the weights
    out = run_export(ExportConfig(checkpoint=str(tmp_path / "run"), output=str(tmp_path / "export"), format="hf-full"))
    loaded = SiglipModel.from_pretrained(str(out)).eval()
    ids = AutoTokenizer.from_pretrained(str(out))(CORPUS, padding="max_length", max_length=64, return_tensors="pt")[
        "input_ids"
    ]
    assert torch.equal(ids, build_tokenizer(trained.preset)(CORPUS))  # the trained run's tokenizer, exported
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = loaded.get_image_features(pixel_values=x)
        txt = loaded.get_text_features(input_ids=ids)
        img, txt = (getattr(o, "pooler_output", o) for o in (img, txt))
        assert (img - trained.encode_image(x, normalize=False)).abs().max() <= TOL
        assert (txt - trained.encode_text(ids, normalize=False)).abs().max() <= TOL
    assert torch.allclose(loaded.logit_scale.reshape(()), trained.logit_scale.reshape(()), atol=0, rtol=0)
    assert torch.allclose(loaded.logit_bias.reshape(()), trained.logit_bias.reshape(()), atol=0, rtol=0)
    card = (out / "README.md").read_text()
    assert "zeroshot" not in card or "top1" in card
    assert str(folder) in card  # base model: the imported checkpoint
