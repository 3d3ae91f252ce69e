"""Augmented views for the self-supervised objectives: SimCLR, MoCo v2, BYOL/MoCo v3 (asymmetric) and DINO multi-crop.

Every view is a torchvision.transforms.v2 pipeline on the decoded PIL image, ending in a normalised float tensor.
The recipes follow the reference implementations:

- SimCLR (Chen et al., 2020, appendix A): random resized crop (area 0.08-1), flip, colour jitter of strength 1
  (0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2, Gaussian blur p=0.5 (kernel 10% of the side, sigma 0.1-2).
- MoCo v2 (Chen et al., 2020, "aug+"): crop area 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5.
- BYOL (Grill et al., 2020, table 6), also used by MoCo v3: crop area 0.08-1, jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
  grayscale p=0.2, blur p=1.0 / 0.1 and solarisation p=0.0 / 0.2 for the first / second view.
- DINO (Caron et al., 2021): the two global crops (area 0.4-1) are BYOL's two views; local crops (area 0.05-0.4,
  96 px at 224) get blur p=0.5 and no solarisation.

Blur sigmas are given for 224 px images (0.1-2.0) and scale with the image side, so a 64 px tiny preset sees the
same relative blur. Views are returned as a list of tensors; ``data_pipelines.collate.collate`` turns a batch of such
lists into one batched tensor per view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

# open_clip's (OpenAI CLIP) normalisation, used when a preset names none.
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_SIDE = 224
"""Image side at which the reference blur sigmas (0.1-2.0) and the DINO local crop size (96) are defined."""


@dataclass(frozen=True)
class ViewSpec:
    """One augmentation recipe (probabilities per view; a zero probability leaves the step out)."""

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Colour jitter strengths: brightness, contrast, saturation, hue."""
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range at the reference side of 224 px (scaled to ``size``)."""
    solarize_p: float = 0.0


def _blur_kernel(size: int) -> int:
    """An odd kernel about 10% of the image side, as in SimCLR (at least 3)."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 == 1 else k + 1


def view_transform(
    spec: ViewSpec,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
) -> v2.Compose:
    """The v2 pipeline for one view: PIL image -> normalised float tensor (3, size, size)."""
    # Crop, flip and colour jitter run on the PIL image (about twice as fast as on tensors), the rest on tensors.
    steps: list[Callable] = [
        v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, interpolation=interpolation, antialias=True),
    ]
    if spec.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(spec.flip_p))
    if spec.jitter_p > 0:
        b, c, s, h = spec.jitter
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=spec.jitter_p))
    steps.append(v2.ToImage())
    if spec.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0:
        factor = spec.size / REFERENCE_SIDE
        sigma = (spec.blur_sigma[0] * factor, spec.blur_sigma[1] * factor)
        steps.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(spec.size), sigma=sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


class MultiView:
    """Applies several view pipelines to one image: ``views(img) -> [tensor, ...]`` (one per pipeline).

    ``sizes`` lists each view's side, so a model can batch same-sized views together (DINO's multi-crop).
    """

    def __init__(self, transforms: Sequence[Callable[[Image.Image], torch.Tensor]], sizes: Sequence[int]) -> None:
        if len(transforms) != len(sizes):
            raise ValueError(f"MultiView needs one size per transform, got {len(transforms)} and {len(sizes)}")
        self.transforms = list(transforms)
        self.sizes = list(sizes)

    def __len__(self) -> int:
        return len(self.transforms)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]


def _build(specs: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float]) -> MultiView:
    return MultiView([view_transform(s, mean, std) for s in specs], [s.size for s in specs])


def simclr_spec(size: int, crop_scale: tuple[float, float] = (0.08, 1.0)) -> ViewSpec:
    """SimCLR's augmentation (colour strength 1)."""
    return ViewSpec(size, crop_scale, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)


def simclr_views(
    size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> MultiView:
    """Two views drawn from the same SimCLR distribution."""
    spec = simclr_spec(size, crop_scale)
    return _build([spec, spec], mean, std)


def moco_v2_views(
    size: int,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> MultiView:
    """Two views from MoCo v2's augmentation ("aug+")."""
    spec = ViewSpec(size, crop_scale, jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
    return _build([spec, spec], mean, std)


def byol_specs(size: int, crop_scale: tuple[float, float] = (0.08, 1.0)) -> tuple[ViewSpec, ViewSpec]:
    """BYOL's asymmetric pair: always blurred / rarely blurred and sometimes solarised."""
    first = ViewSpec(size, crop_scale, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0)
    return first, replace(first, blur_p=0.1, solarize_p=0.2)


def byol_views(
    size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> MultiView:
    """BYOL's (and MoCo v3's) two asymmetric views."""
    return _build(byol_specs(size, crop_scale), mean, std)


def default_local_size(image_size: int, patch_size: int = 1) -> int:
    """DINO's local crop side (96 at 224) scaled to ``image_size`` and rounded to a multiple of ``patch_size``."""
    side = image_size * 96 / REFERENCE_SIDE
    return max(patch_size, int(round(side / patch_size)) * patch_size)


def multicrop_views(
    global_size: int,
    local_size: int,
    num_local: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> MultiView:
    """DINO multi-crop: the two global views first (BYOL's asymmetric pair), then ``num_local`` local crops."""
    if global_scale[0] < local_scale[0]:
        raise ValueError(f"global crop scale {global_scale} should not start below local crop scale {local_scale}")
    g1, g2 = byol_specs(global_size, global_scale)
    local = ViewSpec(local_size, local_scale, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5)
    return _build([g1, g2] + [local] * num_local, mean, std)
