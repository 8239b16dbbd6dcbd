"""RandAugment as used for BLIP fine-tuning, on PIL images.

Behaviour follows the original BLIP ``RandomAugment``: ``num_ops`` operation names are drawn
uniformly with replacement; each drawn op is applied with probability 0.5 at level ``magnitude``
(out of :data:`MAX_LEVEL`). The original worked on numpy arrays with OpenCV; here every op is a
PIL/numpy function whose geometry matches OpenCV's pixel convention, so no OpenCV is needed.

All randomness comes from torch's global RNG, so a caller that seeds torch per sample controls it.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

MAX_LEVEL = 10
FILL_GRAY = 128
MAX_SHEAR = 0.3  # shear factor at level MAX_LEVEL
MAX_TRANSLATE_PIXELS = 10.0  # the original translates by an absolute number of pixels, not a fraction
MAX_ROTATE_DEGREES = 30.0
APPLY_PROBABILITY = 0.5

AugmentOp = Callable[[Image.Image, float], Image.Image]


def _random_sign(value: float) -> float:
    """``value`` with a sign drawn from torch's RNG (each sign with probability 1/2)."""
    return -value if torch.rand(()).item() > 0.5 else value


def _enhance_factor(level: float) -> float:
    """Enhancement factor of Brightness/Sharpness: 0.1 at level 0, 1.0 at level 5, 1.9 at level 10."""
    return level / MAX_LEVEL * 1.8 + 0.1


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    """Gray fill colour for the pixels that geometric ops uncover."""
    bands = len(img.getbands())
    return FILL_GRAY if bands == 1 else (FILL_GRAY,) * bands


def _affine(img: Image.Image, inverse: tuple[float, float, float, float, float, float]) -> Image.Image:
    """Bilinear affine warp with gray fill; ``inverse`` maps output pixel indices to input pixel indices.

    NOTE: two details make this match OpenCV's ``warpAffine`` (used by the original) pixel for pixel
    up to rounding: PIL samples at pixel centres (x + 0.5) while OpenCV uses integer indices, so the
    offsets are shifted; and OpenCV blends edge pixels with the fill colour where PIL would fill the
    whole pixel, so the image gets a one-pixel gray frame before warping.
    """
    a, b, c, d, e, f = inverse
    fill = _fill(img)
    framed = Image.new(img.mode, (img.width + 2, img.height + 2), fill)
    framed.paste(img, (1, 1))
    c_framed = c + 1.0 - 0.5 * (a + b - 1.0)
    f_framed = f + 1.0 - 0.5 * (d + e - 1.0)
    return framed.transform(
        img.size, Image.Transform.AFFINE, (a, b, c_framed, d, e, f_framed),
        resample=Image.Resampling.BILINEAR, fillcolor=fill,
    )


