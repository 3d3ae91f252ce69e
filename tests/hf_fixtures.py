"""Offline stand-ins for published checkpoints: the real configs (full size for meta-device checks, shrunk for
numbers), random weights, and tokenizers of the same kind (SentencePiece for SigLIP, Gemma BPE for SigLIP 2) built
here from a small corpus, since nothing can be downloaded."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

CORPUS = [
    "a photo of a red circle",
    "a photo of a blue square",
    "a small green triangle on the left",
    "a large yellow star at the top",
    "two cats sitting on a sofa",
    "a dog running in the park",
    "an image of a purple hexagon",
    "a drawing of an orange diamond",
    "the quick brown fox jumps over the lazy dog",
    "a picture of a white cross in the middle",
    "a black ring at the bottom right",
    "a cyan ellipse, very small!",
]

# transformers config.json contents of the published checkpoints (the fields that decide the structure).
OPENAI_CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
CLIP_CONFIGS = {
    "openai/clip-vit-base-patch32": dict(
        projection_dim=512,
        text_config=OPENAI_CLIP_TEXT,
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
    ),
    "openai/clip-vit-base-patch16": dict(
        projection_dim=512,
        text_config=OPENAI_CLIP_TEXT,
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
    ),
    "openai/clip-vit-large-patch14-336": dict(
        projection_dim=768,
        text_config=dict(OPENAI_CLIP_TEXT, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
    ),
}
_SIGLIP_BASE_TEXT = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=64,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    pad_token_id=1,
    eos_token_id=1,
)
SIGLIP_CONFIGS = {
    "google/siglip-base-patch16-224": dict(
        text_config=_SIGLIP_BASE_TEXT,
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
    ),
    "google/siglip-so400m-patch14-384": dict(
        text_config=dict(
            _SIGLIP_BASE_TEXT, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16
        ),
        vision_config=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
    ),
    # SigLIP 2 fixed-resolution releases are SiglipModel checkpoints with the Gemma tokenizer (256k vocabulary).
    "google/siglip2-base-patch16-224": dict(
        text_config=dict(_SIGLIP_BASE_TEXT, vocab_size=256000, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
    ),
}


def shrunk(cfg: dict, vocab_size: int | None = None, image_size: int | None = None) -> dict:
    """The same structure (activation, eps, pooling, patch size) at a width and depth a CPU test can afford."""
    cfg = copy.deepcopy(cfg)
    for key, sub in (("vision_config", cfg["vision_config"]), ("text_config", cfg["text_config"])):
        ratio = sub["intermediate_size"] / sub["hidden_size"]
        sub.update(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=int(64 * ratio))
        if key == "vision_config" and image_size:
            sub["image_size"] = image_size
    if vocab_size:
        cfg["text_config"]["vocab_size"] = vocab_size
    if "projection_dim" in cfg:
        cfg["projection_dim"] = 48
    return cfg


def build_hf(kind: str, cfg: dict, seed: int = 0):
    """A random-weight transformers CLIPModel / SiglipModel (eval mode) from a config dict."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(**cfg))
    else:
        model = SiglipModel(SiglipConfig(**cfg))
        with torch.no_grad():  # random, not the init constants, so that a swapped scale/bias shows
            model.logit_scale.fill_(2.1)
            model.logit_bias.fill_(-3.7)
    return model.eval()


def sentencepiece_tokenizer(out: Path, vocab_size: int = 64):
    """A SiglipTokenizer (SentencePiece unigram model, pad = eos = </s>) trained on CORPUS, saved to ``out``."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    out.mkdir(parents=True, exist_ok=True)
    text = out / "corpus.txt"
    text.write_text("\n".join(CORPUS * 4) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out / "sp"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    tok = SiglipTokenizer(vocab_file=str(out / "sp.model"), model_max_length=64)
    folder = out / "tokenizer"
    tok.save_pretrained(str(folder))
    return folder


def gemma_tokenizer(out: Path, vocab_size: int = 160):
    """A GemmaTokenizer (byte-fallback BPE, as SigLIP 2's) trained on CORPUS with the tokenizers library."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import GemmaTokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(
        CORPUS * 4,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
        show_progress=False,
    )
    model = json.loads(sp.to_str())["model"]
    tok = GemmaTokenizer(
        vocab=model["vocab"],
        merges=[tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]],
        model_max_length=64,
    )
    folder = out / "gemma"
    tok.save_pretrained(str(folder))
    return folder


def save_hf(model, folder: Path, tokenizer_dir: Path | None = None, processor: dict | None = None) -> Path:
    """``save_pretrained`` the model (plus the tokenizer files and an image processor) into ``folder``."""
    import shutil

    model.save_pretrained(str(folder))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
    if processor is not None:
        from vlp.export.hf import image_processor

        image_processor(processor).save_pretrained(str(folder))
    return folder


NO_VLP_PRELUDE = """
import importlib.abc, sys
class _NoVlp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('vlp', 'data_pipelines', 'adapters'):
            raise ImportError('vlp is blocked in this process: ' + name)
sys.meta_path.insert(0, _NoVlp())
sys.path = [p for p in sys.path if p not in ('', '.', {cwd!r})]
try:
    import vlp  # noqa
    raise SystemExit('vlp importable')
except ImportError:
    pass
"""


def run_without_vlp(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which vlp, data_pipelines and adapters cannot be imported (a meta-path
    blocker, and the checkout off sys.path); the code must end by asserting that none of them is in sys.modules."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    full = (
        NO_VLP_PRELUDE.format(cwd=root)
        + code
        + ("\nassert not [m for m in sys.modules if m.split('.')[0] in ('vlp', 'data_pipelines', 'adapters')]\n")
    )
    return subprocess.run(
        [sys.executable, "-c", full], capture_output=True, text=True, env=env, timeout=timeout, cwd="/"
    )
