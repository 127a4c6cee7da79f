"""Named training augmentations for few-shot fine-tuning, built from the backbone's preprocessing.

Stage 2 used to train on open_clip's ``preprocess_train`` (``RandomResizedCrop(scale=(0.9, 1))``, no
flip), a far milder augmentation than the CoOp/Dassl recipe that ProMetaR and IVLP results are reported
with (``random_resized_crop`` at Dassl's default scale ``(0.08, 1)`` + ``random_flip`` + ``normalize``).
With 16 shots per class the difference matters, so the recipe's augmentation is a named preset that each
dataset chooses (``DatasetInfo.augment`` in :mod:`pipeline.data.datasets_meta`, docs/ARCHITECTURE.md
section 5):

- ``coop``: ``RandomResizedCrop(size, scale=(0.08, 1))`` + ``RandomHorizontalFlip()``; natural images.
- ``noflip``: the same crop without the flip, for glyphs and digits, where a mirror image is another
  symbol (or none) and flipping would teach the wrong label.
- ``open_clip``: the backbone's own ``preprocess_train``, unchanged (the former behaviour).

Image size, interpolation and normalisation come from the backbone (open_clip's preprocessing config),
so the crops match what the frozen model expects.
"""

from __future__ import annotations

from collections.abc import Callable

import open_clip
from PIL import Image
from torchvision import transforms as T

from pipeline.backbone import Backbone

AUGMENT_PRESETS = ("coop", "noflip", "open_clip")
"""Names :func:`train_transform` accepts."""

COOP_CROP_SCALE = (0.08, 1.0)
"""Dassl's ``INPUT.RRCROP_SCALE`` default, which CoOp, IVLP, PromptSRC and ProMetaR keep."""

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def train_transform(backbone: Backbone, preset: str) -> Callable:
    """The training transform (PIL image -> normalised tensor) of augmentation ``preset``.

    ``preset`` is one of :data:`AUGMENT_PRESETS` (see the module docstring); anything else raises
    ``ValueError`` listing the known names. ``coop`` and ``noflip`` crop to the backbone's image size
    with its interpolation and normalise with its mean and std; ``open_clip`` returns
    ``backbone.preprocess_train`` itself. The result pickles, so DataLoader workers can use it.
    """
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; known: {', '.join(AUGMENT_PRESETS)}")
    if preset == "open_clip":
        return backbone.preprocess_train
    cfg = open_clip.get_model_preprocess_cfg(backbone.model)
    interpolation = _INTERPOLATION.get(cfg.get("interpolation", "bicubic"), T.InterpolationMode.BICUBIC)
    steps: list[Callable] = [T.RandomResizedCrop(cfg["size"], scale=COOP_CROP_SCALE, interpolation=interpolation)]
    if preset == "coop":
        steps.append(T.RandomHorizontalFlip())
    steps += [_to_rgb, T.ToTensor(), T.Normalize(mean=cfg["mean"], std=cfg["std"])]
    return T.Compose(steps)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grey or RGBA inputs as RGB (what the 3-channel patch embedding needs); a module function so it pickles."""
    return image if image.mode == "RGB" else image.convert("RGB")
