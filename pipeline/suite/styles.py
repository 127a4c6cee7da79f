"""Image style operators: the "domains" of the suite.

Each operator is a pure function ``op(image, strength, rng) -> image`` on an RGB PIL image of dark ink on
a light background; it never modifies its input, and with a generator seeded the same way it returns the
same image. ``strength`` is in the units the operator documents; lengths are in pixels *of a 32 px image*
(:data:`REFERENCE_SIZE`) and scale with the image, so a style means the same at any render size. Strength
0 returns the image unchanged for every operator.

A *style* is a tuple of ``(operator name, strength)`` pairs applied in order (:func:`apply_style`), e.g.
``(("thicken", 1.0), ("noise", 0.1))``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

REFERENCE_SIZE = 32
"""Lengths in strengths are pixels of an image this wide."""

Style = tuple[tuple[str, float], ...]


def _unit(im: Image.Image) -> float:
    return im.width / REFERENCE_SIZE


def _odd(r: float) -> int:
    return 2 * max(0, round(r)) + 1


def thicken(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Grow dark strokes by ``strength`` px on each side (a min filter); negative values thin them.
    The width is rounded to whole pixels of ``im`` (steps of 1/4 px for a 128 px image)."""
    k = _odd(abs(strength) * _unit(im))
    if k == 1:
        return im.copy()
    return im.filter(ImageFilter.MinFilter(k) if strength > 0 else ImageFilter.MaxFilter(k))


def outline(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Hollow strokes: a dark contour ``strength`` px wide around the ink, the ink itself turned
    background (light)."""
    k = _odd(strength * _unit(im))
    if k == 1:
        return im.copy()
    a = np.asarray(im, dtype=np.float32)
    grown = np.asarray(im.filter(ImageFilter.MinFilter(k)), dtype=np.float32)
    ink = 1.0 - a.mean(axis=2, keepdims=True) / 255.0  # 1 = full ink
    out = grown * (1 - ink) + 255.0 * ink
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def noise(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian noise with standard deviation ``strength * 255`` per pixel of the 32 px reference
    grid (grey: same for R, G, B; blocks of ``width / 32`` px in a larger image, so downsampling to 32 px
    keeps the noise level)."""
    if strength == 0:
        return im.copy()
    a = np.asarray(im, dtype=np.float32)
    h, w = a.shape[:2]
    grid = (max(1, round(h / _unit(im))), max(1, round(w / _unit(im))))
    n = rng.normal(0.0, strength * 255.0, size=grid).astype(np.float32)
    n = np.asarray(Image.fromarray(n).resize((w, h), Image.NEAREST))[..., None]
    return Image.fromarray((a + n).clip(0, 255).astype(np.uint8))


def elastic(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Elastic distortion: a smooth random displacement field of up to about ``strength`` px."""
    if strength == 0:
        return im.copy()
    w, h = im.size
    coarse = 4  # displacement defined on a 4x4 grid, bicubically upsampled: smooth bends, not jitter
    field = []
    for _ in range(2):
        g = rng.uniform(-1.0, 1.0, size=(coarse, coarse)).astype(np.float32)
        f = np.asarray(Image.fromarray(g).resize((w, h), Image.BICUBIC))
        field.append(f * strength * _unit(im))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sx = np.clip(np.rint(xx + field[0]), 0, w - 1).astype(int)
    sy = np.clip(np.rint(yy + field[1]), 0, h - 1).astype(int)
    a = np.asarray(im)
    return Image.fromarray(a[sy, sx])


def texture(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """A patterned background: random-angle stripes darkening the light areas by up to ``strength``
    (0..1) of full ink; the ink stays darkest."""
    if strength == 0:
        return im.copy()
    w, h = im.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / _unit(im)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 6.0)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)
    a = np.asarray(im, dtype=np.float32)
    bg = 255.0 * (1.0 - strength * stripes)[..., None]
    return Image.fromarray(np.minimum(a, bg).clip(0, 255).astype(np.uint8))


def invert(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Blend towards the negative: 1 = light ink on a dark background, 0.5 = flat grey."""
    if strength == 0:
        return im.copy()
    a = np.asarray(im, dtype=np.float32)
    return Image.fromarray(((1 - strength) * a + strength * (255.0 - a)).clip(0, 255).astype(np.uint8))


def colour(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Tint: ink and background move by ``strength`` (0..1) towards two random colours."""
    if strength == 0:
        return im.copy()
    a = np.asarray(im, dtype=np.float32) / 255.0
    ink_c, bg_c = rng.uniform(0, 1, size=3) * 0.6, 0.4 + rng.uniform(0, 1, size=3) * 0.6
    lum = a.mean(axis=2, keepdims=True)  # 0 = ink, 1 = background
    tinted = ink_c * (1 - lum) + bg_c * lum
    out = (1 - strength) * a + strength * tinted
    return Image.fromarray((out * 255).clip(0, 255).astype(np.uint8))


def blur(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur of radius ``strength`` px."""
    if strength == 0:
        return im.copy()
    return im.filter(ImageFilter.GaussianBlur(strength * _unit(im)))


def shear(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Horizontal shear by a factor ``strength`` (random sign) around the image centre."""
    if strength == 0:
        return im.copy()
    s = strength * (1 if rng.random() < 0.5 else -1)
    w, h = im.size
    return im.transform((w, h), Image.AFFINE, (1, s, -s * h / 2, 0, 1, 0), resample=Image.BILINEAR,
                        fillcolor=(255, 255, 255))


OPERATORS = {"thicken": thicken, "outline": outline, "noise": noise, "elastic": elastic,
             "texture": texture, "invert": invert, "colour": colour, "blur": blur, "shear": shear}
"""Operator name -> function."""


def check_style(style: Style) -> None:
    """Raise ``ValueError`` for an unknown operator name or a non-numeric strength."""
    for item in style:
        if len(item) != 2 or item[0] not in OPERATORS or not isinstance(item[1], (int, float)):
            raise ValueError(f"bad style step {item!r}: expected (name, strength) with name in {sorted(OPERATORS)}")


def apply_style(im: Image.Image, style: Style, seed: int | np.random.Generator) -> Image.Image:
    """Apply each ``(operator, strength)`` of ``style`` in order; deterministic given ``seed``."""
    check_style(style)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = im.convert("RGB")
    for name, strength in style:
        out = OPERATORS[name](out, float(strength), rng)
    return out if out is not im else im.copy()
