"""Bi-level step: meta-gradients against finite differences (float64, second order), first-order
mode against an explicitly detached inner gradient, purity of the inner loop, single-pass gradients."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.config import BackboneConfig, PromptConfig
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig
from pipeline.meta.inner import inner_loop, regulated_gradient
from pipeline.meta.losses import task_loss
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.regulator import Regulator
from pipeline.meta.step import bilevel_loss, meta_step, union_label_space
from pipeline.prompts import PromptedCLIP

REL_TOL = 1e-4
# The L1 regularizer makes r = dR/dtheta piecewise constant, so the outer loss jumps by ~inner_lr * |dr|
# where a feature difference changes sign. A central difference must not straddle such a kink: the
# step is kept small (float64 round-off at 1e-6 is ~1e-10 relative, far below the tolerance).
FD_EPS = 1e-6


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(arch="tiny-vit-s", pretrained="", precision="fp64"))
    cfg = PromptConfig(type="ivlp", depth_text=3, depth_vision=3)
    return PromptedCLIP(backbone, cfg, generator=torch.Generator().manual_seed(0))


def _task(dtype=torch.float64, seed=1):
    """2-way 2-shot support; the query shares one class and brings a new one (union of 3 classes)."""
    g = torch.Generator().manual_seed(seed)
    support = Batch(torch.randn(4, 3, 32, 32, dtype=dtype, generator=g), torch.tensor([0, 0, 1, 1]), ("cat", "dog"))
    query = Batch(torch.randn(2, 3, 32, 32, dtype=dtype, generator=g), torch.tensor([0, 1]), ("dog", "bird"))
    return support, query


def _regulator(prompts, kind, seed=0):
    """A float64 regulator moved off its neutral init so every second-order path is non-zero."""
    reg = Regulator.for_prompts(prompts, RegulatorConfig(kind=kind, hidden=8)).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return reg


def _fresh(prompts, direction=None, eps=0.0):
    return {
        k: (v.detach() + (eps * direction[k] if direction else 0.0)).requires_grad_(True) for k, v in prompts.items()
    }


def _dot(a, b):
    return float(sum((a[k] * b[k]).sum() for k in a))


@pytest.mark.parametrize("kind,preservation", [("modulate", 0.0), ("transform", 0.0), ("modulate", 0.7)])
def test_meta_gradients_match_central_finite_differences(model64, kind, preservation):
    # preservation > 0: the outer loss also holds R of the adapted prompts on the query
    objective = Objective(model64, LossConfig(weight_text=5.0, weight_image=2.0, outer_preservation_weight=preservation))
    prompts = _fresh(model64.initial_prompts())
    regulator = _regulator(prompts, kind)
    support, query = _task()
    # Two inner steps and a large inner lr make the second-order terms large.
    cfg = MetaConfig(inner_steps=2, inner_lr=0.5)

    def outer(p) -> float:
        out = bilevel_loss(objective, p, regulator, support, query, cfg, torch.Generator().manual_seed(5))
        return float(out.loss.detach())

    result = meta_step(objective, prompts, regulator, support, query, cfg, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(3)

    # Along a random direction in prompt space.
    d = {k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in prompts.items()}
    fd = (outer(_fresh(prompts, d, FD_EPS)) - outer(_fresh(prompts, d, -FD_EPS))) / (2 * FD_EPS)
    ad = _dot(result.prompt_grads, d)
    rel_prompts = abs(ad - fd) / abs(fd)

    # Along a random direction in regulator-parameter space.
    names = [n for n, _ in regulator.named_parameters()]
    dr = {n: torch.randn(p.shape, dtype=p.dtype, generator=gen) for n, p in regulator.named_parameters()}

    def outer_shifted(eps: float) -> float:
        params = dict(regulator.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].add_(eps * dr[n])
        try:
            return outer(prompts)
        finally:
            with torch.no_grad():
                for n in names:
                    params[n].sub_(eps * dr[n])

    fd_r = (outer_shifted(FD_EPS) - outer_shifted(-FD_EPS)) / (2 * FD_EPS)
    ad_r = _dot(result.regulator_grads, dr)
    rel_regulator = abs(ad_r - fd_r) / abs(fd_r)
    print(f"{kind}: FD relative error prompts {rel_prompts:.2e}, regulator {rel_regulator:.2e}")
    assert rel_prompts < REL_TOL
    assert rel_regulator < REL_TOL

    # The check can fail: first-order meta-gradients (second-order terms dropped) do not match.
    first = meta_step(
        objective, prompts, regulator, support, query, MetaConfig(inner_steps=2, inner_lr=0.5, first_order=True),
        torch.Generator().manual_seed(5),
    )
    assert abs(_dot(first.prompt_grads, d) - fd) / abs(fd) > 100 * REL_TOL


def test_first_order_equals_gradient_with_detached_inner_gradient(model64):
    objective = Objective(model64, LossConfig(weight_text=5.0, weight_image=2.0, mixup=False))
    prompts = _fresh(model64.initial_prompts())
    regulator = _regulator(prompts, "modulate", seed=1)
    support, query = _task(seed=2)
    lr = 0.3
    result = meta_step(objective, prompts, regulator, support, query, MetaConfig(inner_lr=lr, first_order=True))

    # Reference written out by hand: g and r as constants, theta' = theta - lr * (g + gamma(g, r) * r).
    terms = objective.terms(prompts, support)
    keys = list(prompts)
    g = dict(zip(keys, torch.autograd.grad(terms.task, [prompts[k] for k in keys], retain_graph=True)))
    r = dict(zip(keys, torch.autograd.grad(terms.reg, [prompts[k] for k in keys])))
    G, _ = regulator.modulate({k: v.detach() for k, v in g.items()}, {k: v.detach() for k, v in r.items()})
    adapted = {k: prompts[k] - lr * G[k] for k in keys}
    classes, _, y_query = union_label_space(support, query)
    logits = objective.logits(objective.image_features(adapted, query.images), objective.text_features(adapted, classes))
    loss = task_loss(logits, y_query)
    params = [prompts[k] for k in keys] + list(regulator.parameters())
    ref = torch.autograd.grad(loss, params)
    ours = [result.prompt_grads[k] for k in keys] + list(result.regulator_grads.values())
    assert float(loss.detach()) == pytest.approx(float(result.loss), rel=1e-12)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_inner_loop_is_pure(model64):
    objective = Objective(model64, LossConfig())
    prompts = _fresh(model64.initial_prompts())
    copies = {k: v.detach().clone() for k, v in prompts.items()}
    module_params = {k: v.detach().clone() for k, v in model64.prompts.items()}
    regulator = _regulator(prompts, "modulate")
    support, _ = _task()
    result = inner_loop(lambda p: objective.terms(p, support), prompts, regulator, steps=2, lr=0.1)
    assert result.prompts is not prompts and set(result.prompts) == set(prompts)
    assert all(torch.equal(prompts[k], copies[k]) for k in prompts)  # inputs untouched
    assert all(torch.equal(model64.prompts[k], module_params[k]) for k in module_params)  # module untouched
    assert all(not torch.equal(result.prompts[k], copies[k]) for k in prompts)  # but adapted
    assert len(result.steps) == 2 and result.steps[1]["task"] < result.steps[0]["task"]
    # Same inputs, same outputs: no hidden state.
    again = inner_loop(lambda p: objective.terms(p, support), prompts, regulator, steps=2, lr=0.1)
    assert all(torch.equal(again.prompts[k], result.prompts[k]) for k in prompts)


@pytest.mark.parametrize("kind", ["modulate", "transform", "none", "constant"])
def test_single_pass_regulated_gradient_equals_two_backward_passes(model64, kind):
    objective = Objective(model64, LossConfig(weight_text=5.0, weight_image=2.0))
    prompts = _fresh(model64.initial_prompts())
    regulator = _regulator(prompts, kind)
    support, _ = _task()
    keys = list(prompts)
    terms = objective.terms(prompts, support)
    g = dict(zip(keys, torch.autograd.grad(terms.task, [prompts[k] for k in keys], retain_graph=True)))
    r = dict(zip(keys, torch.autograd.grad(terms.reg, [prompts[k] for k in keys], retain_graph=True)))
    expected, _ = regulator(g, r)
    step = regulated_gradient(terms, prompts, regulator, create_graph=False)
    for k in keys:
        assert torch.allclose(step.G[k], expected[k], rtol=1e-10, atol=1e-12)
    if kind == "modulate":
        assert float(step.stats["grad_norm_task"]) == pytest.approx(float(sum(v.pow(2).sum() for v in g.values()) ** 0.5))


def test_union_label_space_remaps_query_labels():
    support = Batch(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), ("a", "b"))
    query = Batch(torch.zeros(3, 3, 4, 4), torch.tensor([0, 1, 2]), ("c", "a", "d"))
    classes, ys, yq = union_label_space(support, query)
    assert classes == ("a", "b", "c", "d")
    assert ys.tolist() == [0, 1] and yq.tolist() == [2, 0, 3]


def test_meta_step_metrics_are_named_and_finite(model64):
    objective = Objective(model64, LossConfig())
    prompts = _fresh(model64.initial_prompts())
    regulator = Regulator.for_prompts(prompts, RegulatorConfig(hidden=8)).double()
    support, query = _task()
    result = meta_step(objective, prompts, regulator, support, query, MetaConfig(log_query_before=True))
    m = result.metrics.as_dict()
    for key in (
        "outer_loss", "support_task_before", "support_reg_before", "support_task_after", "query_loss_before",
        "query_loss_after", "query_acc_after", "gamma_mean", "gamma_std", "grad_norm_task", "grad_norm_reg",
        "grad_norm_regulated", "meta_grad_norm_prompts", "meta_grad_norm_regulator",
    ):
        assert m[key] == m[key], key  # not NaN
    assert m["gamma_mean"] == pytest.approx(0.5) and m["gamma_std"] == pytest.approx(0.0, abs=1e-7)  # neutral init
    assert m["meta_grad_norm_regulator"] > 0  # the zero-initialised output layer gets a meta-gradient
    assert set(result.regulator_grads) == {n for n, _ in regulator.named_parameters()}


def test_no_meta_step_evaluates_outer_loss_at_initial_prompts(model64):
    objective = Objective(model64, LossConfig(mixup=False))
    prompts = _fresh(model64.initial_prompts())
    regulator = Regulator.for_prompts(prompts, RegulatorConfig(hidden=8)).double()
    support, query = _task()
    result = meta_step(objective, prompts, regulator, support, query, MetaConfig(meta_step=False))
    classes, _, y_query = union_label_space(support, query)
    with torch.no_grad():
        logits = objective.logits(objective.image_features(prompts, query.images), objective.text_features(prompts, classes))
    assert float(result.loss) == pytest.approx(float(task_loss(logits, y_query)), rel=1e-10)
    assert all(float(g.abs().sum()) == 0 for g in result.regulator_grads.values())


@pytest.mark.parametrize("mixup", [True, False])
def test_outer_preservation_adds_exactly_weight_times_query_regularizer(model64, mixup):
    prompts = _fresh(model64.initial_prompts())
    regulator = _regulator(prompts, "modulate")
    support, query = _task()
    cfg = MetaConfig(inner_steps=2, inner_lr=0.5, outer_weight=1.5)
    weight = 0.7

    def outer(w):
        objective = Objective(model64, LossConfig(weight_text=5.0, weight_image=2.0, mixup=mixup,
                                                  outer_preservation_weight=w))
        return objective, bilevel_loss(objective, prompts, regulator, support, query, cfg,
                                       torch.Generator().manual_seed(5))

    _, plain = outer(0.0)
    objective, with_term = outer(weight)
    # R of the adapted prompts on the query, computed on its own: the query's images and its own class texts
    adapted = inner_loop(lambda p: objective.terms(p, objective.with_frozen(support)), prompts, regulator,
                         cfg.inner_steps, cfg.inner_lr).prompts
    reg_q = objective.terms(adapted, query).reg
    expected = float(plain.loss.detach()) + cfg.outer_weight * weight * float(reg_q.detach())
    assert float(with_term.loss.detach()) == pytest.approx(expected, rel=1e-10)
    assert float(with_term.values["query_reg_after"]) == pytest.approx(float(reg_q.detach()), rel=1e-10)
    assert "query_reg_after" not in plain.values  # off by default: today's outer loss
    assert float(reg_q.detach()) > 0


def test_support_task_before_and_after_share_the_support_label_space(model64):
    """Cross-domain-like task (the query brings a class the support lacks): with a zero inner step the
    prompts do not change, so the support loss after adaptation must equal the one before."""
    objective = Objective(model64, LossConfig())
    prompts = _fresh(model64.initial_prompts())
    regulator = _regulator(prompts, "modulate")
    support, query = _task()
    assert set(query.classnames) - set(support.classnames)  # the union label space is wider
    result = meta_step(objective, prompts, regulator, support, query, MetaConfig(inner_lr=0.0))
    m = result.metrics
    assert m.support_task_after == pytest.approx(m.support_task_before, rel=1e-10)
    with torch.no_grad():  # and both are the loss among the support's own classes
        logits = objective.logits(objective.image_features(prompts, support.images),
                                  objective.text_features(prompts, support.classnames))
    assert m.support_task_after == pytest.approx(float(task_loss(logits, support.labels)), rel=1e-10)
