"""A second embedded synthetic set, unlike the demo's (data_pipelines/synthetic.py): textured objects, tag captions.

Each 64x64 image shows one, two or three copies of one object silhouette (8 kinds, none of the demo's shapes:
house, tree, fish, key, cup, boat, bell, umbrella), filled with one texture (6: dotted, checkered, striped,
wavy, grid, zigzag) inked in one hue (6: crimson, teal, amber, violet, lime, navy) over a pale or dark tint of
the same hue, outlined, on a textured low-saturation background (smooth noise, wood grain, speckle or canvas
weave). Captions mix terse tag lists ("fish, dotted, teal") with sentences in other word orders ("Close-up of
two teal fish covered in dots"), with plurals for counts. Every caption names the object; pattern, hue and count
are named in a few templates each, so hue alone cannot match most pairs. The ``json`` member holds the labels
(families object, pattern, hue, count) for zero-shot evaluation of the held-out split. Deterministic from the seed.

It exists for the SigLIP bias sweep of docs/training.md: a second dataset to check that a finding on the demo
set is not a property of that one set (docs/data.md, "A second synthetic set").
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64

OBJECTS = ["house", "tree", "fish", "key", "cup", "boat", "bell", "umbrella"]
PLURALS = {o: ("fish" if o == "fish" else o + "s") for o in OBJECTS}
PATTERNS = ["dotted", "checkered", "striped", "wavy", "grid", "zigzag"]
#: the noun phrase of each pattern in sentence captions ("covered in dots")
PATTERN_NOUNS = {
    "dotted": "dots",
    "checkered": "checks",
    "striped": "stripes",
    "wavy": "waves",
    "grid": "a grid",
    "zigzag": "zigzags",
}
HUES = {
    "crimson": (200, 20, 60),
    "teal": (0, 140, 140),
    "amber": (245, 170, 0),
    "violet": (140, 60, 220),
    "lime": (130, 220, 40),
    "navy": (20, 35, 125),
}
COUNTS = ["one", "two", "three"]

CLASS_FAMILIES: dict[str, list[str]] = {
    "object": OBJECTS,
    "pattern": PATTERNS,
    "hue": list(HUES),
    "count": COUNTS,
}

# Caption templates. {obj}: the object in the caption's number (singular or plural); {tag}: singular object;
# {pat}: pattern adjective; {patn}: pattern noun phrase; {hue}; {count}: number word. The object is in every
# caption; pattern in 5 of 12, hue in 4, count (as a word) in 4, so no one attribute besides the object matches
# most pairs. Tags and sentences put the attributes in different orders.
CAPTION_TEMPLATES = [
    "{tag}, {pat}, {hue}",
    "{tag}, {pat}",
    "{tag}, {count}",
    "{tag}",
    "tags: {tag}, texture",
    "Close-up of {count} {hue} {obj} covered in {patn}",
    "{Obj} with a {pat} pattern",
    "Texture study: {hue}, {pat}, {tag}",
    "What is shown: {count} {obj}.",
    "{Obj} in {hue}",
    "On a rough background, {count} {obj}",
    "{Obj}, {patn} all over",
]

# Zero-shot prompts per family ("{}" is the class name), cut from the caption templates above with the other
# attributes left out, so they stay in the captions' distribution (see the comment in data_pipelines/synthetic.py).
PROMPT_TEMPLATES: dict[str, list[str]] = {
    "object": ["{}", "tags: {}, texture", "What is shown: one {}."],
    "pattern": ["with a {} pattern", "{}", "texture study: {}"],
    "hue": ["in {}", "{}", "texture study: {}"],
    "count": ["close-up of {}", "What is shown: {}", "On a rough background, {}"],
}

# object centres and radius (in units of the image size) per count; each layout is flipped/rotated at random
_LAYOUTS = {
    1: ([(0.5, 0.5)], 0.30),
    2: ([(0.27, 0.5), (0.73, 0.5)], 0.19),
    3: ([(0.25, 0.28), (0.75, 0.28), (0.5, 0.74)], 0.16),
}


def _object_mask(kind: str, cx: float, cy: float, r: float, flip: bool) -> Image.Image:
    """The silhouette of one object as an L mask (255 inside), centred at (cx, cy) with half-size r."""
    s = IMAGE_SIZE
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    f = -1.0 if flip else 1.0

    def px(x: float, y: float) -> tuple[float, float]:  # (x, y) in units of r around the centre, mirrored if flip
        return (cx + f * x * r, cy + y * r)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (a, b), (c, e) = px(x0, y0), px(x1, y1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    if kind == "house":
        d.rectangle(box(-0.75, -0.1, 0.75, 0.95), fill=255)
        d.polygon([px(-1.0, -0.05), px(0.0, -0.95), px(1.0, -0.05)], fill=255)
        d.rectangle(box(0.35, -0.8, 0.6, -0.35), fill=255)  # chimney
    elif kind == "tree":
        d.polygon([px(-0.9, 0.45), px(0.0, -0.35), px(0.9, 0.45)], fill=255)
        d.polygon([px(-0.7, -0.05), px(0.0, -1.0), px(0.7, -0.05)], fill=255)
        d.rectangle(box(-0.18, 0.4, 0.18, 1.0), fill=255)
    elif kind == "fish":
        d.ellipse(box(-0.95, -0.5, 0.55, 0.5), fill=255)
        d.polygon([px(0.4, 0.0), px(1.0, -0.55), px(1.0, 0.55)], fill=255)
    elif kind == "key":
        d.ellipse(box(-1.0, -0.45, -0.1, 0.45), fill=255)
        d.ellipse(box(-0.75, -0.2, -0.35, 0.2), fill=0)
        d.rectangle(box(-0.2, -0.13, 1.0, 0.13), fill=255)
        d.rectangle(box(0.55, 0.1, 0.7, 0.45), fill=255)
        d.rectangle(box(0.82, 0.1, 0.97, 0.38), fill=255)
    elif kind == "cup":
        d.polygon([px(-0.75, -0.75), px(0.45, -0.75), px(0.3, 0.85), px(-0.6, 0.85)], fill=255)
        d.ellipse(box(0.15, -0.5, 0.95, 0.35), fill=255)
        d.ellipse(box(0.38, -0.27, 0.72, 0.12), fill=0)
        # the body again, over the handle's hole
        d.polygon([px(-0.75, -0.75), px(0.45, -0.75), px(0.3, 0.85), px(-0.6, 0.85)], fill=255)
    elif kind == "boat":
        d.polygon([px(-1.0, 0.35), px(1.0, 0.35), px(0.65, 0.9), px(-0.65, 0.9)], fill=255)
        d.rectangle(box(-0.06, -1.0, 0.06, 0.4), fill=255)
        d.polygon([px(0.12, -0.95), px(0.12, 0.25), px(0.85, 0.25)], fill=255)
    elif kind == "bell":
        d.ellipse(box(-0.5, -0.95, 0.5, 0.05), fill=255)
        d.polygon([px(-0.5, -0.45), px(0.5, -0.45), px(0.95, 0.65), px(-0.95, 0.65)], fill=255)
        d.ellipse(box(-0.2, 0.55, 0.2, 0.95), fill=255)
    elif kind == "umbrella":
        d.pieslice(box(-1.0, -0.9, 1.0, 0.9), 180, 360, fill=255)
        d.rectangle(box(-0.07, -0.05, 0.07, 0.8), fill=255)
        d.arc(box(-0.4, 0.55, 0.07, 1.0), 0, 180, fill=255, width=max(1, round(0.14 * r)))
    else:  # pragma: no cover - OBJECTS is the only source of names
        raise AssertionError(kind)
    return mask


def _pattern(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A boolean 64x64 ink mask of one texture, with a random phase and a slightly jittered period."""
    s = IMAGE_SIZE
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    x = x + rng.uniform(0, 8)
    y = y + rng.uniform(0, 8)
    p = float(rng.uniform(5.5, 7.0))  # period in pixels: several repeats fit in the smallest object
    if kind == "dotted":
        dx, dy = (x % p) - p / 2, (y % p) - p / 2
        return dx * dx + dy * dy < (0.32 * p) ** 2
    if kind == "checkered":
        q = p / 2
        return ((np.floor(x / q) + np.floor(y / q)) % 2) == 0
    if kind == "striped":  # diagonal stripes
        return ((x + y) % p) < p / 2
    if kind == "wavy":
        return ((y + 1.6 * np.sin(2 * np.pi * x / (1.8 * p))) % p) < p / 2
    if kind == "grid":
        return ((x % p) < 1.6) | ((y % p) < 1.6)
    if kind == "zigzag":
        tri = np.abs(((x / (0.9 * p)) % 2) - 1) * 2.5
        return ((y + tri) % p) < p / 2
    raise AssertionError(kind)  # pragma: no cover


