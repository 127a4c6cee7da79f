"""Stage 2: one ProMetaR iteration on a few-shot batch (docs/ARCHITECTURE.md section 5).

1. Regularized step: ``G = g + gamma_phi(g, r) * r`` on the whole batch, one optimizer step on the
   prompts (``prompt_optimizer``, SGD in the public recipe). ``gamma`` is evaluated, not trained, here.
2. Meta step: the batch is split by class into support and query (``MetaConfig.n_query_classes``
   classes held out; by default each in the label space of its own classes, the outer loss in their
   union, exactly like a stage-1 task), inner step(s) on the support with the regulated gradient, outer loss of the
   adapted prompts on mixup virtual samples of the query (:func:`~pipeline.meta.step.bilevel_loss`),
   then the outer gradient updates the prompts (``prompt_optimizer`` again) and the regulator
   (``regulator_optimizer``, AdamW with ``RegulatorConfig.lr``).

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
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.regulator import Regulator
from pipeline.meta.step import MetaMetrics, bilevel_loss, fill_metrics, grad_norm, outer_gradients
from pipeline.prompts import Prompts


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
    ``nonfinite_meta``."""

    def as_dict(self) -> dict[str, float]:
        out = {f"reg_step/{k}": v for k, v in self.regularized.as_dict().items()}
        if self.meta is not None:
            out.update({f"meta/{k}": v for k, v in self.meta.as_dict().items()})
        return out


def split_by_class(
    batch: Batch, n_query_classes: int, generator: torch.Generator | None = None, restrict: bool = False
) -> tuple[Batch, Batch] | None:
    """Hold out ``n_query_classes`` random classes of the batch as the query set, the rest is the
    support. At least one class stays in the support; ``None`` if the batch has a single class.
    ``restrict``: each part gets the label space of its own classes (``MetaConfig.task_classes="present"``)."""
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
    reg_params = [p for p in regulator.parameters() if p.requires_grad]
    skipped: list[str] = []
    batch = objective.with_frozen(batch)  # frozen image features once, shared by both steps
    prompts_before = _snapshot(params)

    # 1. Regularized step on the whole batch (gamma evaluated, not trained).
    terms = objective.terms(prompts, batch)
    step = regulated_gradient(terms, prompts, regulator, create_graph=False)
    grads = [step.G[k].detach().to(prompts[k].dtype) for k in keys]
    if reduce_grads is not None:
        reduce_grads(grads)
    regularized = RegularizedMetrics()
    labels = batch.labels
    fill_metrics(
        regularized,
        {
            "task": terms.task.detach(),
            "reg": terms.reg.detach(),
            "reg_text": terms.reg_text,
            "reg_image": terms.reg_image,
            "accuracy": (terms.logits.detach().argmax(-1) == labels).float().mean(),
            **step.stats,
        },
    )
    if all_finite(grads):
        for p, g in zip(params, grads):
            p.grad = g
        prompt_optimizer.step()
    else:
        skipped.append("nonfinite_regularized")
    prompt_optimizer.zero_grad(set_to_none=True)

    # 2. Meta step on a class split of the same batch.
    meta = None
    restrict = cfg.task_classes == "present"
    split = split_by_class(batch, cfg.n_query_classes, generator, restrict) if cfg.meta_step else None
    if not cfg.meta_step:
        skipped.append("meta_disabled")
    elif split is None:
        skipped.append("single_class_batch")
    else:
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
    return ProMetaRResult(regularized=regularized, meta=meta, skipped=skipped)
