"""Gradient regulator: size for ViT-B/16 shapes, neutral initialisation, invariances, configs."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.meta.config import (
    LossConfig,
    MetaConfig,
    RegulatorConfig,
    validate_loss,
    validate_meta,
    validate_regulator,
)
from pipeline.meta.regulator import Regulator, gamma_statistics

SHAPES = {"text": (3, 4, 16), "vision": (3, 4, 24)}
LIMIT = 1_600_000


def _grads(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}


def _randomise(reg: Regulator, seed: int = 0, scale: float = 0.3) -> None:
    """Move the regulator away from its neutral init so every path is active."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_parameter_count_vit_b16_ivlp_4_4_depth9():
    cfg = open_clip.get_model_config("ViT-B-16")  # architecture JSON shipped with open_clip; no download
    shapes = {"text": (9, 4, cfg["text_cfg"]["width"]), "vision": (9, 4, cfg["vision_cfg"]["width"])}
    counts = {kind: Regulator(shapes, RegulatorConfig(kind=kind)).num_parameters() for kind in ("modulate", "transform")}
    print(f"regulator parameters for ViT-B/16 IVLP 4+4 depth 9 (text 512, vision 768): {counts}")
    assert shapes == {"text": (9, 4, 512), "vision": (9, 4, 768)}
    assert counts["modulate"] == 989_952
    assert all(n <= LIMIT for n in counts.values())
    assert Regulator(shapes, RegulatorConfig(kind="none")).num_parameters() == 0
    assert Regulator(shapes, RegulatorConfig(kind="constant")).num_parameters() == 0


def test_regulator_is_fp32_and_returns_gradient_dtype():
    reg = Regulator(SHAPES, RegulatorConfig())
    assert all(p.dtype == torch.float32 for p in reg.parameters())
    g, r = _grads(0, torch.float64), _grads(1, torch.float64)
    G, gamma = reg.modulate(g, r)
    assert all(G[k].dtype == torch.float64 for k in G)
    assert all(gamma[k].dtype == torch.float32 for k in gamma)


def test_modulate_neutral_init_equals_constant():
    g, r = _grads(0), _grads(1)
    modulate = Regulator(SHAPES, RegulatorConfig(kind="modulate", gamma_init=0.3))
    constant = Regulator(SHAPES, RegulatorConfig(kind="constant", constant_gamma=0.3))
    G_m, gamma = modulate.modulate(g, r)
    G_c, _ = constant(g, r)
    for k in SHAPES:
        assert gamma[k].shape == g[k].shape
        assert torch.allclose(gamma[k], torch.full_like(gamma[k], 0.3))
        assert torch.allclose(G_m[k], G_c[k], atol=1e-6)
        assert torch.allclose(G_c[k], g[k] + 0.3 * r[k])


def test_transform_neutral_init_is_g_plus_r_and_norm_preserving():
    g, r = _grads(0), _grads(1)
    reg = Regulator(SHAPES, RegulatorConfig(kind="transform"))
    G, gates = reg(g, r)
    for k in SHAPES:
        assert torch.allclose(G[k], g[k] + r[k], atol=1e-5)
        assert torch.allclose(gates[k], torch.full_like(gates[k], 0.5))
    _randomise(reg)
    with torch.no_grad():
        for k in SHAPES:
            reg.gates[k].fill_(-30.0)  # c -> 0: pure learned direction, which keeps each row's norm
    G, _ = reg(g, r)
    for k in SHAPES:
        v = g[k] + r[k]
        assert torch.allclose(G[k].norm(dim=-1), v.norm(dim=-1), rtol=1e-5)
        assert not torch.allclose(G[k], v, atol=1e-3)  # ... but changes its direction


def test_none_kind_is_plain_sum():
    g, r = _grads(0), _grads(1)
    G, _ = Regulator(SHAPES, RegulatorConfig(kind="none"))(g, r)
    assert all(torch.equal(G[k], g[k] + r[k]) for k in SHAPES)


def test_gamma_is_invariant_to_gradient_scale_and_in_unit_interval():
    reg = Regulator(SHAPES, RegulatorConfig())
    _randomise(reg, 1, scale=0.05)
    g, r = _grads(0), _grads(1)
    _, gamma = reg.modulate(g, r)
    _, gamma_scaled = reg.modulate({k: 1e-4 * v for k, v in g.items()}, {k: 1e-4 * v for k, v in r.items()})
    for k in SHAPES:
        assert torch.allclose(gamma[k], gamma_scaled[k], atol=1e-5)
        assert bool(((gamma[k] > 0) & (gamma[k] < 1)).all())
    stats = gamma_statistics(gamma)
    assert float(stats["gamma_std"]) > 1e-3  # randomised regulator: gamma varies across elements


def test_every_regulator_parameter_gets_gradient_after_leaving_init():
    for kind in ("modulate", "transform"):
        reg = Regulator(SHAPES, RegulatorConfig(kind=kind))
        _randomise(reg, 2)
        G, _ = reg(_grads(0), _grads(1))
        loss = sum((G[k] * torch.randn_like(G[k])).sum() for k in G)
        grads = torch.autograd.grad(loss, list(reg.parameters()))
        assert all(float(t.abs().sum()) > 0 for t in grads), kind


def test_zero_initialised_output_layer_still_learns_at_init():
    reg = Regulator(SHAPES, RegulatorConfig())
    G, _ = reg(_grads(0), _grads(1))
    loss = sum((G[k] * torch.randn_like(G[k])).sum() for k in G)
    loss.backward()
    assert all(float(reg.nets[k].out.weight.grad.abs().sum()) > 0 for k in SHAPES)


@pytest.mark.parametrize(
    ("cfg", "validator", "key"),
    [
        (RegulatorConfig(kind="vnet"), validate_regulator, "regulator.kind"),
        (RegulatorConfig(gamma_init=1.0), validate_regulator, "regulator.gamma_init"),
        (RegulatorConfig(hidden=0), validate_regulator, "regulator.hidden"),
        (LossConfig(weight_text=-1.0), validate_loss, "loss.weight_text"),
        (LossConfig(mixup_alpha=0.0), validate_loss, "loss.mixup_alpha"),
        (MetaConfig(inner_steps=0), validate_meta, "meta.inner_steps"),
        (MetaConfig(n_query_classes=0), validate_meta, "meta.n_query_classes"),
    ],
)
def test_config_validation_names_the_key(cfg, validator, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validator(cfg)


def test_configs_are_frozen_and_load_through_omegaconf():
    from pipeline.config import load_config

    with pytest.raises(dataclasses.FrozenInstanceError):
        RegulatorConfig().kind = "none"  # type: ignore[misc]
    cfg = load_config(MetaConfig, overrides=["inner_lr=0.01", "first_order=true"])
    assert cfg.inner_lr == 0.01 and cfg.first_order
    with pytest.raises(ConfigError, match="inner_lrr"):
        load_config(MetaConfig, overrides=["inner_lrr=0.01"])
