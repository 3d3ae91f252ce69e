"""A third embedded synthetic set for the self-supervised demos: the demo's ten shapes as light silhouettes on
plain grey, so that instances differ mainly in their shape.

In the demo set (data_pipelines/synthetic.py) an image's colour, size, position and patterned background vary as
much as its shape, and the instance-discrimination objectives (SimCLR, MoCo, BYOL, DINO) learn those cues first:
at a few hundred CPU steps their k-NN on shape stays near the random tower's (docs/ssl.md). Here every image is
one of the same ten shapes, in a light grey (brightness 190-255) on a darker grey background (brightness 60-130,
faint noise), with a continuous size (radius 0.36-0.5 of half the image), a position near the centre (up to 10%
of the image off) and the shape's own small rotation. Crops and colour jitter remove what little else differs
between two instances, so telling one image from the others mostly means telling its shape. Captions ("a star")
and the ``json`` labels (family ``shape`` only) keep it a valid image-text set and a zero-shot benchmark.
Deterministic from the seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.synthetic import IMAGE_SIZE, PROMPT_TEMPLATES, SHAPES, _draw_shape

CLASS_FAMILIES: dict[str, list[str]] = {"shape": SHAPES}
PROMPT_TEMPLATES_SHAPE: dict[str, list[str]] = {"shape": PROMPT_TEMPLATES["shape"]}
CAPTION_TEMPLATES = ["a {}", "a photo of a {}", "there is a {}", "a picture showing one {}", "a grey {}"]


def render_sample(rng: np.random.Generator) -> tuple[Image.Image, str, dict]:
    """Draw one captioned silhouette; returns (image, caption, labels)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    s = IMAGE_SIZE
    bg = int(rng.integers(60, 131))
    pixels = np.clip(bg + rng.normal(0, 4, size=(s, s, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
    img = Image.fromarray(pixels)
    fg = int(rng.integers(190, 256))
    r = s / 2 * float(rng.uniform(0.36, 0.5))
    cx, cy = (s / 2 + float(rng.uniform(-0.1, 0.1)) * s for _ in range(2))
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, (fg,) * 3, (bg,) * 3, float(rng.random()))
    caption = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(shape)
    return img, caption, {"shape": shape}
