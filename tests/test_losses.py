"""Losses: cross-entropy, mixup cross-entropy, knowledge-preservation regularizer, mixup sampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.meta.losses import (
    MixupSample,
    accuracy,
    mix_features,
    mixup_cross_entropy,
    preservation_loss,
    sample_mixup,
    task_loss,
)


def test_mixup_cross_entropy_is_the_lambda_mix_of_both_labels():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    a = torch.tensor([0, 1, 2, 3, 0])
    b = torch.tensor([1, 1, 0, 2, 3])
    lam = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
    expected = torch.stack(
        [lam[i] * F.cross_entropy(logits[i : i + 1], a[i : i + 1]) + (1 - lam[i]) * F.cross_entropy(logits[i : i + 1], b[i : i + 1]) for i in range(5)]
    ).mean()
    assert torch.allclose(mixup_cross_entropy(logits, a, b, lam), expected)
    ones = torch.ones(5, dtype=torch.float64)
    assert torch.allclose(mixup_cross_entropy(logits, a, b, ones), task_loss(logits, a))


def test_preservation_loss_weights_and_values():
    img = F.normalize(torch.randn(3, 8), dim=-1)
    img0 = F.normalize(torch.randn(3, 8), dim=-1)
    txt = F.normalize(torch.randn(2, 8), dim=-1)
    txt0 = F.normalize(torch.randn(2, 8), dim=-1)
    total, t_term, i_term = preservation_loss(img, img0, txt, txt0, weight_image=20.0, weight_text=50.0)
    assert torch.allclose(t_term, 50.0 * (txt - txt0).abs().mean())
    assert torch.allclose(i_term, 20.0 * (img - img0).abs().mean())
    assert torch.allclose(total, t_term + i_term)
    zero, _, _ = preservation_loss(img, img0, txt, txt0, weight_image=0.0, weight_text=0.0)
    assert float(zero) == 0.0
    only_text, _, i_zero = preservation_loss(img, None, txt, txt0, weight_image=20.0, weight_text=1.0)
    assert float(i_zero) == 0.0 and torch.allclose(only_text, (txt - txt0).abs().mean())


def test_sample_mixup_is_seeded_and_in_range():
    a = sample_mixup(64, 5, 0.5, 0.5, torch.Generator().manual_seed(3))
    b = sample_mixup(64, 5, 0.5, 0.5, torch.Generator().manual_seed(3))
    c = sample_mixup(64, 5, 0.5, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a.lam, b.lam) and torch.equal(a.partner, b.partner)
    assert not torch.equal(a.lam, c.lam)
    assert bool(((a.lam >= 0) & (a.lam <= 1)).all())
    assert int(a.partner.min()) >= 0 and int(a.partner.max()) < 5
    # Beta(0.5, 0.5) is U-shaped: most mass near 0 and 1, mean 0.5.
    many = sample_mixup(4000, 3, 0.5, 0.5, torch.Generator().manual_seed(0)).lam
    assert abs(float(many.mean()) - 0.5) < 0.05
    assert float(((many < 0.1) | (many > 0.9)).double().mean()) > 0.35


def test_mix_features_endpoints_and_norm():
    q = F.normalize(torch.randn(3, 6, dtype=torch.float64), dim=-1)
    s = F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1)
    partner = torch.tensor([2, 0, 3])
    mixed = mix_features(q, s, MixupSample(torch.tensor([1.0, 0.0, 0.4]), partner))
    assert torch.allclose(mixed[0], q[0]) and torch.allclose(mixed[1], s[0])
    assert torch.allclose(mixed.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    direction = F.normalize(0.4 * q[2] + 0.6 * s[3], dim=0)
    assert torch.allclose(mixed[2], direction)


def test_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert math.isclose(float(accuracy(logits, torch.tensor([0, 1, 1]))), 2 / 3, rel_tol=1e-6)


def test_mixup_helpers_follow_the_features_device():
    """Mixup samples are drawn on the CPU (seeded generators); the losses must move them to the features'
    device. The meta device stands in for a GPU here: mixing devices fails there exactly as on CUDA."""
    from pipeline.meta.losses import MixupSample, mix_features, mixup_cross_entropy

    lam = torch.rand(3, dtype=torch.float64)
    sample = MixupSample(lam=lam, partner=torch.tensor([0, 1, 0]))
    mixed = mix_features(torch.randn(3, 8, device="meta"), torch.randn(2, 8, device="meta"), sample)
    labels = torch.zeros(3, dtype=torch.long, device="meta")
    loss = mixup_cross_entropy(torch.randn(3, 4, device="meta"), labels, labels, lam)
    assert mixed.device.type == "meta" and loss.device.type == "meta" and loss.shape == ()
