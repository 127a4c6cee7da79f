"""Stage 2: one ProMetaR iteration on a few-shot batch (docs/ARCHITECTURE.md section 5).

1. Regularized step: ``G = g + gamma_phi(g, r) * r`` on the whole batch, one optimizer step on the
   prompts (``prompt_optimizer``, SGD in the public recipe). ``gamma`` is evaluated, not trained, here.
2. Meta step: the batch is split by class into support and query (``MetaConfig.n_query_classes``
   classes held out; by default both scored in the batch's full label space, as the public ProMetaR
   code does, see ``MetaConfig.task_classes``), inner step(s) on the support with the regulated
   gradient, outer loss of the adapted prompts on mixup virtual samples of the query
   (:func:`~pipeline.meta.step.bilevel_loss`, times ``MetaConfig.outer_weight``), then the outer
   gradient updates the prompts (``prompt_optimizer`` again) and the regulator
   (``regulator_optimizer``, AdamW with ``RegulatorConfig.lr``; ``None`` keeps it fixed).

   With ``MetaConfig.matched_step`` (and no meta step) the second update is instead a regularized step
   on the query split, its gradient scaled by ``outer_weight``: the step-matched control, with as many
   prompt updates of the same learning rates as ProMetaR but no meta-gradient.

Why this function takes optimizers instead of returning gradients: step 2 must see the prompts
*after* step 1, so an update has to happen between the two gradient computations. The inner loop
itself stays pure; the optimizers are only touched here, between steps. ``reduce_grads`` (e.g. a
mean all-reduce over ranks of the flattened gradients, in place) runs before every optimizer step, so
the same function serves one process and many. A step whose gradients are not finite is not applied
and is reported in ``skipped`` (the caller counts and aborts after too many in a row).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from pipeline.meta.config import MetaConfig, validate_meta
from pipeline.meta.inner import regulated_gradient
from pipeline.meta.objective import Batch, LossTerms, Objective
from pipeline.meta.regulator import Regulator
from pipeline.meta.step import MetaMetrics, bilevel_loss, fill_metrics, grad_norm, outer_gradients
from pipeline.prompts import Prompts, first_order_attention


@dataclass
class RegularizedMetrics:
    """Metrics of the regularized step on the whole batch (floats)."""

    task: float = math.nan
    """Task loss on the batch before the step."""
    reg: float = math.nan
    """Regularizer on the batch before the step."""
    reg_text: float = math.nan
    """Text part of the regularizer."""
    reg_image: float = math.nan
    """Image part of the regularizer."""
    accuracy: float = math.nan
    """Batch accuracy before the step."""
    gamma_mean: float = math.nan
    """Mean gamma of the regularized step."""
    gamma_std: float = math.nan
    """Standard deviation of gamma of the regularized step."""
    gamma_min: float = math.nan
    """Minimum gamma of the regularized step."""
    gamma_max: float = math.nan
    """Maximum gamma of the regularized step."""
    grad_norm_task: float = math.nan
    """Norm of g on the batch (``modulate`` only)."""
    grad_norm_reg: float = math.nan
    """Norm of r on the batch (``modulate`` only)."""
    grad_norm_regulated: float = math.nan
    """Norm of G on the batch."""
    loss: float = math.nan
    """The scalar whose gradient ``G`` is, ``task + w * reg`` with ``w`` the regulator's fixed weight
    (1 for ``none``, ``constant_gamma`` for ``constant``): what a method without a learned regulator
    trains on. NaN for the learned kinds, whose ``G`` is no scalar's gradient."""

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ProMetaRResult:
    """What one iteration did."""

    regularized: RegularizedMetrics
    """Regularized-step metrics."""
    meta: MetaMetrics | None
    """Meta-step metrics; ``None`` when the meta step did not run (see ``skipped``)."""
    skipped: list[str] = field(default_factory=list)
    """Reasons parts were skipped: ``meta_disabled``, ``single_class_batch``, ``nonfinite_regularized``,
    ``nonfinite_meta``, ``nonfinite_matched``."""
    matched: RegularizedMetrics | None = None
    """Metrics of the step-matched control's query step (``MetaConfig.matched_step``), before scaling
    by ``outer_weight``; ``None`` when it did not run."""
    prompt_updates: int = 0
    """Optimizer steps applied to the prompts in this iteration (2 for ProMetaR and the step-matched
    control on a batch of two or more classes, 1 without a second step)."""

    def as_dict(self) -> dict[str, float]:
        out = {f"reg_step/{k}": v for k, v in self.regularized.as_dict().items()}
        if self.meta is not None:
            out.update({f"meta/{k}": v for k, v in self.meta.as_dict().items()})
        if self.matched is not None:
            out.update({f"matched_step/{k}": v for k, v in self.matched.as_dict().items()})
        out["prompt_updates"] = float(self.prompt_updates)
        return out


