"""The bi-level step shared by both stages, and the stage-1 (GRAM-style) meta-step.

``bilevel_loss``: inner adaptation on the support set (:func:`~pipeline.meta.inner.inner_loop`), then
the outer loss of the adapted prompts on the query set, in the union label space of support and query,
on manifold-mixup virtual samples (query image features mixed with support image features; see
:mod:`pipeline.meta.losses`), plus ``LossConfig.outer_preservation_weight`` times the regularizer ``R``
of the adapted prompts on the query. Support and query images go through the adapted image tower in one
batched forward, and the union class texts in one text forward.

``meta_step`` (stage 1, one task): the outer gradients w.r.t. the initial prompts and the regulator
parameters plus named metrics. It applies no update: the entry point averages the gradients over the
tasks of a rank and over ranks (one all-reduce) and steps its own optimizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from pipeline.meta.config import MetaConfig, validate_meta
from pipeline.meta.inner import inner_loop
from pipeline.meta.losses import (
    accuracy,
    mix_features,
    mixup_cross_entropy,
    preservation_loss,
    sample_mixup,
    task_loss,
)
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.regulator import Regulator
from pipeline.prompts import Prompts, first_order_attention


@dataclass
class MetaMetrics:
    """Named, detached metrics of one meta step (floats; NaN where not computed)."""

    outer_loss: float = math.nan
    """Outer loss (mixup loss on the query when mixup is on, plus ``outer_preservation_weight`` times
    ``query_reg_after``), before ``outer_weight``."""
    support_task_before: float = math.nan
    """Task loss on the support set at the initial prompts, among the support's own classes."""
    support_reg_before: float = math.nan
    """Regularizer on the support set at the initial prompts."""
    support_task_after: float = math.nan
    """Task loss on the support set after adaptation, among the support's own classes like
    ``support_task_before`` (from the outer forward; mixup only)."""
    query_reg_after: float = math.nan
    """Regularizer ``R`` of the adapted prompts on the query set (only when
    ``LossConfig.outer_preservation_weight`` > 0, where it is part of the outer loss)."""
    query_loss_before: float = math.nan
    """Plain query cross-entropy at the initial prompts (``MetaConfig.log_query_before``)."""
    query_loss_after: float = math.nan
    """Plain (unmixed) query cross-entropy after adaptation."""
    query_acc_after: float = math.nan
    """Query accuracy after adaptation."""
    gamma_mean: float = math.nan
    """Mean of gamma over all prompt elements (first inner step; the gates for ``transform``)."""
    gamma_std: float = math.nan
    """Standard deviation of gamma (first inner step)."""
    gamma_min: float = math.nan
    """Minimum of gamma (first inner step)."""
    gamma_max: float = math.nan
    """Maximum of gamma (first inner step)."""
    grad_norm_task: float = math.nan
    """Norm of the support task gradient g (first inner step; ``modulate`` only)."""
    grad_norm_reg: float = math.nan
    """Norm of the support regularizer gradient r (first inner step; ``modulate`` only)."""
    grad_norm_regulated: float = math.nan
    """Norm of the regulated gradient G (first inner step)."""
    meta_grad_norm_prompts: float = math.nan
    """Norm of the outer gradient w.r.t. the initial prompts."""
    meta_grad_norm_regulator: float = math.nan
    """Norm of the outer gradient w.r.t. the regulator parameters."""
    prompt_update: float = math.nan
    """Norm of the change of the prompts made by this iteration (stage 2, where updates are applied)."""
    regulator_update: float = math.nan
    """Norm of the change of the regulator parameters (stage 2, where updates are applied)."""

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def fill_metrics(metrics: MetaMetrics, values: dict[str, Tensor | float]) -> None:
    """Copy tensor metrics with a single device-to-host transfer."""
    names = [k for k in values if hasattr(metrics, k)]
    tensors = [torch.as_tensor(values[k], dtype=torch.float64).detach().reshape(()).cpu() for k in names]
    if tensors:
        for name, value in zip(names, torch.stack(tensors).tolist()):
            setattr(metrics, name, float(value))


