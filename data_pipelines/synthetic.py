"""The embedded default data: procedurally drawn captioned images, written as real WebDataset shards.

Each image shows one shape (10 kinds) in one colour (8), of one size (3), at one position (3 x 3 grid) on a
varied background (solid, two-colour gradient, stripes or noise). Captions are drawn from several templates
that mention different subsets of the attributes, so the model must learn each attribute from language. The
`json` member holds the labels, which makes the held-out split a zero-shot classification benchmark with four
class families (shape, colour, size, position). Everything is deterministic from the seed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from data_pipelines.metadata import write_shard_metadata

log = logging.getLogger(__name__)

SHAPES = ["circle", "square", "triangle", "star", "cross", "bar", "heart", "ring", "arrow", "crescent"]
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES = {"small": 0.3, "medium": 0.42, "large": 0.55}
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]

CLASS_FAMILIES: dict[str, list[str]] = {
    "shape": SHAPES,
    "color": list(COLORS),
    "size": list(SIZES),
    "position": POSITIONS,
}

# Zero-shot prompt templates per class family ("{}" is the class name): the caption templates' own phrasings with
# the other attributes left out, so the prompts are in the captions' distribution (as CLIP's "a photo of a {}"
# follows web captions). Out-of-distribution phrasings ("a drawing of a {} shape") cost up to 45 points on position.
PROMPT_TEMPLATES: dict[str, list[str]] = {
    "shape": ["a {}", "a photo of a {}", "there is a {}", "a picture showing one {}"],
    "color": ["a {} shape", "a {} object", "a {} thing"],
    "size": ["there is a {} shape", "a {} shape"],
    "position": ["a shape in the {}", "an image of a shape in the {}", "a shape at the {} of the image"],
}

# Shape is in every caption; colour, size and position in a few each. When colour is in most captions, the
# contrastive loss can match most pairs by colour alone and the image tower is slow to learn shape.
CAPTION_TEMPLATES = [
    "a {size} {color} {shape} in the {position}",
    "a photo of a {shape}",
    "a {shape} at the {position} of the image",
    "there is a {size} {shape}",
    "{size} {color} {shape}",
    "an image of a {shape} in the {position}",
    "a {size} {shape}",
    "a {shape}",
    "a {color} {shape}",
    "a picture showing one {shape} near the {position}",
]

IMAGE_SIZE = 64


@dataclass
class SyntheticData:
    """Where the synthetic shards are and what they contain."""

    root: Path
    train_shards: str
    eval_shards: str
    num_train: int
    num_eval: int
    class_families: dict[str, list[str]]
    templates: dict[str, list[str]]


def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color, bg, rot: float):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.polygon(_regular_polygon(cx, cy, r * 1.15, 4, math.pi / 4 + rot * 0.2), fill=color)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r * 1.1, 3, -math.pi / 2 + rot * 0.2), fill=color)
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.1 if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + rot * 0.2 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=color)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    elif shape == "bar":
        draw.rectangle([cx - r * 1.1, cy - r * 0.35, cx + r * 1.1, cy + r * 0.35], fill=color)
    elif shape == "heart":
        lobe = r * 0.55
        draw.ellipse([cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe], fill=color)
        draw.ellipse([cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe], fill=color)
        top = cy - r * 0.75 + lobe * 1.2
        draw.polygon([(cx - 2 * lobe + 0.5, top), (cx + 2 * lobe - 0.5, top), (cx, cy + r)], fill=color)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif shape == "arrow":
        w = r * 0.3
        draw.rectangle([cx - r, cy - w, cx + r * 0.1, cy + w], fill=color)
        draw.polygon([(cx + r * 0.1, cy - r * 0.75), (cx + r, cy), (cx + r * 0.1, cy + r * 0.75)], fill=color)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        off = r * 0.55
        draw.ellipse([cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3], fill=bg)
    else:  # pragma: no cover - the lists above are the only source of names
        raise AssertionError(shape)


def _background(rng: np.random.Generator, avoid: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A varied background far enough from the shape colour; returns pixels and its mean colour."""

    def pick() -> np.ndarray:
        while True:
            c = rng.integers(0, 256, size=3)
            if np.abs(c - np.array(avoid)).sum() > 200:
                return c

    kind = rng.integers(0, 4)
    s = IMAGE_SIZE
    c1 = pick()
    if kind == 0:
        img = np.broadcast_to(c1, (s, s, 3)).astype(np.float32)
    elif kind == 1:
        c2 = pick()
        t = np.linspace(0, 1, s, dtype=np.float32)
        t = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        img = c1 * (1 - t) + c2 * t
        img = np.broadcast_to(img, (s, s, 3))
    elif kind == 2:
        c2 = pick()
        period = int(rng.integers(4, 12))
        idx = (np.arange(s) // period) % 2
        stripes = idx[None, :] if rng.random() < 0.5 else idx[:, None]
        img = np.where(np.broadcast_to(stripes, (s, s))[..., None] == 0, c1, c2).astype(np.float32)
    else:
        img = c1 + rng.normal(0, 25, size=(s, s, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, tuple(int(v) for v in img.reshape(-1, 3).mean(0))


def render_sample(rng: np.random.Generator) -> tuple[Image.Image, str, dict]:
    """Draw one captioned image; returns (image, caption, labels)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color_name = list(COLORS)[rng.integers(len(COLORS))]
    size_name = list(SIZES)[rng.integers(len(SIZES))]
    pos_idx = int(rng.integers(len(POSITIONS)))
    color = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color_name])
    bg_pixels, bg_mean = _background(rng, color)
    img = Image.fromarray(bg_pixels)
    draw = ImageDraw.Draw(img)
    s = IMAGE_SIZE
    r = SIZES[size_name] * s / 2 * float(rng.uniform(0.9, 1.1))
    row, col = divmod(pos_idx, 3)
    margin = r * 1.15 + 1
    cells = np.linspace(margin, s - margin, 3)
    jitter = s * 0.03
    cx = float(cells[col] + rng.uniform(-jitter, jitter))
    cy = float(cells[row] + rng.uniform(-jitter, jitter))
    _draw_shape(draw, shape, cx, cy, r, color, bg_mean if shape not in ("ring", "crescent") else bg_mean, rng.random())
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    caption = template.format(shape=shape, color=color_name, size=size_name, position=POSITIONS[pos_idx])
    labels = {"shape": shape, "color": color_name, "size": size_name, "position": POSITIONS[pos_idx]}
    return img, caption, labels


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_split(
    out_dir: Path,
    prefix: str,
    num_samples: int,
    seed: int,
    shard_size: int,
    desc: str = "synthetic",
    render: Callable[[np.random.Generator], tuple[Image.Image, str, dict]] | None = None,
) -> list[Path]:
    """Write ``num_samples`` captioned images as ``prefix-NNNNNN.tar`` shards; returns the shard paths.

    ``render`` draws one sample (default: this module's :func:`render_sample`; see :func:`generators`).

    Also writes the shard metadata (``prefix.meta.json`` and ``sizes.json``, see data_pipelines.metadata).
    """
    render = render or render_sample
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    counts: dict[str, int] = {}
    num_shards = math.ceil(num_samples / shard_size)
    with tqdm(total=num_samples, desc=desc, unit="img", disable=None) as bar:
        for shard in range(num_shards):
            rng = np.random.default_rng([seed, shard])
            path = out_dir / f"{prefix}-{shard:06d}.tar"
            tmp = path.with_suffix(".tar.tmp")
            n = min(shard_size, num_samples - shard * shard_size)
            with tarfile.open(tmp, "w") as tar:
                for i in range(n):
                    img, caption, labels = render(rng)
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=90)
                    key = f"{prefix}{shard:06d}{i:06d}"
                    _add_member(tar, f"{key}.jpg", buf.getvalue())
                    _add_member(tar, f"{key}.txt", caption.encode())
                    _add_member(tar, f"{key}.json", json.dumps(labels).encode())
            os.replace(tmp, path)
            paths.append(path)
            counts[path.name] = n
            bar.update(n)
    write_shard_metadata(out_dir, prefix, counts, {"source": "vlp synthetic", "seed": seed})
    return paths


def _shard_pattern(out_dir: Path, prefix: str, num_shards: int) -> str:
    return str(out_dir / f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


def default_cache_dir() -> Path:
    """~/.cache/vlp/synthetic, or $VLP_CACHE/synthetic."""
    base = os.environ.get("VLP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlp")
    return Path(base) / "synthetic"


@dataclass(frozen=True)
class Generator:
    """One embedded synthetic set: how to draw a sample, its label families and zero-shot prompts, and the
    version prefix of its cache directories (bumped when the drawing changes, so stale caches are not reused)."""

    render_sample: Callable[[np.random.Generator], tuple[Image.Image, str, dict]]
    class_families: dict[str, list[str]]
    prompt_templates: dict[str, list[str]]
    cache_prefix: str


@functools.cache
def generators() -> dict[str, Generator]:
    """The embedded synthetic sets by name (``--data.synthetic``): "shapes" is this module's demo set, "textures"
    the second set of data_pipelines/synthetic_textures.py, "silhouettes" the self-supervised demos' set of
    data_pipelines/synthetic_silhouettes.py (built on first use: the other sets' modules import this one)."""
    from data_pipelines import synthetic_silhouettes as sil
    from data_pipelines import synthetic_textures as tex

    return {
        "shapes": Generator(render_sample, CLASS_FAMILIES, PROMPT_TEMPLATES, "v2"),
        "textures": Generator(tex.render_sample, tex.CLASS_FAMILIES, tex.PROMPT_TEMPLATES, "textures-v1"),
        "silhouettes": Generator(sil.render_sample, sil.CLASS_FAMILIES, sil.PROMPT_TEMPLATES_SHAPE, "silhouettes-v1"),
    }


def _write_synthetic(
    out: Path, gen: Generator, kind: str, num_train: int, num_eval: int, seed: int, shard_size: int
) -> None:
    """Write both splits, their label metadata and (last) the finished marker of one synthetic set into ``out``."""
    log.info("writing synthetic shards to %s", out)
    render = gen.render_sample
    marker = out / "DONE.json"
    write_split(out, "train", num_train, seed, shard_size, desc=f"synthetic {kind} train shards", render=render)
    write_split(
        out, "eval", num_eval, seed + 1_000_003, shard_size, desc=f"synthetic {kind} held-out shards", render=render
    )
    meta = {
        "kind": kind,
        "train": {"num_samples": num_train, "num_shards": math.ceil(num_train / shard_size)},
        "eval": {"num_samples": num_eval, "num_shards": math.ceil(num_eval / shard_size)},
        "class_families": gen.class_families,
        "templates": gen.prompt_templates,
    }
    (out / "classes.json").write_text(json.dumps(meta, indent=1))
    tmp = out / "DONE.json.tmp"
    tmp.write_text(json.dumps({"seed": seed}))
    os.replace(tmp, marker)


def ensure_synthetic_data(
    cache_dir: str | Path | None = None,
    num_train: int = 40000,
    num_eval: int = 1000,
    seed: int = 0,
    shard_size: int = 2000,
    kind: str = "shapes",
) -> SyntheticData:
    """Write the synthetic train/held-out shards of set ``kind`` (a key of :func:`generators`) on first use
    (reused afterwards) and describe them.

    The directory name encodes the set, sizes and seed, so different settings never mix; a finished marker makes
    an interrupted generation start over instead of reading partial shards.
    """
    if kind not in generators():
        raise ValueError(f"synthetic data set: invalid value {kind!r}; valid: {', '.join(generators())}")
    gen = generators()[kind]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"{gen.cache_prefix}-seed{seed}-train{num_train}-eval{num_eval}-shard{shard_size}"
    n_train_shards = math.ceil(num_train / shard_size)
    n_eval_shards = math.ceil(num_eval / shard_size)
    marker = out / "DONE.json"
    if not marker.is_file():
        out.mkdir(parents=True, exist_ok=True)
        # Processes that start together on one machine (two runs, or the ranks of one) take turns: the first
        # writes the shards, the others find its marker once they hold the lock.
        with FileLock(str(out / ".writing.lock")):
            if not marker.is_file():
                _write_synthetic(out, gen, kind, num_train, num_eval, seed, shard_size)
    return SyntheticData(
        root=out,
        train_shards=_shard_pattern(out, "train", n_train_shards),
        eval_shards=_shard_pattern(out, "eval", n_eval_shards),
        num_train=num_train,
        num_eval=num_eval,
        class_families=gen.class_families,
        templates=gen.prompt_templates,
    )


def synthetic_data_for(data_cfg: Any) -> SyntheticData:
    """The embedded set a run's ``data`` section names (``--data.synthetic``, its sizes and cache directory), seed 0:
    what training and the held-out evaluation of that run read."""
    return ensure_synthetic_data(
        data_cfg.synthetic_dir,
        data_cfg.synthetic_train_samples,
        data_cfg.synthetic_eval_samples,
        seed=0,
        kind=data_cfg.synthetic,
    )