def split_by_class(
    batch: Batch, n_query_classes: int, generator: torch.Generator | None = None, restrict: bool = False
) -> tuple[Batch, Batch] | None:
    """Hold out ``n_query_classes`` random classes of the batch as the query set, the rest is the
    support. At least one class stays in the support; ``None`` if the batch has a single class.

    Both parts keep the batch's label space (``classnames`` and labels unchanged: in stage 2 all the
    training classes, ``MetaConfig.task_classes="all"``). ``restrict``: each part gets the label space
    of its own classes instead (``task_classes="present"``)."""
    present = torch.unique(batch.labels.cpu())
    if present.numel() < 2:
        return None
    k = min(n_query_classes, present.numel() - 1)
    held_out = present[torch.randperm(present.numel(), generator=generator)[:k]]
    in_query = torch.isin(batch.labels.cpu(), held_out)
    q_idx = torch.nonzero(in_query).flatten().to(batch.labels.device)
    s_idx = torch.nonzero(~in_query).flatten().to(batch.labels.device)
    support, query = batch.subset(s_idx), batch.subset(q_idx)
    if restrict:
        support, query = support.restricted(), query.restricted()
    return support, query


def _snapshot(tensors) -> list[Tensor]:
    return [t.detach().clone() for t in tensors]


def _distance(before: list[Tensor], after) -> Tensor:
    after = list(after)
    if not after:
        return torch.tensor(0.0)
    return torch.sqrt(sum((a.detach().double() - b.double()).pow(2).sum() for a, b in zip(after, before)))


