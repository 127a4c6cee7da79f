"""What the inner and outer loops evaluate: labelled sets and the losses of a prompts dict on them.

One forward per labelled set serves both the task loss and the regularizer: the prompted image and
class-text features are computed once and both losses read them. Frozen features are never
recomputed per step: class texts come from a :class:`~pipeline.zeroshot.FrozenTextCache` (per class
set), image features from ``Batch.frozen_image`` when the caller has them (precomputed centre-crop
features) or from one no-grad forward per batch (:meth:`Objective.with_frozen`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pipeline.meta.config import LossConfig, validate_loss
from pipeline.meta.losses import preservation_loss, task_loss
from pipeline.prompts import PromptedCLIP, Prompts
from pipeline.zeroshot import DEFAULT_TEMPLATES, FrozenTextCache


@dataclass(frozen=True)
class Batch:
    """A labelled set (a support set, a query set or a training batch)."""

    images: Tensor
    """``[n, 3, H, W]`` preprocessed images."""
    labels: Tensor
    """``[n]`` int64 labels in ``0..len(classnames)-1``."""
    classnames: tuple[str, ...]
    """The label space: class texts (concept names in stage 1, class names in stage 2)."""
    frozen_image: Tensor | None = None
    """``[n, D]`` normalised frozen-CLIP image features (``f_0``); computed once when ``None``."""

    def __post_init__(self):
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        object.__setattr__(self, "classnames", tuple(self.classnames))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> Batch:
        """The samples at ``index`` (same label space)."""
        frozen = None if self.frozen_image is None else self.frozen_image[index]
        return Batch(self.images[index], self.labels[index], self.classnames, frozen)

    def restricted(self) -> Batch:
        """The same samples in the label space of the classes present (sorted by original label)."""
        present = torch.unique(self.labels)  # sorted
        remap = torch.full((len(self.classnames),), -1, dtype=torch.long, device=self.labels.device)
        remap[present] = torch.arange(present.numel(), device=self.labels.device)
        names = tuple(self.classnames[int(i)] for i in present.tolist())
        return Batch(self.images, remap[self.labels], names, self.frozen_image)


@dataclass
class LossTerms:
    """Losses of one prompts dict on one labelled set, from a single forward."""

    task: Tensor
    """Cross-entropy (0-dim, in the graph)."""
    reg: Tensor
    """Weighted knowledge-preservation regularizer ``R`` (0-dim, in the graph)."""
    reg_text: Tensor
    """Text part of ``R`` (weighted, detached)."""
    reg_image: Tensor
    """Image part of ``R`` (weighted, detached)."""
    logits: Tensor
    """``[n, C]`` logits."""


class Objective:
    """The frozen model, the loss weights and the frozen-feature caches; evaluates any prompts dict.

    Args:
        model: prompted CLIP (its own ``prompts`` parameters are not used here; every call takes an
            explicit prompts dict).
        cfg: loss weights and mixup settings.
        templates: templates of the frozen text features ``g_0`` (``("{}",)`` uses the raw class text,
            e.g. a caption-derived concept name).
    """

    def __init__(self, model: PromptedCLIP, cfg: LossConfig, templates: Sequence[str] = DEFAULT_TEMPLATES):
        validate_loss(cfg)
        self.model = model
        self.cfg = cfg
        self.frozen_text = FrozenTextCache(model, templates)

    @property
    def needs_frozen(self) -> bool:
        return bool(self.cfg.weight_image)

    @torch.no_grad()
    def frozen_image(self, images: Tensor) -> Tensor:
        """``[n, D]`` normalised frozen-CLIP image features (no prompts, no graph)."""
        return self.model.encode_image(images, None, normalize=True)

    def with_frozen(self, batch: Batch) -> Batch:
        """``batch`` with ``frozen_image`` filled in (one no-grad forward) when the loss needs it."""
        if batch.frozen_image is not None or not self.needs_frozen:
            return batch
        return replace(batch, frozen_image=self.frozen_image(batch.images))

    def image_features(self, prompts: Prompts, images: Tensor) -> Tensor:
        return self.model.encode_image(images, prompts, normalize=True)  # [n, D]

    def text_features(self, prompts: Prompts, classnames: Sequence[str]) -> Tensor:
        return self.model.encode_classes(classnames, prompts)  # [C, D]

    def logits(self, image: Tensor, text: Tensor) -> Tensor:
        """``s * image @ text^T``: ``[n, C]`` from normalised features."""
        return self.model.logit_scale.to(image.dtype) * image @ text.t()

    def terms(self, prompts: Prompts, batch: Batch) -> LossTerms:
        """Task loss and regularizer of ``prompts`` on ``batch`` from one image and one text forward."""
        image = self.image_features(prompts, batch.images)
        text = self.text_features(prompts, batch.classnames)
        logits = self.logits(image, text)
        text_frozen = self.frozen_text(batch.classnames) if self.cfg.weight_text else None
        image_frozen = None
        if self.cfg.weight_image:
            image_frozen = batch.frozen_image if batch.frozen_image is not None else self.frozen_image(batch.images)
        reg, reg_text, reg_image = preservation_loss(
            image, image_frozen, text, text_frozen, self.cfg.weight_image, self.cfg.weight_text
        )
        return LossTerms(
            task=task_loss(logits, batch.labels),
            reg=reg,
            reg_text=reg_text.detach(),
            reg_image=reg_image.detach(),
            logits=logits,
        )