def _per_channel_lut(img: Image.Image, table_for_channel: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """Apply a 256-entry lookup table computed from each channel's histogram."""
    pixels = np.asarray(img)
    channels = pixels[..., None] if pixels.ndim == 2 else pixels
    out = np.empty_like(channels)
    for k in range(channels.shape[-1]):
        hist = np.bincount(channels[..., k].ravel(), minlength=256)
        out[..., k] = table_for_channel(hist)[channels[..., k]]
    return Image.fromarray(out[..., 0] if pixels.ndim == 2 else out, mode=img.mode)


def identity(img: Image.Image, level: float) -> Image.Image:
    """Leave the image unchanged."""
    return img


def auto_contrast(img: Image.Image, level: float) -> Image.Image:
    """Stretch each channel linearly so its darkest pixel is 0 and its brightest is 255."""

    def table(hist: np.ndarray) -> np.ndarray:
        present = np.flatnonzero(hist)
        low, high = present[0], present[-1]
        if high <= low:
            return np.arange(256, dtype=np.uint8)
        scale = 255.0 / (high - low)
        return (np.arange(256) * scale - low * scale).clip(0, 255).astype(np.uint8)

    return _per_channel_lut(img, table)


def equalize(img: Image.Image, level: float) -> Image.Image:
    """Histogram-equalise each channel (the same mapping as ``PIL.ImageOps.equalize``)."""

    def table(hist: np.ndarray) -> np.ndarray:
        counts = hist[hist > 0]
        step = int(counts[:-1].sum()) // 255  # the brightest occupied bin does not count
        if step == 0:
            return np.arange(256, dtype=np.uint8)
        below = np.concatenate(([step // 2], hist[:-1]))  # pixels strictly darker than each value, + rounding
        return (np.cumsum(below) // step).clip(0, 255).astype(np.uint8)

    return _per_channel_lut(img, table)


def brightness(img: Image.Image, level: float) -> Image.Image:
    """Scale pixel values by the enhance factor of ``level`` (truncating, clipped to 255)."""
    factor = _enhance_factor(level)
    lut = [min(255, int(value * factor)) for value in range(256)]
    return img.point(lut * len(img.getbands()))


def sharpness(img: Image.Image, level: float) -> Image.Image:
    """Blend with a smoothed copy; factors above 1 sharpen, below 1 blur."""
    return ImageEnhance.Sharpness(img).enhance(_enhance_factor(level))


def shear_x(img: Image.Image, level: float) -> Image.Image:
    """Horizontal shear by up to ``MAX_SHEAR`` (random sign): output (x + s*y, y) <- input (x, y)."""
    shear = _random_sign(level / MAX_LEVEL * MAX_SHEAR)
    return _affine(img, (1.0, -shear, 0.0, 0.0, 1.0, 0.0))


def shear_y(img: Image.Image, level: float) -> Image.Image:
    """Vertical shear by up to ``MAX_SHEAR`` (random sign): output (x, y + s*x) <- input (x, y)."""
    shear = _random_sign(level / MAX_LEVEL * MAX_SHEAR)
    return _affine(img, (1.0, 0.0, 0.0, -shear, 1.0, 0.0))


def translate_x(img: Image.Image, level: float) -> Image.Image:
    """Shift horizontally by up to ``MAX_TRANSLATE_PIXELS`` pixels (random sign), gray fill."""
    offset = _random_sign(level / MAX_LEVEL * MAX_TRANSLATE_PIXELS)
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0))


def translate_y(img: Image.Image, level: float) -> Image.Image:
    """Shift vertically by up to ``MAX_TRANSLATE_PIXELS`` pixels (random sign), gray fill."""
    offset = _random_sign(level / MAX_LEVEL * MAX_TRANSLATE_PIXELS)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset))


def rotate_degrees(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate counter-clockwise by ``degrees`` about the point (W/2, H/2) in pixel indices, gray fill."""
    width, height = img.size
    cx, cy = width / 2.0, height / 2.0
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # inverse of the counter-clockwise rotation (y axis points down): output index -> input index
    return _affine(img, (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy))


def rotate(img: Image.Image, level: float) -> Image.Image:
    """Rotate by up to ``MAX_ROTATE_DEGREES`` degrees (random direction), gray fill."""
    return rotate_degrees(img, _random_sign(level / MAX_LEVEL * MAX_ROTATE_DEGREES))


AUGMENT_OPS: dict[str, AugmentOp] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}


class RandomAugment:
    """Apply ``num_ops`` randomly chosen ops from ``augs``, each with probability 0.5, at ``magnitude``.

    Args:
        num_ops: ops drawn per image (uniformly, with replacement).
        magnitude: level of every op, on a 0..``MAX_LEVEL`` scale.
        augs: op names to choose from (keys of :data:`AUGMENT_OPS`); all of them when empty.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 5, augs: Sequence[str] = ()) -> None:
        unknown = [name for name in augs if name not in AUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown RandomAugment op(s) {unknown}; valid names are {sorted(AUGMENT_OPS)}")
        if num_ops < 0 or not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"RandomAugment needs num_ops >= 0 and 0 <= magnitude <= {MAX_LEVEL}, "
                             f"got num_ops={num_ops}, magnitude={magnitude}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.augs = list(augs) or list(AUGMENT_OPS)

    def __call__(self, img: Image.Image) -> Image.Image:
        chosen = torch.randint(len(self.augs), (self.num_ops,)).tolist()
        for op_index in chosen:
            if torch.rand(()).item() > APPLY_PROBABILITY:
                continue
            img = AUGMENT_OPS[self.augs[op_index]](img, self.magnitude)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, augs={self.augs})"
