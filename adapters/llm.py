"""The frozen causal LLM: loading from a local folder, the image placeholder token, and the embedded tiny Llama.

Any Hugging Face causal LM works (``AutoModelForCausalLM`` / ``AutoTokenizer``). The embedded default is a tiny
Llama, randomly initialised and then trained for a few seconds as a text-only language model of synthetic-style
captions, with a byte-level BPE tokenizer trained on the same text; it is written to a folder and loaded back
through the same Auto classes, exactly as a real LLM would be.

Why the short text training: a frozen *untrained* Llama cannot be taught captions through its input embeddings
alone. Its output head is random with small weights, so the logits any input can produce span about a nat, and in
our measurements the held-out caption loss of a projector trained into a random tiny Llama plateaus about 14% below
its first value (600 steps). A tiny model that already speaks the caption language is the situation of a real LLM:
the projector has to turn image features into input embeddings the LLM can use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlp.config import ConfigError

log = logging.getLogger(__name__)

TINY_LLAMA_VERSION = "v2"
TINY_LLAMA_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
TINY_VOCAB_SIZE = 512
TINY_TEXT_STEPS = 200


@dataclass
class LoadedLLM:
    """A frozen causal LM with its tokenizer and the id of the image placeholder token."""

    model: nn.Module
    tokenizer: object
    image_token: str
    image_token_id: int
    path: str
    grad_checkpointing: bool = False


def _tiny_corpus(n: int, seed: int) -> list[str]:
    """Synthetic-style captions covering every word the synthetic shards use."""
    from data_pipelines.synthetic import CAPTION_TEMPLATES, COLORS, POSITIONS, SHAPES, SIZES

    rng = random.Random(seed)
    out = []
    for i in range(n):
        template = CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)]
        out.append(
            template.format(
                shape=rng.choice(SHAPES),
                color=rng.choice(list(COLORS)),
                size=rng.choice(list(SIZES)),
                position=rng.choice(POSITIONS),
            )
        )
    return out


def _train_text_lm(
    model: nn.Module, tokenizer, texts: list[str], steps: int, batch_size: int = 32, lr: float = 3e-3
) -> float:
    """Next-token training of ``model`` on ``texts`` (each followed by eos); returns the last batch's loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        start = (step * batch_size) % len(texts)
        chunk = texts[start : start + batch_size]
        enc = tokenizer([t + tokenizer.eos_token for t in chunk], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss)


def build_tiny_llm(
    folder: str | Path,
    seed: int = 0,
    image_token: str = "<image>",
    text_steps: int = TINY_TEXT_STEPS,
    text_prefix: str = "\n",
) -> Path:
    """Write the embedded tiny Llama and its tokenizer to ``folder`` (deterministic for a seed on one machine).

    The tokenizer is a byte-level BPE trained on synthetic-style captions, with ``<s>`` (prepended), ``</s>``,
    ``<pad>`` and the image placeholder as special tokens. The model is randomly initialised, then trained for
    ``text_steps`` steps as a language model of ``text_prefix + caption`` (the adapter's prompt without the image;
    0 keeps it untrained). Written to a temporary folder, then renamed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    specials = ["<s>", "</s>", "<pad>", image_token]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_tiny_corpus(4000, seed), trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=TINY_LLAMA_SHAPE["max_position_embeddings"],
    )
    tokenizer.add_tokens([image_token], special_tokens=True)
    tokenizer.save_pretrained(tmp)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **TINY_LLAMA_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        texts = [text_prefix + c for c in _tiny_corpus(20000, seed + 1)]
        text_loss = _train_text_lm(model, tokenizer, texts, text_steps) if text_steps > 0 else None
    model.save_pretrained(tmp)
    info = {
        "version": TINY_LLAMA_VERSION,
        "fingerprint": corpus_fingerprint(),
        "seed": seed,
        "text_steps": text_steps,
        "text_loss": text_loss,
    }
    (tmp / "vlp_tiny_llm.json").write_text(json.dumps(info))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def corpus_fingerprint() -> str:
    """A short hash of what the tiny Llama is built from (the synthetic caption language and the build recipe), so
    that a changed synthetic data definition rebuilds it."""
    import hashlib

    from data_pipelines import synthetic

    parts = [
        TINY_LLAMA_VERSION,
        TINY_LLAMA_SHAPE,
        TINY_VOCAB_SIZE,
        TINY_TEXT_STEPS,
        synthetic.CAPTION_TEMPLATES,
        synthetic.SHAPES,
        list(synthetic.COLORS),
        list(synthetic.SIZES),
        synthetic.POSITIONS,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def default_tiny_llm_dir(seed: int = 0) -> Path:
    """~/.cache/vlp/tiny_llama/<version>-<fingerprint>-seed<seed> (or under $VLP_CACHE)."""
    base = os.environ.get("VLP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlp")
    return Path(base) / "tiny_llama" / f"{TINY_LLAMA_VERSION}-{corpus_fingerprint()}-seed{seed}"


def ensure_tiny_llm(folder: str | Path | None = None, seed: int = 0) -> Path:
    """The embedded tiny Llama's folder, built on first use (and rebuilt when its recipe or corpus changed)."""
    folder = Path(folder) if folder else default_tiny_llm_dir(seed)
    marker = folder / "vlp_tiny_llm.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("fingerprint") != corpus_fingerprint():
        log.info("building the tiny Llama and its tokenizer in %s", folder)
        build_tiny_llm(folder, seed)
    return folder


def add_image_token(model: nn.Module, tokenizer, image_token: str) -> int:
    """Make ``image_token`` one special token of ``tokenizer`` and a row of the model's embeddings.

    When the token is new, the embedding table (and an untied output head) grows by one row set to the mean of
    the existing rows, deterministically, so reloading the same LLM reproduces the same weights.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"llm.image_token {image_token!r} does not encode to a single token (got {ids})")
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        out_emb = model.get_output_embeddings()
        tied = out_emb is not None and out_emb.weight is model.get_input_embeddings().weight
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(0, keepdim=True)
            out_emb = model.get_output_embeddings()
            if out_emb is not None and not tied:
                w = out_emb.weight
                w[old:] = w[:old].mean(0, keepdim=True)
                if getattr(out_emb, "bias", None) is not None:
                    out_emb.bias[old:] = out_emb.bias[:old].mean()
        log.info("added %s to the tokenizer; embeddings resized %d -> %d", image_token, old, len(tokenizer))
    return ids[0]


def load_llm(
    path: str | Path, image_token: str = "<image>", dtype: torch.dtype | None = None, grad_checkpointing: bool = False
) -> LoadedLLM:
    """A frozen (eval mode, no gradients) causal LM and its tokenizer from a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"llm.path {str(path)!r} is not a Hugging Face model folder (no config.json); pass a "
            "local folder holding a causal LM and its tokenizer, or leave it unset for the tiny Llama"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    image_token_id = add_image_token(model, tokenizer, image_token)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{path}: the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    model.eval()
    return LoadedLLM(model, tokenizer, image_token, image_token_id, str(path), grad_checkpointing)
