"""One training state for both stages: one key layout, checkpoints of the earlier per-stage layouts still
resume (and give the same result as an uninterrupted run), and a checkpoint that does not fit the run's
config is refused naming the key."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import finetune, pretrain
from pipeline.checkpoint import list_checkpoints, load_artifact, load_checkpoint, save_checkpoint
from pipeline.config import ConfigError
from pipeline.meta.config import RegulatorConfig
from pipeline.meta.regulator import Regulator
from pipeline.train_state import STATE_FORMAT, TrainState, upgrade_state

from .helpers.fewshot_data import finetune_overrides, make_coop_dataset
from .helpers.tasks import make_task_data, pretrain_overrides


def legacy_stage1(state: dict) -> dict:
    """A current stage-1 checkpoint in the key layout main a6ebfa4's pretrain loop wrote."""
    assert state["format"] == STATE_FORMAT
    return {"step": state["step"], "prompts": state["prompts"], "regulator": state["regulator"],
            "optimizer": state["optimizers"]["meta"], "scheduler": state["schedulers"]["meta"], "rng": state["rng"],
            "nonfinite_total": state["counters"]["nonfinite_steps"], "data_counters": state["data"]["counters"],
            "config": state["config"], "digest": state["digest"], "world_size": state["world_size"]}


def legacy_stage2(state: dict) -> dict:
    """A current stage-2 checkpoint in the key layout main a6ebfa4's finetune loop wrote."""
    out = {"epoch": state["epoch"], "step": state["step"], "nonfinite": state["counters"]["nonfinite_steps"],
           "prompts": state["prompts"], "regulator": state["regulator"], "sgd": state["optimizers"]["prompts"],
           "sched": state["schedulers"]["prompts"], "rng": state["rng"]}
    if "regulator" in state["optimizers"]:
        out.update(adamw=state["optimizers"]["regulator"], reg_sched=state["schedulers"]["regulator"])
    return out


def rewrite_newest(run, convert) -> dict:
    step, path = list_checkpoints(run)[-1]
    old = convert(load_checkpoint(path))
    assert "format" not in old
    save_checkpoint(run, step, old, keep_last=5)
    return old


def _state(width: int = 8) -> TrainState:
    prompts = {"text": torch.randn(2, 4, width, requires_grad=True)}
    regulator = Regulator.for_prompts(prompts, RegulatorConfig(hidden=4))
    opt = torch.optim.AdamW(list(prompts.values()) + list(regulator.parameters()), lr=0.1)
    return TrainState(prompts, regulator, {"meta": opt}, {"meta": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1)},
                      counters={"nonfinite_steps": 0}, data={"counters": {}})


def test_state_round_trips_and_one_layout(tmp_path):
    a = _state()
    a.step, a.counters["nonfinite_steps"], a.data = 7, 2, {"counters": {"samples": 11}}
    a.save(tmp_path, keep_last=1, config={"x": 1})
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1][1])
    assert {"format", "step", "epoch", "prompts", "regulator", "optimizers", "schedulers", "rng", "counters",
            "data", "config"} == set(saved)
    b = _state()
    assert b.resume(tmp_path) is not None
    assert (b.step, b.counters, b.data) == (7, {"nonfinite_steps": 2}, {"counters": {"samples": 11}})
    assert torch.equal(a.prompts["text"], b.prompts["text"])


def test_mismatched_checkpoints_are_refused_naming_the_key(tmp_path):
    _state(width=8).save(tmp_path, keep_last=1)
    with pytest.raises(ConfigError, match=r"prompts.text has shape \(2, 4, 8\) in the checkpoint but \(2, 4, 6\)"):
        _state(width=6).resume(tmp_path)
    other = _state()
    other.optimizers["regulator"] = other.optimizers["meta"]
    with pytest.raises(ConfigError, match=r"optimizers \['meta'\] but this run has \['meta', 'regulator'\]"):
        other.resume(tmp_path)


def test_unknown_layouts_are_refused():
    with pytest.raises(Exception, match="neither the stage-1 nor the stage-2 layout"):
        upgrade_state({"step": 1, "prompts": {}})
    with pytest.raises(Exception, match="format 9"):
        upgrade_state({"format": 9, "step": 1})