def union_label_space(support: Batch, query: Batch) -> tuple[tuple[str, ...], Tensor, Tensor]:
    """Union classes (support classes first, then new query classes) and both label sets remapped."""
    names = list(support.classnames)
    index = {n: i for i, n in enumerate(names)}
    for n in query.classnames:
        if n not in index:
            index[n] = len(names)
            names.append(n)
    query_map = torch.tensor([index[n] for n in query.classnames], dtype=torch.long, device=query.labels.device)
    return tuple(names), support.labels, query_map[query.labels]


@dataclass
class BilevelOutput:
    """The outer loss (in the graph) and the metrics gathered on the way."""

    loss: Tensor
    """Outer loss times ``outer_weight`` (differentiable w.r.t. the initial prompts and the regulator)."""
    values: dict[str, Tensor]
    """Detached metric tensors keyed like :class:`MetaMetrics` fields."""


def bilevel_loss(
    objective: Objective,
    prompts: Prompts,
    regulator: Regulator,
    support: Batch,
    query: Batch,
    cfg: MetaConfig,
    generator: torch.Generator | None = None,
) -> BilevelOutput:
    """Inner steps on ``support``, outer loss of the adapted prompts on ``query`` (mixup virtual tasks).

    The outer loss is scored in the union label space of support and query (:func:`union_label_space`);
    with ``objective.cfg.outer_preservation_weight`` ``w > 0`` it adds ``w * R``, the knowledge-preservation
    regularizer of the adapted prompts on the query (its images against their frozen features, its own
    class texts against theirs), which is what :meth:`Objective.terms` gives for ``query``.

    Attention backend: the loss's graph is differentiated twice only through second-order inner steps
    (inner gradients built with ``create_graph=True``); those forwards run on the math SDPA backend, also
    inside an enclosing :func:`~pipeline.prompts.first_order_attention`. First-order meta-gradients
    (``first_order``) and the outer loss at unadapted prompts (``meta_step=false``) are a single backward
    and let SDPA use its fused kernels.
    """
    second_order = cfg.meta_step and not cfg.first_order  # validate_meta: meta_step implies inner_steps >= 1
    with first_order_attention(not second_order):
        return _bilevel_loss(objective, prompts, regulator, support, query, cfg, generator)


def _bilevel_loss(objective: Objective, prompts: Prompts, regulator: Regulator, support: Batch, query: Batch,
                  cfg: MetaConfig, generator: torch.Generator | None) -> BilevelOutput:
    support = objective.with_frozen(support)
    steps = cfg.inner_steps if cfg.meta_step else 0
    inner = inner_loop(
        lambda p: objective.terms(p, support), prompts, regulator, steps, cfg.inner_lr, cfg.first_order
    )
    adapted = inner.prompts
    classes, y_support, y_query = union_label_space(support, query)
    loss_cfg = objective.cfg
    values: dict[str, Tensor] = {}
    if inner.steps:
        first = inner.steps[0]
        values.update({k: v for k, v in first.items() if k not in ("task", "reg")})
        values.update(support_task_before=first["task"], support_reg_before=first["reg"])
    text = objective.text_features(adapted, classes)  # [C_union, D]; the support's classes come first
    n_support_classes = len(support.classnames)
    if loss_cfg.mixup:
        n_s = len(support)
        image = objective.image_features(adapted, torch.cat([support.images, query.images]))  # [n_s + n_q, D]
        image_s, image_q = image[:n_s], image[n_s:]
        sample = sample_mixup(len(query), n_s, loss_cfg.mixup_alpha, loss_cfg.mixup_beta, generator)
        mixed = mix_features(image_q, image_s, sample)
        partner_labels = y_support[sample.partner.to(y_support.device)]
        outer = mixup_cross_entropy(objective.logits(mixed, text), y_query, partner_labels, sample.lam)
        # the support's own label space, as support_task_before (the inner loop's task loss): scored among
        # the union classes, a cross-domain task's query names would add N distractors after adaptation only
        support_logits = objective.logits(image_s.detach(), text[:n_support_classes].detach())
        values["support_task_after"] = task_loss(support_logits, y_support)
    else:
        image_q = objective.image_features(adapted, query.images)
        outer = task_loss(objective.logits(image_q, text), y_query)
    if loss_cfg.outer_preservation_weight:
        reg_q = query_preservation(objective, query, image_q, text, classes)
        values["query_reg_after"] = reg_q.detach()
        outer = outer + loss_cfg.outer_preservation_weight * reg_q
    logits_q = objective.logits(image_q.detach(), text.detach())
    values.update(outer_loss=outer.detach(), query_loss_after=task_loss(logits_q, y_query))
    values["query_acc_after"] = accuracy(logits_q, y_query)
    if cfg.log_query_before:
        with torch.no_grad():
            logits_0 = objective.logits(
                objective.image_features(prompts, query.images), objective.text_features(prompts, classes)
            )
            values["query_loss_before"] = task_loss(logits_0, y_query)
    return BilevelOutput(loss=cfg.outer_weight * outer, values=values)


