"""Stage-2 ProMetaR iteration: class split, the regularized step, ablation switches, non-finite guard."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import PromptConfig
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig
from pipeline.meta.inner import regulated_gradient
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.prometar import prometar_iteration, split_by_class
from pipeline.meta.regulator import Regulator
from pipeline.prompts import PromptedCLIP

CLASSES = ("cat", "dog", "car", "tree", "boat")


def _setup(backbone, kind="modulate", seed=0):
    model = PromptedCLIP(backbone, PromptConfig(type="ivlp", depth_text=3, depth_vision=3), generator=torch.Generator().manual_seed(seed))
    prompts = model.initial_prompts()
    regulator = Regulator.for_prompts(prompts, RegulatorConfig(kind=kind, hidden=16))
    return model, prompts, regulator


def _batch(seed=0, labels=(0, 1, 2, 3)):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    return Batch(torch.randn(len(labels), 3, 32, 32, generator=g), labels, CLASSES)


def _optimizers(prompts, regulator, lr=0.0025):
    sgd = torch.optim.SGD(list(prompts.values()), lr=lr)
    params = list(regulator.parameters())
    adamw = torch.optim.AdamW(params, lr=RegulatorConfig().lr) if params else None
    return sgd, adamw


def test_split_by_class_holds_out_whole_classes():
    batch = _batch(labels=(0, 0, 1, 1, 2, 3))
    for seed in range(5):
        support, query = split_by_class(batch, 2, torch.Generator().manual_seed(seed))
        s, q = set(support.labels.tolist()), set(query.labels.tolist())
        assert len(q) == 2 and not s & q and s | q == {0, 1, 2, 3}
        assert len(support) + len(query) == 6 and support.classnames == CLASSES
    support, query = split_by_class(batch, 1, torch.Generator().manual_seed(0), restrict=True)
    assert len(query.classnames) == 1 and len(support.classnames) == 3
    assert set(support.classnames) | set(query.classnames) == {"cat", "dog", "car", "tree"}
    for part in (support, query):  # labels remapped into each part's own label space, names kept
        assert int(part.labels.max()) < len(part.classnames)
        original = [CLASSES[int(i)] for i in batch.labels[torch.isin(batch.labels, torch.tensor([CLASSES.index(c) for c in part.classnames]))]]
        assert [part.classnames[int(i)] for i in part.labels] == original
    support, query = split_by_class(_batch(labels=(0, 1)), 5)  # capped: one class stays in the support
    assert len(support) == 1 and len(query) == 1
    assert split_by_class(_batch(labels=(2, 2, 2)), 1) is None


def test_regularized_step_alone_is_one_sgd_step_on_G(tiny_backbone_s):
    model, prompts, regulator = _setup(tiny_backbone_s)
    objective = Objective(model, LossConfig())
    batch = objective.with_frozen(_batch())
    terms = objective.terms(prompts, batch)
    G = regulated_gradient(terms, prompts, regulator, create_graph=False).G
    expected = {k: (v - 0.01 * G[k]).detach() for k, v in prompts.items()}
    sgd, adamw = _optimizers(prompts, regulator, lr=0.01)
    before = [p.detach().clone() for p in regulator.parameters()]
    result = prometar_iteration(objective, prompts, regulator, batch, MetaConfig(meta_step=False), sgd, adamw)
    assert result.meta is None and result.skipped == ["meta_disabled"]
    for k in prompts:
        assert torch.allclose(prompts[k], expected[k], atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(before, regulator.parameters()))
    assert result.regularized.gamma_mean == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kind", "meta_cfg"),
    [
        ("modulate", MetaConfig()),
        ("modulate", MetaConfig(task_classes="present")),
        ("modulate", MetaConfig(first_order=True)),
        ("constant", MetaConfig()),
        ("none", MetaConfig()),
        ("transform", MetaConfig()),
    ],
)
def test_iteration_runs_every_ablation(tiny_backbone_s, kind, meta_cfg):
    model, prompts, regulator = _setup(tiny_backbone_s, kind)
    objective = Objective(model, LossConfig())
    sgd, adamw = _optimizers(prompts, regulator)
    before = {k: v.detach().clone() for k, v in prompts.items()}
    result = prometar_iteration(objective, prompts, regulator, _batch(), meta_cfg, sgd, adamw, torch.Generator().manual_seed(0))
    assert result.skipped == [] and result.prompt_updates == 2
    m = result.meta.as_dict()
    assert m["prompt_update"] > 0 and m["query_loss_after"] == m["query_loss_after"]
    assert any(not torch.equal(before[k], prompts[k]) for k in prompts)
    if kind in ("none", "constant"):
        expected = 1.0 if kind == "none" else RegulatorConfig().constant_gamma
        assert m["gamma_mean"] == pytest.approx(expected) and m["regulator_update"] == 0.0
        reg = result.regularized  # G is the gradient of task + w * reg: that scalar is the logged loss
        assert reg.loss == pytest.approx(reg.task + expected * reg.reg, rel=1e-6)
    else:
        assert m["regulator_update"] > 0 and m["meta_grad_norm_regulator"] > 0
        assert result.regularized.loss != result.regularized.loss  # NaN: a learned G is no scalar's gradient
    undefined = ("before", "grad_norm_task", "grad_norm_reg", "reg_step/loss", "query_reg_after")
    assert all(v == v for k, v in result.as_dict().items() if not any(u in k for u in undefined))


def test_reduce_grads_hook_sees_every_gradient(tiny_backbone_s):
    model, prompts, regulator = _setup(tiny_backbone_s)
    objective = Objective(model, LossConfig())
    sgd, adamw = _optimizers(prompts, regulator)
    calls = []

    def reduce(grads):  # stands in for an all-reduce: records sizes and halves in place
        calls.append(sum(g.numel() for g in grads))
        for g in grads:
            g.mul_(0.5)

    prometar_iteration(objective, prompts, regulator, _batch(), MetaConfig(), sgd, adamw, reduce_grads=reduce)
    n_prompts = sum(p.numel() for p in prompts.values())
    assert calls == [n_prompts, n_prompts + regulator.num_parameters()]


def test_nonfinite_gradients_are_not_applied(tiny_backbone_s):
    model, prompts, regulator = _setup(tiny_backbone_s)
    objective = Objective(model, LossConfig())
    sgd, adamw = _optimizers(prompts, regulator)
    batch = _batch()
    bad = Batch(batch.images.clone().index_fill_(0, torch.tensor([0]), float("nan")), batch.labels, CLASSES)
    before = {k: v.detach().clone() for k, v in prompts.items()}
    reg_before = [p.detach().clone() for p in regulator.parameters()]
    result = prometar_iteration(objective, prompts, regulator, bad, MetaConfig(), sgd, adamw)
    assert "nonfinite_regularized" in result.skipped
    assert all(torch.equal(before[k], prompts[k]) for k in prompts)
    assert all(torch.equal(a, b) for a, b in zip(reg_before, regulator.parameters()))


def test_task_classes_all_scores_a_one_class_support_in_the_full_label_space(tiny_backbone_s):
    # n_query_classes=2 on a 3-class batch leaves one class in the support: among the support's own classes
    # (present) its cross-entropy is identically zero; among all five classes (all, the default) it is not
    batch = _batch(labels=(0, 1, 2, 2))
    support_ce = {}
    for task_classes in ("present", "all"):
        model, prompts, regulator = _setup(tiny_backbone_s)
        objective = Objective(model, LossConfig())
        sgd, adamw = _optimizers(prompts, regulator)
        cfg = MetaConfig(task_classes=task_classes, n_query_classes=2)
        result = prometar_iteration(objective, prompts, regulator, batch, cfg, sgd, adamw, torch.Generator().manual_seed(0))
        support_ce[task_classes] = result.meta.support_task_before
    assert MetaConfig().task_classes == "all"
    assert support_ce["present"] == 0.0 and support_ce["all"] > 0.1
    support, query = split_by_class(objective.with_frozen(batch), 2, torch.Generator().manual_seed(0))
    assert support.classnames == query.classnames == CLASSES  # the batch's (full) label space, labels unchanged


def test_matched_step_is_a_regularized_step_on_the_query_at_the_meta_steps_lr(tiny_backbone_s):
    model, prompts, regulator = _setup(tiny_backbone_s)
    objective = Objective(model, LossConfig())
    batch = objective.with_frozen(_batch())
    cfg = MetaConfig(meta_step=False, matched_step=True, outer_weight=0.5)
    lr = 0.01
    # expected: the regularized step on the batch, then 0.5 * lr * G(query) at the updated prompts, where the
    # query is the class split the meta step would draw from the same generator
    first = regulated_gradient(objective.terms(prompts, batch), prompts, regulator, create_graph=False).G
    after_first = {k: (v - lr * first[k]).detach().requires_grad_(True) for k, v in prompts.items()}
    _, query = split_by_class(batch, cfg.n_query_classes, torch.Generator().manual_seed(3))
    second = regulated_gradient(objective.terms(after_first, query), after_first, regulator, create_graph=False).G
    expected = {k: (after_first[k] - cfg.outer_weight * lr * second[k]).detach() for k in prompts}
    sgd, adamw = _optimizers(prompts, regulator, lr=lr)
    reg_before = [p.detach().clone() for p in regulator.parameters()]
    result = prometar_iteration(objective, prompts, regulator, batch, cfg, sgd, adamw, torch.Generator().manual_seed(3))
    assert result.meta is None and result.matched is not None and result.prompt_updates == 2
    assert result.skipped == ["meta_disabled"]
    for k in prompts:
        assert torch.allclose(prompts[k], expected[k], atol=1e-6), k
    assert all(torch.equal(a, b) for a, b in zip(reg_before, regulator.parameters()))  # no meta-gradient
    assert "matched_step/task" in result.as_dict()
    single = prometar_iteration(objective, prompts, regulator, _batch(labels=(1, 1)), cfg, sgd, adamw)
    assert single.prompt_updates == 1 and "single_class_batch" in single.skipped


def test_matched_step_needs_the_meta_step_off():
    from pipeline.config import ConfigError
    from pipeline.meta.config import validate_meta

    with pytest.raises(ConfigError, match="meta.matched_step=true .* needs meta.meta_step=false"):
        validate_meta(MetaConfig(meta_step=True, matched_step=True))


def test_frozen_regulator_gets_no_gradient_and_stays_bit_identical(tiny_backbone_s):
    model, prompts, regulator = _setup(tiny_backbone_s)
    objective = Objective(model, LossConfig())
    regulator.requires_grad_(False)  # what init_parts=prompts+frozen_regulator does
    before = [p.detach().clone() for p in regulator.parameters()]
    sgd = torch.optim.SGD(list(prompts.values()), lr=0.0025)
    result = prometar_iteration(objective, prompts, regulator, _batch(), MetaConfig(), sgd, None, torch.Generator().manual_seed(0))
    assert result.prompt_updates == 2 and result.meta.meta_grad_norm_regulator == 0.0
    assert result.meta.regulator_update == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, regulator.parameters()))
