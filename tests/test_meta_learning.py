"""The meta-learner learns: a seeded toy problem (stage-1 meta-steps) and the regulator under the
default stage-2 settings."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import PromptConfig
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig
from pipeline.meta.objective import Batch, Objective
from pipeline.meta.prometar import prometar_iteration
from pipeline.meta.regulator import Regulator
from pipeline.meta.step import meta_step
from pipeline.prompts import PromptedCLIP

CONCEPTS = ("red fox", "blue car", "green tree", "old house", "small boat", "yellow bird")
# Toy problem thresholds (seeded, deterministic): the mean post-adaptation query loss over fixed
# evaluation episodes must fall below TOY_ABSOLUTE and below TOY_RELATIVE times its initial value.
TOY_ABSOLUTE = 0.55
TOY_RELATIVE = 0.7
# Regulator learning margins after 100 default stage-2 iterations.
MIN_REGULATOR_CHANGE = 0.05  # ||phi_100 - phi_0|| / ||phi_0||
MIN_GAMMA_CHANGE = 0.01  # |gamma_std_100 - gamma_std_0| and max |gamma_mean_t - gamma_mean_0|


class ToyTasks:
    """Six concepts, each a fixed random image prototype; samples are prototype + noise."""

    def __init__(self, seed: int, noise: float = 0.3):
        g = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(len(CONCEPTS), 3, 32, 32, generator=g)
        self.noise = noise

    def episode(self, g: torch.Generator, n_way: int = 2, k_shot: int = 2, q_query: int = 2):
        concepts = torch.randperm(len(CONCEPTS), generator=g)[:n_way]
        names = tuple(CONCEPTS[i] for i in concepts)

        def draw(k):
            labels = torch.arange(n_way).repeat_interleave(k)
            images = self.prototypes[concepts[labels]] + self.noise * torch.randn(len(labels), 3, 32, 32, generator=g)
            return Batch(images, labels, names)

        return draw(k_shot), draw(q_query)


def test_toy_problem_meta_training_reduces_post_adaptation_query_loss(tiny_backbone_s):
    model = PromptedCLIP(tiny_backbone_s, PromptConfig(type="ivlp", depth_text=3, depth_vision=3), generator=torch.Generator().manual_seed(0))
    prompts = model.initial_prompts()
    objective = Objective(model, LossConfig(weight_text=1.0, weight_image=1.0))
    regulator = Regulator.for_prompts(prompts, RegulatorConfig(hidden=32))
    cfg = MetaConfig(inner_steps=1, inner_lr=0.005)
    tasks = ToyTasks(seed=1)
    eval_gen = torch.Generator().manual_seed(99)
    evaluation = [tasks.episode(eval_gen) for _ in range(6)]

    def post_adaptation_query_loss() -> float:
        losses = [
            meta_step(objective, prompts, regulator, s, q, cfg, torch.Generator().manual_seed(i)).metrics.query_loss_after
            for i, (s, q) in enumerate(evaluation)
        ]
        return sum(losses) / len(losses)

    before = post_adaptation_query_loss()
    optimizer = torch.optim.AdamW(
        [{"params": list(prompts.values()), "lr": 0.003}, {"params": list(regulator.parameters()), "lr": RegulatorConfig().lr}],
        weight_decay=0.0,
    )
    train_gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        support, query = tasks.episode(train_gen)
        result = meta_step(objective, prompts, regulator, support, query, cfg, train_gen)
        for k, p in prompts.items():
            p.grad = result.prompt_grads[k]
        for n, p in regulator.named_parameters():
            p.grad = result.regulator_grads[n]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = post_adaptation_query_loss()
    print(f"toy problem: post-adaptation query loss {before:.4f} -> {after:.4f} after 50 meta-steps")
    assert after < TOY_ABSOLUTE
    assert after < TOY_RELATIVE * before


def test_regulator_learns_with_default_settings(tiny_backbone_s):
    """Defaults everywhere (regulator, losses, meta step; SGD 0.0025 on the prompts as in the recipe):
    the regulator's parameters and its gamma statistics move, unlike a regulator stuck at warmup."""
    model = PromptedCLIP(tiny_backbone_s, PromptConfig(type="ivlp", depth_text=3, depth_vision=3), generator=torch.Generator().manual_seed(0))
    prompts = model.initial_prompts()
    reg_cfg = RegulatorConfig()
    objective = Objective(model, LossConfig())
    regulator = Regulator.for_prompts(prompts, reg_cfg)
    sgd = torch.optim.SGD(list(prompts.values()), lr=0.0025)
    adamw = torch.optim.AdamW(regulator.parameters(), lr=reg_cfg.lr, weight_decay=reg_cfg.weight_decay)
    phi_0 = torch.cat([p.detach().flatten().clone() for p in regulator.parameters()])
    data = torch.Generator().manual_seed(1)
    classes = ("cat", "dog", "car", "tree", "boat", "bird", "ship", "frog")
    prototypes = torch.randn(len(classes), 3, 32, 32, generator=data)
    split_gen = torch.Generator().manual_seed(2)
    history = []
    for _ in range(100):
        labels = torch.randperm(len(classes), generator=data)[:4]  # batch 4, as in the recipe
        images = prototypes[labels] + 0.5 * torch.randn(4, 3, 32, 32, generator=data)
        result = prometar_iteration(objective, prompts, regulator, Batch(images, labels, classes), MetaConfig(), sgd, adamw, split_gen)
        assert result.skipped == []
        history.append(result.regularized)
    phi_100 = torch.cat([p.detach().flatten() for p in regulator.parameters()])
    change = float((phi_100 - phi_0).norm() / phi_0.norm())
    mean_shift = max(abs(h.gamma_mean - history[0].gamma_mean) for h in history)
    std_change = abs(history[-1].gamma_std - history[0].gamma_std)
    print(
        f"regulator after 100 default iterations: relative parameter change {change:.4f}, "
        f"gamma mean {history[0].gamma_mean:.4f} -> {history[-1].gamma_mean:.4f} (max shift {mean_shift:.4f}), "
        f"gamma std {history[0].gamma_std:.4f} -> {history[-1].gamma_std:.4f}"
    )
    assert history[0].gamma_std == pytest.approx(0.0, abs=1e-6)  # neutral start
    assert change > MIN_REGULATOR_CHANGE
    assert mean_shift > MIN_GAMMA_CHANGE
    assert std_change > MIN_GAMMA_CHANGE
