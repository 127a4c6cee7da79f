"""The inner loop: a pure function from a prompts dict to an adapted prompts dict.

``theta_{k+1} = theta_k - inner_lr * G(theta_k)`` where ``G`` is the regulated gradient of the task
loss and the regularizer (:mod:`pipeline.meta.regulator`). Nothing is mutated: no module is cloned, no
optimizer is created, the input dict and tensors are left alone. With ``first_order=False`` the
inner gradients are built with ``create_graph=True``, so a loss of the adapted prompts differentiates
back to the initial prompts through the inner update (second order) and to the regulator parameters
through ``gamma``. With ``first_order=True`` the inner gradients ``g`` and ``r`` are constants; the
adapted prompts still depend on the initial prompts (identity path) and on the regulator (``G``
depends on ``gamma_phi``).

How many backward passes. One forward per step gives both losses (:meth:`Objective.terms`). Only
``modulate`` needs ``g`` and ``r`` apart; it gets both from *one* vectorised backward pass:
``torch.autograd.grad`` of the stacked ``[L_task, R]`` with the identity as batched cotangents
(``is_grads_batched=True``), which runs the backward graph once with a batch of two cotangents and is
double-backward safe. The other kinds only need ``v = g + w * r`` and take the gradient of
``L_task + w * R`` in a single ordinary backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.meta.objective import LossTerms
from pipeline.meta.regulator import Regulator, gamma_statistics
from pipeline.prompts import Prompts


@dataclass
class RegulatedGradient:
    """The regulated gradient of one inner step and what it was made of."""

    G: Prompts
    """Regulated gradient per prompt key (in the graph when second order)."""
    gamma: Prompts
    """``modulate``: gamma per key (prompt shapes); ``transform``: gates per layer; else the constant."""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """Detached 0-dim metrics: gamma statistics and gradient norms (``grad_norm_task``/``grad_norm_reg``
    are NaN where the kind does not separate them)."""


def _norm(tensors: Prompts | list[Tensor]) -> Tensor:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.sqrt(sum(t.detach().float().pow(2).sum() for t in values))


def regulated_gradient(terms: LossTerms, prompts: Prompts, regulator: Regulator, create_graph: bool) -> RegulatedGradient:
    """``G`` of ``terms`` (computed at ``prompts``) with as few backward passes as the kind allows."""
    keys = list(prompts)
    params = [prompts[k] for k in keys]
    nan = terms.task.new_tensor(float("nan")).detach().float()
    if regulator.needs_separate_gradients:
        outputs = torch.stack([terms.task, terms.reg.to(terms.task.dtype)])  # [2]
        cotangents = torch.eye(2, dtype=outputs.dtype, device=outputs.device)  # row i selects output i
        grads = torch.autograd.grad(
            outputs,
            params,
            grad_outputs=cotangents,
            is_grads_batched=True,
            create_graph=create_graph,
            materialize_grads=True,
        )  # each [2, *prompt shape]
        g = {k: t[0] for k, t in zip(keys, grads)}
        r = {k: t[1] for k, t in zip(keys, grads)}
        G, gamma = regulator.modulate(g, r)
        g_norm, r_norm = _norm(g), _norm(r)
    else:
        total = terms.task + regulator.sum_weight * terms.reg
        v = torch.autograd.grad(total, params, create_graph=create_graph, materialize_grads=True)
        G, gamma = regulator.from_sum(dict(zip(keys, v)))
        g_norm, r_norm = nan, nan
    stats = gamma_statistics(gamma)
    stats.update(grad_norm_task=g_norm, grad_norm_reg=r_norm, grad_norm_regulated=_norm(G))
    return RegulatedGradient(G=G, gamma=gamma, stats=stats)


@dataclass
class InnerResult:
    """Adapted prompts plus per-step metrics."""

    prompts: Prompts
    """The adapted prompts ``theta'`` (functions of the initial prompts and the regulator)."""
    steps: list[dict[str, Tensor]]
    """Per inner step: ``task`` and ``reg`` losses at the step's start, gamma statistics, gradient norms."""


def inner_loop(
    loss_fn: Callable[[Prompts], LossTerms],
    prompts: Prompts,
    regulator: Regulator,
    steps: int,
    lr: float,
    first_order: bool = False,
) -> InnerResult:
    """Adapt ``prompts`` by ``steps`` regulated gradient steps of size ``lr`` on ``loss_fn``.

    ``loss_fn(prompts) -> LossTerms`` evaluates the support set (e.g.
    ``lambda p: objective.terms(p, support)``). Prompt tensors that do not require gradients (e.g.
    adapting a loaded artifact at test time) are treated as new leaves.
    """
    current = {k: (v if v.requires_grad else v.detach().requires_grad_(True)) for k, v in prompts.items()}
    records: list[dict[str, Tensor]] = []
    for _ in range(steps):
        terms = loss_fn(current)
        step = regulated_gradient(terms, current, regulator, create_graph=not first_order)
        records.append({"task": terms.task.detach(), "reg": terms.reg.detach(), **step.stats})
        current = {k: current[k] - lr * step.G[k].to(current[k].dtype) for k in current}
    return InnerResult(prompts=current, steps=records)