def all_finite(tensors) -> bool:
    """True when every element of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def fixed_weight_loss(terms: LossTerms, regulator: Regulator) -> Tensor:
    """``task + w * reg`` for the regulator kinds whose ``G`` is that scalar's gradient (``none``: w = 1,
    ``constant``: w = ``constant_gamma``); NaN for the learned kinds (``G`` is no scalar's gradient)."""
    if regulator.kind in ("none", "constant"):
        return (terms.task + regulator.sum_weight * terms.reg).detach()
    return terms.task.new_tensor(math.nan).detach()


def _regularized_step(objective: Objective, prompts: Prompts, regulator: Regulator, batch: Batch, scale: float,
                      prompt_optimizer: torch.optim.Optimizer,
                      reduce_grads: Callable[[list[Tensor]], None] | None) -> tuple[RegularizedMetrics, bool]:
    """One optimizer step on ``scale * G(prompts; batch)`` (``gamma`` evaluated, not trained); returns the
    metrics before the step and whether the step was applied (not when a gradient is non-finite)."""
    keys = list(prompts)
    params = [prompts[k] for k in keys]
    # G is taken once (create_graph=False) and applied detached: no gradient of it is ever taken, so this
    # forward may use the fused attention kernels (they lack only the double backward). This is the whole
    # iteration of the plain methods (ivlp, coop, vpt_deep) and of the no-meta ones (promptsrc_lite,
    # prometar_no_meta), and the second step of the step-matched control.
    with first_order_attention():
        terms = objective.terms(prompts, batch)
        step = regulated_gradient(terms, prompts, regulator, create_graph=False)
    grads = [scale * step.G[k].detach().to(prompts[k].dtype) for k in keys]
    if reduce_grads is not None:
        reduce_grads(grads)
    metrics = RegularizedMetrics()
    fill_metrics(
        metrics,
        {
            "task": terms.task.detach(),
            "reg": terms.reg.detach(),
            "reg_text": terms.reg_text,
            "reg_image": terms.reg_image,
            "accuracy": (terms.logits.detach().argmax(-1) == batch.labels).float().mean(),
            "loss": fixed_weight_loss(terms, regulator),
            **step.stats,
        },
    )
    applied = all_finite(grads)
    if applied:
        for p, g in zip(params, grads):
            p.grad = g
        prompt_optimizer.step()
    prompt_optimizer.zero_grad(set_to_none=True)
    return metrics, applied


def prometar_iteration(
    objective: Objective,
    prompts: Prompts,
    regulator: Regulator,
    batch: Batch,
    cfg: MetaConfig,
    prompt_optimizer: torch.optim.Optimizer,
    regulator_optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    reduce_grads: Callable[[list[Tensor]], None] | None = None,
) -> ProMetaRResult:
    """One ProMetaR iteration; updates ``prompts`` (leaf parameters owned by ``prompt_optimizer``) and
    the regulator (``regulator_optimizer``; may be ``None`` for parameter-free kinds) in place."""
    validate_meta(cfg)
    keys = list(prompts)
    params = [prompts[k] for k in keys]
    reg_params = [p for p in regulator.parameters() if p.requires_grad]  # none when frozen or parameter-free
    skipped: list[str] = []
    updates = 0
    batch = objective.with_frozen(batch)  # frozen image features once, shared by both steps
    prompts_before = _snapshot(params)

    # 1. Regularized step on the whole batch (gamma evaluated, not trained).
    regularized, applied = _regularized_step(objective, prompts, regulator, batch, 1.0, prompt_optimizer,
                                             reduce_grads)
    updates += applied
    if not applied:
        skipped.append("nonfinite_regularized")

    # 2. Meta step (or the step-matched control's query step) on a class split of the same batch.
    meta = matched = None
    second = cfg.meta_step or cfg.matched_step
    restrict = cfg.task_classes == "present"
    split = split_by_class(batch, cfg.n_query_classes, generator, restrict) if second else None
    if not cfg.meta_step:
        skipped.append("meta_disabled")
    if second and split is None:
        skipped.append("single_class_batch")
    if cfg.matched_step and split is not None:
        # the meta step's learning rate (outer_weight x the prompt lr), without any meta-gradient
        matched, applied = _regularized_step(objective, prompts, regulator, split[1], cfg.outer_weight,
                                             prompt_optimizer, reduce_grads)
        updates += applied
        if not applied:
            skipped.append("nonfinite_matched")
    elif cfg.meta_step and split is not None:
        support, query = split
        out = bilevel_loss(objective, prompts, regulator, support, query, cfg, generator)
        prompt_grads, regulator_grads = outer_gradients(out.loss, prompts, regulator)
        p_grads = [prompt_grads[k].detach() for k in keys]
        r_grads = [g.detach() for n, g in regulator_grads.items()]
        if reduce_grads is not None:
            reduce_grads(p_grads + r_grads)
        values = dict(out.values)
        values["meta_grad_norm_prompts"] = grad_norm(p_grads)
        values["meta_grad_norm_regulator"] = grad_norm(r_grads)
        regulator_before = _snapshot(reg_params)
        if all_finite(p_grads + r_grads):
            for p, g in zip(params, p_grads):
                p.grad = g
            prompt_optimizer.step()
            prompt_optimizer.zero_grad(set_to_none=True)
            updates += 1
            if regulator_optimizer is not None and reg_params:
                for p, g in zip(reg_params, r_grads):
                    p.grad = g
                regulator_optimizer.step()
                regulator_optimizer.zero_grad(set_to_none=True)
        else:
            skipped.append("nonfinite_meta")
        values["regulator_update"] = _distance(regulator_before, reg_params)
        meta = MetaMetrics()
        fill_metrics(meta, values)

    if meta is not None:
        meta.prompt_update = float(_distance(prompts_before, params))
    return ProMetaRResult(regularized=regularized, meta=meta, skipped=skipped, matched=matched,
                          prompt_updates=updates)