def test_stage1_checkpoint_of_the_old_layout_resumes_like_no_interruption(tmp_path, monkeypatch):
    from pipeline import pretrain_loop

    from .test_pretrain import _PreemptAfter

    data = make_task_data(tmp_path / "data")
    full, part = tmp_path / "full", tmp_path / "part"
    assert pretrain.main(pretrain_overrides(data, full, steps=5)) == 0
    monkeypatch.setattr(pretrain_loop, "PreemptionHandler", _PreemptAfter(3))
    assert pretrain.main(pretrain_overrides(data, part, steps=5)) == 0
    monkeypatch.undo()
    rewrite_newest(part, legacy_stage1)
    assert pretrain.main(pretrain_overrides(data, part, steps=5)) == 0
    a, b = load_artifact(full / "artifact.pt"), load_artifact(part / "artifact.pt")
    for k in a.prompts:
        assert torch.allclose(a.prompts[k], b.prompts[k], atol=1e-6, rtol=0), k
    for k in a.regulator_state:
        assert torch.allclose(a.regulator_state[k], b.regulator_state[k], atol=1e-6, rtol=0), k
    assert load_checkpoint(list_checkpoints(part)[-1][1])["format"] == STATE_FORMAT  # rewritten in the new layout


@pytest.mark.parametrize("method", ["prometar", "ivlp"])
def test_stage2_checkpoint_of_the_old_layout_resumes_like_no_interruption(tmp_path, monkeypatch, method):
    from .test_run_folders import kill_after_first_save

    root = make_coop_dataset(tmp_path / "data")
    base = finetune_overrides(root, tmp_path / "runs", (f"method={method}", "optim.epochs=3"))
    assert finetune.main([*base, "name=full"]) == 0
    kill_after_first_save(monkeypatch)  # after epoch 1 of 3
    with pytest.raises(KeyboardInterrupt):
        finetune.main([*base, "name=part"])
    monkeypatch.undo()
    part = tmp_path / "runs" / "OxfordPets" / "part" / "seed_1"
    old = rewrite_newest(part, legacy_stage2)
    assert old["epoch"] == 1 and ("adamw" in old) == (method == "prometar")
    assert finetune.main([*base, "name=part"]) == 0
    full = tmp_path / "runs" / "OxfordPets" / "full" / "seed_1"
    a, b = load_artifact(full / "prompts.pt"), load_artifact(part / "prompts.pt")
    for k in a.prompts:
        assert torch.allclose(a.prompts[k], b.prompts[k], atol=1e-6, rtol=0), k
    for k in a.regulator_state:
        assert torch.allclose(a.regulator_state[k], b.regulator_state[k], atol=1e-6, rtol=0), k
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, part))
    assert (ra["train"]["steps"], ra["base"]["correct"]) == (rb["train"]["steps"], rb["base"]["correct"])


def test_resume_config_policy(caplog):
    from pipeline.train_state import check_resume_config

    old = {"optim": {"lr": 0.1, "steps": 10}, "tracking": {"log_every": 1}}
    with pytest.raises(ConfigError, match=r"optim.lr: 0.1 -> 0.2"):
        check_resume_config(old, {**old, "optim": {"lr": 0.2, "steps": 10}}, ("tracking",), "ckpt")
    with pytest.raises(ConfigError, match=r"optim.lr: 0.1 -> '\(absent\)'"):  # a setting that disappeared
        check_resume_config(old, {**old, "optim": {"steps": 10}}, ("tracking",), "ckpt")
    with caplog.at_level("WARNING", logger="pipeline.train_state"):
        # applied keys and settings added since the checkpoint was written take effect, logged
        check_resume_config(old, {"optim": {"lr": 0.1, "steps": 10, "new_knob": 3}, "tracking": {"log_every": 5}},
                            ("tracking",), "ckpt")
    assert "optim.new_knob changed '(absent)' -> 3" in caplog.text and "tracking.log_every changed 1 -> 5" in caplog.text
