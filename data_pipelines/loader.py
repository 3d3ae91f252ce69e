"""Image-text batches from WebDataset shards, composed from webdataset's own stages.

Decoding is done here with PIL and UTF-8 only: members are picked by extension and nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator

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


def decode_image_text(caption_key: str = "txt", seed: int = 0, require_text: bool = True
                      ) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """A pipeline stage: raw tar samples -> {"__key__", "image": PIL RGB, "text": str|None, "json": dict|None}.

    Samples with no image or an undecodable image are skipped, and so are samples without a usable caption
    when ``require_text`` (image-only samples pass through for objectives that need no text).
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
                meta = json.loads(sample["json"]) if "json" in sample else None
            except Exception as e:  # corrupt image / bad UTF-8 / bad JSON: skip and move on
                log.debug("skipping %s: %s", sample.get("__key__"), e)
                continue
            text = text.strip() if text else None
            if require_text and not text:
                continue
            yield {"__key__": sample["__key__"], "image": image, "text": text, "json": meta}
    return stage


def build_train_loader(
    shards: str,
    sample_transform: Callable[[dict], dict],
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    shuffle_buffer: int = 1000,
    caption_key: str = "txt",
    require_text: bool = True,
    collate_fn: Callable[[list[dict]], dict] | None = None,
) -> wds.WebLoader:
    """An infinite, resampled stream of collated batches (dicts of tensors) for training.

    ``sample_transform`` turns a decoded sample into tensors (the objective decides which). Each rank and worker
    draws shards with replacement from its own seeded stream, so ranks see different samples and a run is
    reproducible for a seed.
    """
    from vlp.train.objective import collate

    pipeline = wds.DataPipeline(
        wds.ResampledShards(shards, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed * 7919 + rank)),
        decode_image_text(caption_key, seed=seed + rank, require_text=require_text),
        wds.map(sample_transform),
        wds.batched(batch_size, collation_fn=collate_fn or collate, partial=False),
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
