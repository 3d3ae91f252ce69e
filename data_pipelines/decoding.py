"""Turning raw tar members into decoded samples, safely: PIL for images, UTF-8/JSON for text, nothing else.

Shards come from the internet, so nothing is ever unpickled: members are picked by extension from an allow-list
(images, the caption member, ``json``); members with pickle-based extensions (``pyd``, ``pickle``, ``pth`` ...)
are not even read from the tar, only counted.
"""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image
from webdataset.tariterators import base_plus_ext

from data_pipelines.faults import FaultCounter

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: extensions whose usual loaders unpickle (webdataset's .pyd/.pickle, torch's .pth/.pt, numpy's object arrays)
UNSAFE_EXTENSIONS = frozenset(
    {"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "bin", "npy", "npz", "joblib", "dill", "cpkl"}
)


def caption_member(caption_key: str) -> str | None:
    """The member extension holding the caption ('txt'), or None when it is a field of ``json``."""
    if caption_key.startswith("json:"):
        if not caption_key[5:]:
            from vlp.config import ConfigError

            raise ConfigError("data.caption_key 'json:' needs a field name, e.g. json:caption")
        return None
    if not caption_key or "." in caption_key:
        from vlp.config import ConfigError

        raise ConfigError(
            f"data.caption_key {caption_key!r} is not valid; use a member extension such as 'txt' or 'json:FIELD'"
        )
    return caption_key.lower()


def wanted_extensions(caption_key: str) -> frozenset[str]:
    """Member extensions the reader keeps: images, the caption member and json (labels, json captions)."""
    member = caption_member(caption_key)
    return frozenset(IMAGE_EXTENSIONS) | {"json"} | ({member} if member else set())


def is_unsafe(suffix: str) -> bool:
    """Whether a member suffix ('jpg', 'seg.pth') ends in a pickle-based extension."""
    return suffix.rsplit(".", 1)[-1].lower() in UNSAFE_EXTENSIONS


def safe_members(faults: FaultCounter) -> Callable[[str], bool]:
    """``select_files`` for webdataset's tar readers: pickle-based members are skipped unread (and counted)."""

    def select(fname: str) -> bool:
        _, suffix = base_plus_ext(fname)
        if suffix and is_unsafe(suffix):
            faults.note("ignored_unsafe_members")
            return False
        return True

    return select


def _choice_index(n: int, *salt: Any) -> int:
    return zlib.crc32(":".join(map(str, salt)).encode()) % n


def decode_sample(
    raw: dict[str, Any], caption_key: str, require_text: bool, faults: FaultCounter, salt: Any = 0
) -> dict[str, Any] | None:
    """A raw sample (member extension -> bytes) -> {"__key__", "image": PIL RGB, "text", "json"}, or None.

    A None is a skipped sample, counted in ``faults`` by kind. When the caption is a list (``json:FIELD`` holding
    several captions) one is drawn by a hash of ``salt`` and the key, so a resumed run draws the same one.
    """
    key = raw.get("__key__", "?")
    img_key = next((k for k in IMAGE_EXTENSIONS if k in raw), None)
    if img_key is None:
        faults.fail("missing_image", f"{key} has members {sorted(k for k in raw if not k.startswith('__'))}")
        return None
    meta = None
    text = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as e:
            if caption_key.startswith("json:") and require_text:
                faults.fail("bad_caption", f"{key}.json: {e}")
                return None
    if caption_key.startswith("json:"):
        value = meta.get(caption_key[5:]) if isinstance(meta, dict) else None
        if isinstance(value, list):
            value = [v for v in value if isinstance(v, str) and v.strip()]
            value = value[_choice_index(len(value), salt, key)] if value else ""
        text = value if isinstance(value, str) else None
    else:
        data = raw.get(caption_key)
        if data is not None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if require_text:
                    faults.fail("bad_caption", f"{key}.{caption_key}: {e}")
                    return None
    if text is not None:
        text = text.strip()
    if require_text and text is None:
        faults.fail("missing_caption", f"{key} has no {caption_key}")
        return None
    if require_text and not text:
        faults.fail("empty_caption", f"{key}")
        return None
    try:
        image = Image.open(io.BytesIO(raw[img_key]))
        if image.mode == "RGB":
            image.load()
        else:
            image = (image.convert("RGBA") if image.mode == "P" else image).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt image
        faults.fail("corrupt_image", f"{key}.{img_key}: {e}")
        return None
    return {"__key__": key, "image": image, "text": text or None, "json": meta}


def decode_image_text(
    caption_key: str = "txt", seed: int = 0, require_text: bool = True
) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """A webdataset pipeline stage: raw tar samples -> {"__key__", "image": PIL RGB, "text": str|None, "json"}.

    Samples with no image or an undecodable image are skipped (and counted in ``stage.faults``), and so are
    samples without a usable caption when ``require_text``; image-only samples pass through otherwise.
    """
    caption_member(caption_key)

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        faults = stage.faults
        for raw in samples:
            unsafe = [k for k in raw if not k.startswith("__") and is_unsafe(k)]
            if unsafe:
                faults.note("ignored_unsafe_members", len(unsafe))
            out = decode_sample(raw, caption_key, require_text, faults, salt=seed)
            if out is not None:
                faults.ok()
                yield out

    stage.faults = FaultCounter(max_consecutive_failures=10**9)
    return stage
