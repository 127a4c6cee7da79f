"""Zero-shot classifiers: class texts through one template or an ensemble, normalised and averaged.

The same frozen text features serve as ``g_0(c)`` in the knowledge-preservation regularizer, so they
are cached per class name instead of being recomputed every step: the meta step draws a new class
subset for its support and query at every iteration (and stage 1 a new concept set per task), so a
cache keyed by class *set* would miss almost always.

Template lists in configs (``frozen_templates``) name literal templates or whole ensembles
(``@imagenet``, ``@imagenet7``, ``@promptsrc``, ``@dataset``); :func:`resolve_templates` expands them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.prompts import PromptedCLIP

DEFAULT_TEMPLATES = ("a photo of a {}.",)

# The 80 ImageNet templates of CLIP's prompt-engineering notebook (openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), in the notebook's order. Plain data on purpose:
# a test compares it with open_clip's OPENAI_IMAGENET_TEMPLATES.
_IMAGENET80 = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# CoOp's IMAGENET_TEMPLATES_SELECT (trainers/imagenet_templates.py), the 7-template ensemble that CoOp's
# zero-shot baseline and PromptSRC's variants use; open_clip calls it SIMPLE_IMAGENET_TEMPLATES.
_IMAGENET7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# The IMAGENET_TEMPLATES list of PromptSRC's and ProMetaR's code (trainers/imagenet_templates.py), which
# their trainers average into the frozen text teacher: "a photo of a {}." first, then the first 60 of
# CLIP's 80 without it, 60 in all.
_PROMPTSRC60 = ("a photo of a {}.", *(t for t in _IMAGENET80[:60] if t != "a photo of a {}."))

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": _IMAGENET80,
    "imagenet7": _IMAGENET7,
    "promptsrc": _PROMPTSRC60,
}
"""Named template ensembles, referred to as ``@name`` in template lists (:func:`resolve_templates`)."""

DATASET_TEMPLATE = "@dataset"
"""Template-list entry that stands for the dataset's own (CoOp) template."""


def resolve_templates(entries: Sequence[str], dataset_template: str) -> tuple[str, ...]:
    """The templates a template list stands for, e.g. ``frozen_templates`` of the stage configs.

    Syntax of one entry:

    - a literal template with exactly one ``{}`` (the class name), e.g. ``"a photo of a {}."``;
    - ``@name``: every template of ``TEMPLATE_SETS[name]`` (``@imagenet`` = CLIP's 80, ``@imagenet7`` =
      CoOp's 7, ``@promptsrc`` = the 60 that PromptSRC / ProMetaR average for their frozen teacher);
    - ``@dataset``: ``dataset_template`` (the dataset's CoOp template; ``"{}"`` in stage 1, where the class
      texts are concept names);
    - a set's bare name (``imagenet7``, ``dataset``): the same as ``@name``. A literal template always holds
      ``{}`` and a name never does, so the two cannot be confused; bare names save quoting on the command
      line, where YAML does not let a plain value start with ``@`` (``frozen_templates=[imagenet7]``).

    An empty list means ``(dataset_template,)``, the single-template teacher. Entries are expanded in
    order and repeats dropped (first occurrence kept), so ``["@dataset", "@imagenet7"]`` averages the
    dataset's template with CoOp's 7 without counting one twice. Raises ``ValueError`` naming the entry
    for an unknown set or a malformed template, so configs can call this at validation time.
    """
    if not entries:
        entries = (DATASET_TEMPLATE,)
    out: list[str] = []
    known = ", ".join(f"@{k}" for k in (*TEMPLATE_SETS, "dataset"))
    for entry in entries:
        if "{" not in entry and not entry.startswith("@"):  # a bare set name
            if entry not in (*TEMPLATE_SETS, "dataset"):
                raise ValueError(f"{entry!r} has no '{{}}' for the class name, and no template set has that "
                                 f"name; known sets: {known}")
            entry = f"@{entry}"
        if entry == DATASET_TEMPLATE:
            expanded: tuple[str, ...] = (dataset_template,)
        elif entry.startswith("@"):
            if entry[1:] not in TEMPLATE_SETS:
                raise ValueError(f"template set {entry!r} is unknown; known: {known}")
            expanded = TEMPLATE_SETS[entry[1:]]
        else:
            expanded = (entry,)
        for template in expanded:
            _check_template(template)
            if template not in out:
                out.append(template)
    return tuple(out)


def _check_template(template: str) -> None:
    """One ``{}`` and no other braces: ``str.format`` would fail mid-run, or give every class the same text."""
    try:
        ok = template.count("{}") == 1 and template.format("x") == template.replace("{}", "x")
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the class name and no "
                         "other braces (or be '@name' of a template set)")


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
