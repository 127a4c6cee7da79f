"""Losses of both stages, as pure functions of logits and features.

- task loss: cross-entropy of ``s * cos(f(x), g(c_y))`` logits;
- mixup cross-entropy: the loss of a mixed sample is the same convex combination of the losses of
  its two labels (``lambda * CE(y_a) + (1 - lambda) * CE(y_b)``), one lambda per sample;
- knowledge-preservation regularizer: L1 between normalised prompted features and frozen-CLIP
  features, text and image terms with their own weights (``LossConfig.weight_text`` / ``weight_image``).

Manifold mixup is applied to the *final normalised image features* (then re-normalised), not to a
hidden layer of the image tower: the frozen encoder then needs no hooks, the mixed feature lives on
the same sphere the classifier reads, and the support and query features come from one batched
forward. :func:`sample_mixup` draws the coefficients and partners once per step so a finite-difference
check (or a replay) can reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy. logits: ``[n, C]``, labels: ``[n]`` in ``0..C-1``."""
    return F.cross_entropy(logits, labels)


def mixup_cross_entropy(logits: Tensor, labels_a: Tensor, labels_b: Tensor, lam: Tensor) -> Tensor:
    """``mean_i [lam_i * CE(logits_i, a_i) + (1 - lam_i) * CE(logits_i, b_i)]``; lam: ``[n]`` in [0, 1]."""
    log_p = F.log_softmax(logits, dim=-1)  # [n, C]
    nll_a = -log_p.gather(1, labels_a[:, None]).squeeze(1)
    nll_b = -log_p.gather(1, labels_b[:, None]).squeeze(1)
    lam = lam.to(device=log_p.device, dtype=log_p.dtype)
    return (lam * nll_a + (1.0 - lam) * nll_b).mean()


def preservation_loss(
    image: Tensor | None,
    image_frozen: Tensor | None,
    text: Tensor | None,
    text_frozen: Tensor | None,
    weight_image: float,
    weight_text: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``weight_text * mean|text - text_frozen| + weight_image * mean|image - image_frozen|``.

    All features normalised; image ``[n, D]``, text ``[C, D]``. A term whose weight is zero or whose
    inputs are ``None`` contributes an exact zero. Returns ``(total, text_term, image_term)`` (weighted).
    """
    ref = image if image is not None else text
    zero = ref.new_zeros(())
    text_term = zero
    image_term = zero
    if weight_text and text is not None and text_frozen is not None:
        text_term = weight_text * (text - text_frozen.to(text.dtype)).abs().mean()
    if weight_image and image is not None and image_frozen is not None:
        image_term = weight_image * (image - image_frozen.to(image.dtype)).abs().mean()
    return text_term + image_term, text_term, image_term


@dataclass(frozen=True)
class MixupSample:
    """One draw of manifold-mixup coefficients: query sample ``i`` is mixed with support sample
    ``partner[i]`` with weight ``lam[i]`` on the query side."""

    lam: Tensor
    """``[n_query]`` mixing coefficients, ``lambda ~ Beta(a, b)``."""
    partner: Tensor
    """``[n_query]`` indices into the support set."""


def sample_mixup(
    n_query: int, n_support: int, alpha: float, beta: float, generator: torch.Generator | None = None
) -> MixupSample:
    """Draw ``lam ~ Beta(alpha, beta)`` and a uniformly random support partner per query sample.

    torch's Beta sampler takes no generator, so the Beta draw uses a numpy generator seeded from
    ``generator`` (reproducible for a seeded ``generator``).
    """
    if n_support < 1:
        raise ValueError("mixup needs at least one support sample")
    partner = torch.randint(n_support, (n_query,), generator=generator)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, beta, size=n_query))
    return MixupSample(lam=lam, partner=partner)


def mix_features(query: Tensor, support: Tensor, sample: MixupSample) -> Tensor:
    """``normalize(lam * query + (1 - lam) * support[partner])``: ``[n_query, D]``."""
    lam = sample.lam.to(device=query.device, dtype=query.dtype)[:, None]  # [n_query, 1]
    partner = sample.partner.to(query.device)
    return F.normalize(lam * query + (1.0 - lam) * support[partner], dim=-1)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions (a detached 0-dim tensor)."""
    return (logits.detach().argmax(dim=-1) == labels).float().mean()