def _background(rng: np.random.Generator) -> np.ndarray:
    """A textured, low-saturation background (64x64x3 uint8): none of the object textures, no flat colour."""
    s = IMAGE_SIZE
    grey = float(rng.uniform(70, 200))
    tint = rng.uniform(-18, 18, size=3)
    base = grey + tint
    kind = rng.integers(0, 4)
    if kind == 0:  # smooth blotchy noise: upsampled coarse noise
        coarse = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse).resize((s, s), Image.BICUBIC))
        img = base + 22 * field[..., None]
    elif kind == 1:  # wood grain: noisy low-frequency rings
        y, x = np.mgrid[0:s, 0:s].astype(np.float32)
        cx, cy = rng.uniform(-40, 100, size=2)
        rr = np.hypot(x - cx, y - cy) + 4 * rng.normal(0, 1, size=(s, s)).astype(np.float32).cumsum(1) / s**0.5
        img = base + 18 * np.sin(rr / rng.uniform(2.5, 4.0))[..., None]
    elif kind == 2:  # speckle
        img = base + rng.normal(0, 30, size=(s, s, 1))
    else:  # canvas weave: faint fine cross-hatch plus noise
        y, x = np.mgrid[0:s, 0:s].astype(np.float32)
        weave = np.sin(x * 2.2) * np.sin(y * 2.2)
        img = base + 12 * weave[..., None] + rng.normal(0, 10, size=(s, s, 1))
    return np.clip(img + rng.normal(0, 4, size=(s, s, 3)), 0, 255).astype(np.uint8)


