"""Caption collation for the adapter, and the image-caption streams it trains and evaluates on.

A sample becomes ``prompt + caption + end token``, tokenised as one string (so tokens at the boundary are the
ones the tokenizer would produce for the whole text, as transformers' LlavaProcessor does), with the single image
placeholder expanded to one token per image feature position. Labels are -100 on the special prefix, the prompt
and the image positions, so only the caption and its end token are learnt. Batches are right-padded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds

from data_pipelines.loader import decode_image_text
from vlp.config import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class EncodedCaption:
    input_ids: list[int]
    labels: list[int]


class CaptionCollator:
    """Tokenise prompt + caption, expand the image token, build labels and right-padded batches."""

    def __init__(
        self,
        tokenizer,
        image_token: str,
        image_token_id: int,
        num_image_tokens: int,
        prompt: str = "<image>\n",
        max_length: int = 512,
    ) -> None:
        if prompt.count(image_token) != 1:
            raise ConfigError(f"the prompt must contain {image_token!r} exactly once, got {prompt!r}")
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.prompt = prompt
        self.max_length = max_length
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        if self.eos_id is None:
            log.warning("the tokenizer has no eos token: captions are learnt without an end token")
        prompt_len = len(self._expand(self._tokenize(prompt)[0]))
        if prompt_len >= max_length:
            raise ConfigError(
                f"llm.max_length={max_length} leaves no room for the caption: the prompt with "
                f"{num_image_tokens} image positions is already {prompt_len} tokens; raise it above "
                f"{prompt_len}"
            )
        self.prompt_length = prompt_len

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        """(ids, character offsets, special-token mask) of ``text`` with the tokenizer's special tokens.

        Tokenizers without offsets (slow, Python-only ones) fall back to tokenising the prompt and the caption
        separately, with offsets that place every caption token after the prompt.
        """
        try:
            enc = self.tokenizer(
                text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True
            )
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], list(enc["special_tokens_mask"])
        except NotImplementedError:
            pass
        if not text.startswith(self.prompt):
            raise AssertionError("text must start with the prompt")
        head = self.tokenizer(self.prompt, add_special_tokens=True, return_special_tokens_mask=True)
        tail = self.tokenizer(text[len(self.prompt) :], add_special_tokens=False)["input_ids"]
        n = len(self.prompt)
        return (
            list(head["input_ids"]) + list(tail),
            [(0, 0)] * len(head["input_ids"]) + [(n, n + 1)] * len(tail),
            list(head["special_tokens_mask"]) + [0] * len(tail),
        )

    def _expand(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        return out

    def encode(self, caption: str, with_image: bool = True) -> EncodedCaption:
        """Input ids and labels of one sample (image token expanded, truncated to ``max_length``).

        ``with_image=False`` removes the image token instead: the same caption as the LLM sees it without an image
        (the text-only reference the adapter's loss is compared with).
        """
        caption = caption.replace(self.image_token, " ").strip()
        text = self.prompt + caption
        ids, offsets, special = self._tokenize(text)
        if ids.count(self.image_token_id) != 1:
            raise AssertionError(f"expected one image token in {ids}")
        boundary = len(self.prompt)
        labels = []
        for t, (_, end), sp in zip(ids, offsets, special):
            is_caption = not sp and t != self.image_token_id and end > boundary
            labels.append(t if is_caption else IGNORE_INDEX)
        if self.eos_id is not None:
            if ids and ids[-1] == self.eos_id and special[-1]:  # the tokenizer already ends with eos: learn it
                labels[-1] = self.eos_id
            else:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
        pos = ids.index(self.image_token_id)
        n = self.num_image_tokens if with_image else 0
        ids = ids[:pos] + [self.image_token_id] * n + ids[pos + 1 :]
        labels = labels[:pos] + [IGNORE_INDEX] * n + labels[pos + 1 :]
        return EncodedCaption(ids[: self.max_length], labels[: self.max_length])

    def pad(self, encoded: list[EncodedCaption]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence: input_ids, attention_mask (0 on padding), labels (-100 on padding)."""
        length = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Samples with ``pixel_values`` [3, H, W] and ``text`` -> a model batch."""
        batch = self.pad([self.encode(s["text"]) for s in samples])
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
        return batch

    def text_only(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The captions of ``samples`` without the image: input_ids, attention_mask, labels."""
        return self.pad([self.encode(s["text"], with_image=False) for s in samples])


def held_out_batches(
    shards: str,
    image_transform: Callable,
    collator: CaptionCollator,
    num_samples: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    caption_key: str = "txt",
) -> list[dict[str, torch.Tensor]]:
    """The first ``num_samples`` held-out pairs in order, this rank's share (sample i goes to rank i mod W)."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        decode_image_text(caption_key),
    )
    samples = []
    for i, s in enumerate(pipeline):
        if i >= num_samples:
            break
        if i % world_size == rank:
            samples.append({"pixel_values": image_transform(s["image"]), "text": s["text"]})
    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = collator(chunk)
        batch.update({f"text_{k}": v for k, v in collator.text_only(chunk).items()})
        batches.append(batch)
    return batches
