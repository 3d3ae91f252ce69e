"""Image-text batches from WebDataset shards, composed from webdataset's own stages.

Decoding is done here with PIL and UTF-8 only: members are picked by extension and nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _caption(sample: dict, caption_key: str, rng: random.Random) -> str | None:
    if caption_key.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            return None
        value = json.loads(raw).get(caption_key[5:])
        if isinstance(value, list):
            value = rng.choice(value) if value else None
        return value if isinstance(value, str) else None
    raw = sample.get(caption_key)
    return raw.decode("utf-8") if raw is not None else None


def decode_image_text(caption_key: str = "txt", seed: int = 0) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """A pipeline stage: raw tar samples -> {"__key__", "image": PIL RGB, "text": str, "json": dict|None}.

    Samples with no image, an undecodable image or an empty caption are skipped.
    """
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(seed)
        for sample in samples:
            img_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
            if img_key is None:
                continue
            try:
                image = Image.open(io.BytesIO(sample[img_key]))
                image = image.convert("RGB")
                text = _caption(sample, caption_key, rng)
            except Exception as e:  # corrupt image / bad UTF-8 / bad JSON: skip and move on
                log.debug("skipping %s: %s", sample.get("__key__"), e)
                continue
            if not text or not text.strip():
                continue
            meta = json.loads(sample["json"]) if "json" in sample else None
            yield {"__key__": sample["__key__"], "image": image, "text": text.strip(), "json": meta}
    return stage


def build_image_text_loader(
    shards: str,
    image_transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    shuffle_buffer: int = 1000,
    caption_key: str = "txt",
) -> wds.WebLoader:
    """An infinite, resampled stream of (images, tokens) batches for training.

    Each rank and worker draws shards with replacement from its own seeded stream, so ranks see different
    samples and a run is reproducible for a seed.
    """
    pipeline = wds.DataPipeline(
        wds.ResampledShards(shards, seed=seed * 1000 + rank, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed * 7919 + rank)),
        decode_image_text(caption_key, seed=seed + rank),
        wds.map(lambda s: (image_transform(s["image"]), tokenizer([s["text"]])[0])),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def build_eval_samples(shards: str) -> Iterator[dict]:
    """Every sample of a held-out shard set once, in order, decoded (image, text, json labels)."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        decode_image_text(),
    )
    return iter(pipeline)


def _collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, tokens = zip(*samples)
    return torch.stack(images), torch.stack(tokens)