def render_sample(rng: np.random.Generator) -> tuple[Image.Image, str, dict]:
    """Draw one captioned image; returns (image, caption, labels)."""
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    hue_name = list(HUES)[rng.integers(len(HUES))]
    n = int(rng.integers(1, 4))
    s = IMAGE_SIZE

    ink = np.clip(np.array(HUES[hue_name], dtype=np.float32) + rng.integers(-20, 21, size=3), 0, 255)
    # the gaps between the ink: a pale or a dark tint of the same hue, so the hue covers the whole object
    paper = ink * 0.35 + 255 * 0.65 if rng.random() < 0.6 else ink * 0.35
    fill = np.where(_pattern(pattern, rng)[..., None], ink, paper)

    img = Image.fromarray(_background(rng))
    centres, rad = _LAYOUTS[n]
    swap, mirror_x, mirror_y = rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5
    flip = bool(rng.random() < 0.5)  # all copies face the same way
    r = rad * s * float(rng.uniform(0.9, 1.08))
    mask = Image.new("L", (s, s), 0)
    for ux, uy in centres:
        if swap:
            ux, uy = uy, ux
        ux, uy = (1 - ux if mirror_x else ux), (1 - uy if mirror_y else uy)
        cx = ux * s + rng.uniform(-0.03, 0.03) * s
        cy = uy * s + rng.uniform(-0.03, 0.03) * s
        one = _object_mask(obj, cx, cy, r, flip)
        mask = Image.fromarray(np.maximum(np.asarray(mask), np.asarray(one)))
    # an outline (dark on light backgrounds, light on dark ones) keeps the silhouette readable on any texture
    outline = mask.filter(ImageFilter.MaxFilter(3))
    bg_mean = float(np.asarray(img).mean())
    img.paste((20, 20, 20) if bg_mean > 110 else (235, 235, 235), (0, 0), outline)
    img.paste(Image.fromarray(fill.astype(np.uint8)), (0, 0), mask)

    count = COUNTS[n - 1]
    noun = obj if n == 1 else PLURALS[obj]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    caption = template.format(
        tag=obj,
        obj=noun,
        Obj=(noun if n > 1 else ("an " if obj[0] in "aeiou" else "a ") + noun).capitalize(),
        pat=pattern,
        patn=PATTERN_NOUNS[pattern],
        hue=hue_name,
        count=count,
    )
    labels = {"object": obj, "pattern": pattern, "hue": hue_name, "count": count}
    return img, caption, labels


def caption_mentions(caption: str) -> dict[str, set[str]]:
    """The class names of each family that a caption names: object by singular or plural noun, pattern by adjective
    or noun phrase ("dotted" / "dots"), hue by name, count by number word (a singular "a"/"an" does not count).
    The tests check captions against their labels with it."""
    words = set(caption.lower().replace(",", " ").replace(".", " ").replace(":", " ").split())
    text = " " + " ".join(caption.lower().replace(",", " ").replace(".", " ").split()) + " "
    return {
        "object": {o for o in OBJECTS if o in words or PLURALS[o] in words},
        "pattern": {p for p in PATTERNS if p in words or f" {PATTERN_NOUNS[p]} " in text},
        "hue": {h for h in HUES if h in words},
        "count": {c for c in COUNTS if c in words},
    }
