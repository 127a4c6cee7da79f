"""The stage-1 regulator learns: its own AdamW group, clip and eps; its learning is logged and visible on a
tiny run, and a run whose regulator update is swamped by Adam's eps fails the same thresholds."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import pretrain
from pipeline.config import load_config
from pipeline.pretrain_config import PretrainConfig
from pipeline.pretrain_loop import build_optimizer, clip_gradients_

from .helpers.tasks import make_task_data, pretrain_overrides

STEPS = 6
# Thresholds on the tiny run (regulator.lr 0.01, hidden 16: 4,048 parameters; STEPS outer steps, see
# pretrain_overrides). |phi_0| is ~3.3, all of it the randomly initialised input layers (the output layer
# starts at zero). Adam moves every element with a steady gradient by about lr per step, which over STEPS
# steps of the warmup-then-cosine schedule moves the regulator by ~37% of |phi_0| here. Requiring 5% (a
# seventh of that) leaves room for other seeds and platforms, while a regulator whose meta-gradient is
# lost (zeroed, clipped away, or swamped by eps: the control run below) stays far under it.
MIN_RELATIVE_CHANGE = 0.05
# gamma's spread is exactly 0 at step 1 (zero-initialised output layer: gamma = gamma_init everywhere).
# 1e-3 means gamma values differing by ~0.2% across prompt elements: 4 orders of magnitude above the fp32
# rounding of sigmoid outputs near 0.5 (~6e-8), and ~9x under what the tiny run reaches in STEPS steps.
MIN_GAMMA_STD = 1e-3
# Control: an eps orders of magnitude above every gradient element (median ~1e-7 here) turns Adam's step
# into lr * g / eps, thousands of times smaller than the normal step: the regulator then barely moves (both figures land
# more than 10x under the thresholds).
SWAMPING_EPS = 1.0
CONTROL_MARGIN = 10

REGULATOR_KEYS = ("regulator_grad_norm", "prompts_grad_norm", "regulator_relative_change", "regulator_update",
                  "regulator_eps_dominated", "meta_grad_norm_regulator", "gamma_mean", "gamma_std",
                  "gamma_min", "gamma_max")


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("tasks"))


def _run(task_data, run_dir, extra=()) -> list[dict]:
    assert pretrain.main(pretrain_overrides(task_data, run_dir, steps=STEPS, extra=extra)) == 0
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage1_regulator_moves_and_gamma_spreads(task_data, tmp_path):
    lines = _run(task_data, tmp_path / "run")
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))  # tracking.log_every=1
    for x in lines:
        for key in REGULATOR_KEYS:
            assert key in x, (x["step"], key)
        assert x["gamma_min"] <= x["gamma_mean"] <= x["gamma_max"]
        assert x["regulator_update"] > 0 and x["regulator_grad_norm"] > 0
    first, last = lines[0], lines[-1]
    change = [x["regulator_relative_change"] for x in lines]
    print(f"stage-1 regulator over {STEPS} steps: relative change {change[-1]:.4f}, gamma std "
          f"{first['gamma_std']:.2e} -> {last['gamma_std']:.4f}, grad norm regulator {last['regulator_grad_norm']:.2e} "
          f"vs prompts {last['prompts_grad_norm']:.2e}, eps-dominated {last['regulator_eps_dominated']:.3f}")
    assert first["gamma_std"] == pytest.approx(0.0, abs=1e-7)  # neutral init
    assert all(b > a for a, b in zip(change, change[1:]))  # it keeps moving away from phi_0
    assert change[-1] > MIN_RELATIVE_CHANGE
    assert last["gamma_std"] > MIN_GAMMA_STD
    assert last["regulator_eps_dominated"] == 0.0

    # The thresholds can fail: the same run with the regulator's update swamped by Adam's eps.
    control = _run(task_data, tmp_path / "control", extra=(f"regulator.adam_eps={SWAMPING_EPS}",))
    print(f"control (adam_eps={SWAMPING_EPS}): relative change {control[-1]['regulator_relative_change']:.2e}, "
          f"gamma std {control[-1]['gamma_std']:.2e}, eps-dominated {control[-1]['regulator_eps_dominated']:.3f}")
    assert control[-1]["regulator_relative_change"] < MIN_RELATIVE_CHANGE / CONTROL_MARGIN
    assert control[-1]["gamma_std"] < MIN_GAMMA_STD / CONTROL_MARGIN
    assert control[-1]["regulator_eps_dominated"] == 1.0


def test_prompts_and_regulator_are_clipped_apart():
    prompts = [torch.zeros(3, requires_grad=True)]
    regulator = [torch.zeros(2, requires_grad=True)]
    prompts[0].grad = torch.tensor([60.0, 80.0, 0.0])  # norm 100
    regulator[0].grad = torch.tensor([3e-4, 4e-4])  # norm 5e-4, inner_lr-sized
    assert clip_gradients_(prompts, 1.0) == pytest.approx(100.0)
    assert clip_gradients_(regulator, 1.0) == pytest.approx(5e-4)
    assert float(prompts[0].grad.norm()) == pytest.approx(1.0)
    assert torch.equal(regulator[0].grad, torch.tensor([3e-4, 4e-4]))  # untouched by the prompts' norm
    regulator[0].grad = torch.tensor([3.0, 4.0])
    assert clip_gradients_(regulator, 0.5) == pytest.approx(5.0) and float(regulator[0].grad.norm()) == pytest.approx(0.5)
    regulator[0].grad = torch.tensor([3.0, 4.0])
    assert clip_gradients_(regulator, 0.0) == pytest.approx(5.0)  # 0 = off: measured, not clipped
    assert torch.equal(regulator[0].grad, torch.tensor([3.0, 4.0]))


def test_regulator_has_its_own_optimizer_group():
    cfg = load_config(PretrainConfig, None, ["data.urls=x.tar", "optim.lr=0.002", "regulator.lr=0.0007",
                                             "regulator.weight_decay=0.1", "regulator.adam_eps=1e-11"])
    prompts, regulator = [torch.zeros(2, requires_grad=True)], [torch.zeros(3, requires_grad=True)]
    prompt_group, regulator_group = build_optimizer(prompts, regulator, cfg).param_groups
    assert prompt_group["params"] == prompts and regulator_group["params"] == regulator
    assert (prompt_group["lr"], prompt_group["eps"]) == (0.002, 1e-8)  # torch's eps for the prompts
    assert (regulator_group["lr"], regulator_group["weight_decay"], regulator_group["eps"]) == (0.0007, 0.1, 1e-11)
    assert len(build_optimizer(prompts, [], cfg).param_groups) == 1  # parameter-free kinds