def query_preservation(objective: Objective, query: Batch, image_q: Tensor, text: Tensor,
                       classes: tuple[str, ...]) -> Tensor:
    """The regularizer ``R`` of the adapted prompts on ``query`` from features the outer step already has.

    ``image_q``: ``[n_q, D]`` adapted query image features; ``text``: ``[C_union, D]`` adapted text features
    of ``classes`` (the union label space). ``R`` is taken over the query's images and its own class texts,
    as :meth:`Objective.terms` on ``query`` would, without a second forward of the adapted towers.
    """
    loss_cfg = objective.cfg
    query = objective.with_frozen(query)  # f_0 of the query images (one no-grad forward)
    index = {name: i for i, name in enumerate(classes)}
    rows = torch.tensor([index[n] for n in query.classnames], dtype=torch.long, device=text.device)
    text_frozen = objective.frozen_text(query.classnames) if loss_cfg.weight_text else None
    reg, _, _ = preservation_loss(image_q, query.frozen_image, text[rows], text_frozen,
                                  loss_cfg.weight_image, loss_cfg.weight_text)
    return reg


@dataclass
class MetaStepResult:
    """Outer gradients of one task plus its metrics (nothing has been updated)."""

    loss: Tensor
    """Detached outer loss (times ``outer_weight``)."""
    prompt_grads: Prompts
    """Gradient of the outer loss w.r.t. each initial prompt tensor."""
    regulator_grads: dict[str, Tensor]
    """Gradient w.r.t. each regulator parameter (by ``named_parameters`` name; zeros if unused)."""
    metrics: MetaMetrics
    """Named metrics."""


def outer_gradients(loss: Tensor, prompts: Prompts, regulator: Regulator) -> tuple[Prompts, dict[str, Tensor]]:
    """``d loss / d prompts`` and ``d loss / d regulator parameters`` in one backward pass."""
    keys = list(prompts)
    named = [(n, p) for n, p in regulator.named_parameters() if p.requires_grad]
    inputs = [prompts[k] for k in keys] + [p for _, p in named]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    prompt_grads = dict(zip(keys, grads[: len(keys)]))
    regulator_grads = {n: g for (n, _), g in zip(named, grads[len(keys) :])}
    return prompt_grads, regulator_grads


def meta_step(
    objective: Objective,
    prompts: Prompts,
    regulator: Regulator,
    support: Batch,
    query: Batch,
    cfg: MetaConfig,
    generator: torch.Generator | None = None,
) -> MetaStepResult:
    """Stage-1 meta-step on one task ``(support, query)``: outer gradients and metrics, no update.

    ``prompts`` are the initial prompts (leaf tensors requiring grad, e.g. ``model.initial_prompts()``).
    ``support`` and ``query`` may have different class sets (cross-domain query); the outer loss is in
    their union label space.
    """
    validate_meta(cfg)
    out = bilevel_loss(objective, prompts, regulator, support, query, cfg, generator)
    prompt_grads, regulator_grads = outer_gradients(out.loss, prompts, regulator)
    values = dict(out.values)
    values["meta_grad_norm_prompts"] = grad_norm(prompt_grads.values())
    values["meta_grad_norm_regulator"] = grad_norm(regulator_grads.values())
    metrics = MetaMetrics()
    fill_metrics(metrics, values)
    return MetaStepResult(out.loss.detach(), prompt_grads, regulator_grads, metrics)


def grad_norm(tensors) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        return torch.tensor(0.0)
    return torch.sqrt(sum(t.detach().double().pow(2).sum() for t in tensors))
