"""Zero-shot classifiers: class texts through one template or an ensemble, normalised and averaged.

The same frozen text features serve as ``g_0(c)`` in the knowledge-preservation regularizer, so they
are cached per (class set, templates) instead of being recomputed every step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.prompts import PromptedCLIP

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@torch.no_grad()
def zeroshot_weights(
    model: PromptedCLIP, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> Tensor:
    """Frozen-CLIP classifier ``[C, embed_dim]``: per class, the normalised mean of the normalised
    features of every template (no prompts)."""
    if not templates:
        raise ValueError("at least one template is needed")
    if any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' placeholder: {list(templates)}")
    texts = [t.format(name) for name in classnames for t in templates]
    device = model.clip.logit_scale.device
    ids = model.tokenizer(texts).to(device)
    feats = model.encode_text(ids, prompts=None, normalize=True)  # [C * T, D]
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def zeroshot_logits(model: PromptedCLIP, images: Tensor, weights: Tensor) -> Tensor:
    """Frozen-CLIP logits ``[B, C]`` of ``images`` against a classifier from :func:`zeroshot_weights`."""
    img = model.encode_image(images, prompts=None, normalize=True)
    return model.logit_scale * img @ weights.to(img.dtype).t()


class FrozenTextCache:
    """LRU cache of :func:`zeroshot_weights` per (class set, templates)."""

    def __init__(self, model: PromptedCLIP, templates: Sequence[str] = DEFAULT_TEMPLATES, size: int = 256):
        self.model = model
        self.templates = tuple(templates)
        self.size = size
        self._cache: OrderedDict[tuple[str, ...], Tensor] = OrderedDict()

    def __call__(self, classnames: Sequence[str]) -> Tensor:
        key = tuple(classnames)
        hit = self._cache.get(key)
        if hit is None:
            hit = zeroshot_weights(self.model, classnames, self.templates)
            self._cache[key] = hit
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return hit
