"""Zero-shot classifiers: class texts through one template or an ensemble, normalised and averaged.

The same frozen text features serve as ``g_0(c)`` in the knowledge-preservation regularizer, so they
are cached per class name instead of being recomputed every step: the meta step draws a new class
subset for its support and query at every iteration (and stage 1 a new concept set per task), so a
cache keyed by class *set* would miss almost always.
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
    ids = ids[:, : model.text_length(ids)]  # padding after the longest EOT cannot change the features
    feats = model.encode_text(ids, prompts=None, normalize=True)  # [C * T, D]
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def zeroshot_logits(model: PromptedCLIP, images: Tensor, weights: Tensor) -> Tensor:
    """Frozen-CLIP logits ``[B, C]`` of ``images`` against a classifier from :func:`zeroshot_weights`."""
    img = model.encode_image(images, prompts=None, normalize=True)
    return model.logit_scale * img @ weights.to(img.dtype).t()


class FrozenTextCache:
    """Frozen class-text features (:func:`zeroshot_weights`) cached per class name (LRU).

    A call computes only the names it has not seen (in one batched forward) and assembles the rows;
    the assembled ``[C, D]`` tensor of the most recent class sets is kept too, so a repeated set (the
    all-class label space of stage 2) costs nothing.

    Args:
        model: the prompted CLIP whose frozen (prompt-free) text tower is used.
        templates: templates averaged per class.
        size: class names kept (each one ``embed_dim`` floats).
        sets: assembled class sets kept.
    """

    def __init__(self, model: PromptedCLIP, templates: Sequence[str] = DEFAULT_TEMPLATES, size: int = 16384,
                 sets: int = 64):
        self.model = model
        self.templates = tuple(templates)
        self.size = size
        self.sets = sets
        self._rows: OrderedDict[str, Tensor] = OrderedDict()
        self._sets: OrderedDict[tuple[str, ...], Tensor] = OrderedDict()
        self.computed = 0
        """How many class names were encoded so far (cache misses)."""

    def __call__(self, classnames: Sequence[str]) -> Tensor:
        key = tuple(classnames)
        hit = self._sets.get(key)
        if hit is not None:
            self._sets.move_to_end(key)
            return hit
        missing = [n for n in dict.fromkeys(key) if n not in self._rows]
        if missing:
            for name, row in zip(missing, zeroshot_weights(self.model, missing, self.templates)):
                self._rows[name] = row
            self.computed += len(missing)
        for name in key:
            self._rows.move_to_end(name)
        out = torch.stack([self._rows[name] for name in key])  # [C, D]
        while len(self._rows) > max(self.size, len(key)):
            self._rows.popitem(last=False)
        self._sets[key] = out
        if len(self._sets) > self.sets:
            self._sets.popitem(last=False)
        return out
