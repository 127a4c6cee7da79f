"""Stage-2 methods and controls (docs/ARCHITECTURE.md section 5): every preset runs, each trains on the loss it
claims, the step-matched control matches ProMetaR's prompt updates, the init modes from a stage-1 artifact."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipeline import finetune, finetune_loop
from pipeline.checkpoint import artifact_metadata, load_artifact, save_artifact
from pipeline.config import ConfigError, to_dict
from pipeline.data.datasets_meta import get_info
from pipeline.finetune_config import METHOD_PRESETS, PUBLIC_OUTER_WEIGHT
from pipeline.meta.regulator import Regulator
from pipeline.prompts import first_order_attention
from pipeline.zeroshot import zeroshot_weights

from .helpers.fewshot_data import finetune_overrides, make_coop_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_coop_dataset(tmp_path_factory.mktemp("data"))


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _run(data_root, tmp_path, *extra):
    """Run stage 2 on the tiny dataset; returns the run folder."""
    args = finetune_overrides(data_root, tmp_path, extra)
    assert finetune.main(args) == 0
    cfg = finetune.load_finetune_config(None, args)
    return cfg.run_dir


# ----------------------------------------------------------------------------- every preset


@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
def test_every_preset_runs_end_to_end(data_root, tmp_path, method):
    run = _run(data_root, tmp_path, f"method={method}")
    assert run.name == "seed_1" and run.parent.name == method  # labelled by the preset's name
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == method and res["base"]["total"] == 9 and res["new"]["total"] == 6
    cfg = finetune.load_finetune_config(None, finetune_overrides(data_root, tmp_path, (f"method={method}",)))
    for key, value in METHOD_PRESETS[method].items():  # the recorded config carries every preset field
        node = res["config"]
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    if method == "zeroshot":
        assert res["train"]["steps"] == 0
        return
    assert res["train"]["steps"] == 2
    lines = _metrics(run)
    assert [x["step"] for x in lines] == [1, 2]
    assert all(x["reg_step/task"] == x["reg_step/task"] for x in lines)  # finite task loss every step
    assert any(k.startswith("meta/") for x in lines for k in x) == cfg.meta.meta_step
    assert any(k.startswith("matched_step/") for x in lines for k in x) == cfg.meta.matched_step
    learns_regulator = cfg.meta.meta_step and cfg.regulator.kind in ("modulate", "transform")
    assert ("regulator_lr" in lines[0]) == learns_regulator
    if cfg.meta.meta_step and not learns_regulator:
        assert all(x["meta/regulator_update"] == 0 for x in lines if "meta/regulator_update" in x)


def test_presets_pin_what_tells_them_apart(data_root, tmp_path):
    base = finetune_overrides(data_root, tmp_path)
    public = finetune.load_finetune_config(None, [*base, "method=prometar_public"])
    assert public.meta.outer_weight == PUBLIC_OUTER_WEIGHT == 5e-4 and public.meta.meta_step
    with pytest.raises(ConfigError, match="meta.outer_weight=0.0005 conflicts with method=prometar"):
        finetune.load_finetune_config(None, [*base, "method=prometar", "meta.outer_weight=0.0005"])
    with pytest.raises(ConfigError, match="regulator.kind='constant' conflicts with method=prometar"):
        finetune.load_finetune_config(None, [*base, "regulator.kind=constant"])  # that is prometar_constant_gamma
    with pytest.raises(ConfigError, match="loss.weight_text=50.0 conflicts with method=ivlp"):
        finetune.load_finetune_config(None, [*base, "method=ivlp", "loss.weight_text=50"])
    with pytest.raises(ConfigError, match="meta.matched_step=true .* needs meta.meta_step=false"):
        finetune.load_finetune_config(None, [*base, "meta.matched_step=true"])
    # a control that leaves a value free can be run at the public scale under its own name
    cfg = finetune.load_finetune_config(None, [*base, "method=prometar_step_matched", "meta.outer_weight=0.0005"])
    assert cfg.meta.matched_step and cfg.meta.outer_weight == 5e-4


# ----------------------------------------------------------------------------- the losses trained on


def _spy_iterations(monkeypatch):
    """Record, for each stage-2 iteration, the objective, the batch, the prompts before and after, the result and
    the prompt learning rate."""
    calls = []
    real = finetune_loop.prometar_iteration

    def spy(objective, prompts, regulator, batch, cfg, sgd, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in prompts.items()}
        result = real(objective, prompts, regulator, batch, cfg, sgd, *args, **kwargs)
        calls.append({"objective": objective, "batch": batch, "before": before, "result": result,
                      "after": {k: v.detach().clone() for k, v in prompts.items()},
                      "lr": sgd.param_groups[0]["lr"]})
        return result

    monkeypatch.setattr(finetune_loop, "prometar_iteration", spy)
    return calls


# plain gradient steps at a fixed learning rate, so the first update is exactly lr x the gradient of the loss
PLAIN_SGD = ("optim.warmup_epochs=0", "optim.momentum=0", "optim.weight_decay=0", "optim.lr=0.5")


def _check_first_iteration(call, direct_loss, logged):
    """The logged loss equals ``direct_loss(prompts)`` on the recorded batch, and the prompt update equals lr
    times its gradient."""
    leaf = {k: v.clone().requires_grad_(True) for k, v in call["before"].items()}
    with first_order_attention():  # the attention kernel the iteration's single-backward step runs on
        loss = direct_loss(leaf)
    assert call["result"].regularized.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    assert logged == pytest.approx(float(loss.detach()), rel=1e-5)
    grads = torch.autograd.grad(loss, list(leaf.values()))
    for (k, g) in zip(leaf, grads):
        step = call["before"][k] - call["after"][k]
        assert torch.allclose(step, call["lr"] * g, rtol=1e-4, atol=1e-7), k
        assert step.abs().max() > 0


def test_ivlp_trains_on_the_cross_entropy_alone(data_root, tmp_path, monkeypatch):
    calls = _spy_iterations(monkeypatch)
    run = _run(data_root, tmp_path, "method=ivlp", *PLAIN_SGD)
    first = calls[0]
    model, batch = first["objective"].model, first["batch"]

    def cross_entropy(prompts):
        return F.cross_entropy(model.logits(batch.images, batch.classnames, prompts), batch.labels)

    assert first["result"].regularized.reg == 0.0 and first["result"].meta is None
    _check_first_iteration(first, cross_entropy, _metrics(run)[0]["reg_step/loss"])
    assert _metrics(run)[0]["reg_step/loss"] == _metrics(run)[0]["reg_step/task"]


def test_promptsrc_lite_trains_on_ce_plus_25_l1_text_plus_10_l1_image(data_root, tmp_path, monkeypatch):
    calls = _spy_iterations(monkeypatch)
    run = _run(data_root, tmp_path, "method=promptsrc_lite", *PLAIN_SGD)
    cfg = finetune.load_finetune_config(None, finetune_overrides(data_root, tmp_path, ("method=promptsrc_lite",)))
    # the defaults behind the effective weights: 0.5 x 50 = 25 (text), 0.5 x 20 = 10 (image)
    assert (cfg.regulator.constant_gamma, cfg.loss.weight_text, cfg.loss.weight_image) == (0.5, 50.0, 20.0)
    first = calls[0]
    model, batch = first["objective"].model, first["batch"]
    with torch.no_grad():
        image_0 = model.encode_image(batch.images, None, normalize=True)  # frozen CLIP
        text_0 = zeroshot_weights(model, batch.classnames, (get_info("OxfordPets").template,))

    def ce_plus_l1(prompts):
        image = model.encode_image(batch.images, prompts, normalize=True)
        text = model.encode_classes(batch.classnames, prompts)
        ce = F.cross_entropy(model.logit_scale * image @ text.t(), batch.labels)
        return ce + 25 * (text - text_0).abs().mean() + 10 * (image - image_0).abs().mean()

    _check_first_iteration(first, ce_plus_l1, _metrics(run)[0]["reg_step/loss"])
    assert first["result"].regularized.reg > 0  # the regularizer is really in the loss


# ----------------------------------------------------------------------------- ProMetaR's label space


def test_prometar_support_cross_entropy_is_nonzero_on_every_meta_step(data_root, tmp_path):
    # n_query_classes=5 leaves a single class in every support: scored among its own classes (present) the
    # support cross-entropy is identically zero, among all base classes (all, the default) it is not
    run = _run(data_root, tmp_path, "optim.epochs=3", "meta.n_query_classes=5")
    meta = [x for x in _metrics(run) if "meta/support_task_before" in x]
    assert len(meta) >= 3 and all(x["meta/support_task_before"] > 0 for x in meta)
    run = _run(data_root, tmp_path, "optim.epochs=3", "meta.n_query_classes=5", "meta.task_classes=present",
               "name=present")
    meta = [x for x in _metrics(run) if "meta/support_task_before" in x]
    assert meta and all(x["meta/support_task_before"] == 0 for x in meta)


# ----------------------------------------------------------------------------- step-matched control


def test_step_matched_control_takes_as_many_prompt_updates_as_prometar(data_root, tmp_path, monkeypatch):
    steps: list[float] = []
    real_step = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):  # every prompt update goes through the prompts' SGD
        steps.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    updates, lrs = {}, {}
    for method in ("prometar", "prometar_step_matched", "prometar_no_meta"):
        steps.clear()
        run = _run(data_root, tmp_path, f"method={method}", "optim.epochs=2")
        updates[method], lrs[method] = len(steps), list(steps)
        assert sum(x["prompt_updates"] for x in _metrics(run)) == len(steps)
        assert json.loads((run / "results.json").read_text())["train"]["steps"] == 4
    assert updates["prometar"] == updates["prometar_step_matched"] > updates["prometar_no_meta"] == 4
    assert lrs["prometar"] == lrs["prometar_step_matched"]  # the same learning rate at every update


# ----------------------------------------------------------------------------- init modes from an artifact


def _artifact(tmp_path, cfg, kind="modulate"):
    """A stage-1 artifact shaped for ``cfg`` with a regulator that is not at its initialisation."""
    prompts = {"text": torch.randn(2, 4, 32), "vision": torch.randn(2, 4, 48)}
    regulator = Regulator.for_prompts(prompts, replace(cfg.regulator, kind=kind))
    with torch.no_grad():
        for p in regulator.parameters():
            p.add_(0.1 * torch.randn_like(p))
    meta = artifact_metadata(to_dict(cfg), prompts, {"stage": "pretrain", "steps": 3, "regulator.kind": kind})
    path = tmp_path / f"artifact_{kind}.pt"
    save_artifact(path, prompts, regulator.state_dict(), meta)
    return path, prompts, regulator.state_dict()


def _equal_states(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_regulator_stays_bit_identical_while_prompts_train(data_root, tmp_path):
    cfg = finetune.load_finetune_config(None, finetune_overrides(data_root, tmp_path))
    path, prompts, reg_state = _artifact(tmp_path, cfg)
    run = _run(data_root, tmp_path, "init=artifact", f"artifact={path}", "init_parts=prompts+frozen_regulator",
               "optim.epochs=2", "name=frozen")
    saved = load_artifact(run / "prompts.pt")
    assert _equal_states(saved.regulator_state, reg_state)  # loaded, used, never updated
    assert any(not torch.equal(saved.prompts[k], prompts[k]) for k in prompts)  # the prompts did train
    lines = _metrics(run)
    assert any("meta/outer_loss" in x for x in lines) and not any("regulator_lr" in x for x in lines)  # no optimizer
    train = json.loads((run / "results.json").read_text())["train"]
    assert train["regulator_frozen"] and train["regulator_from_artifact"] and train["prompts_from_artifact"]
    # control: the default part list loads the same regulator and trains it
    run = _run(data_root, tmp_path, "init=artifact", f"artifact={path}", "optim.epochs=2", "name=trained")
    assert not _equal_states(load_artifact(run / "prompts.pt").regulator_state, reg_state)


def test_init_parts_prompts_only_and_regulator_only(data_root, tmp_path):
    base = ("optim.epochs=0",)
    cfg = finetune.load_finetune_config(None, finetune_overrides(data_root, tmp_path))
    path, prompts, reg_state = _artifact(tmp_path, cfg)
    words = load_artifact(_run(data_root, tmp_path, *base, "name=words") / "prompts.pt")

    run = _run(data_root, tmp_path, *base, "init=artifact", f"artifact={path}", "init_parts=prompts", "name=p")
    saved = load_artifact(run / "prompts.pt")
    assert all(torch.equal(saved.prompts[k], prompts[k]) for k in prompts)
    assert _equal_states(saved.regulator_state, words.regulator_state)  # fresh, as without an artifact
    train = json.loads((run / "results.json").read_text())["train"]
    assert train["prompts_from_artifact"] and not train["regulator_from_artifact"]

    run = _run(data_root, tmp_path, *base, "init=artifact", f"artifact={path}", "init_parts=regulator", "name=r")
    saved = load_artifact(run / "prompts.pt")
    assert all(torch.equal(saved.prompts[k], words.prompts[k]) for k in prompts)  # from "a photo of a"
    assert _equal_states(saved.regulator_state, reg_state)
    train = json.loads((run / "results.json").read_text())["train"]
    assert not train["prompts_from_artifact"] and train["regulator_from_artifact"]

    # prompts only never looks at the regulator: an artifact of another regulator kind is fine
    other, _, _ = _artifact(tmp_path, cfg, kind="transform")
    _run(data_root, tmp_path, *base, "init=artifact", f"artifact={other}", "init_parts=prompts", "name=p2")
    with pytest.raises(ValueError, match="regulator.kind='transform'"):
        _run(data_root, tmp_path, *base, "init=artifact", f"artifact={other}", "name=p3")


@pytest.mark.parametrize("extra, pattern", [
    (("method=ivlp", "init=artifact", "artifact=x.pt", "init_parts=regulator"),
     r"init_parts=regulator loads the artifact's regulator, but method=ivlp uses regulator.kind=none"),
    (("method=prometar_constant_gamma", "init=artifact", "artifact=x.pt", "init_parts=prompts+frozen_regulator"),
     r"init_parts=prompts\+frozen_regulator .* regulator.kind=constant, which has no parameters"),
    (("init_parts=prompts",), r"init_parts=prompts takes parts of a stage-1 artifact but init=words"),
    (("init=artifact", "artifact=x.pt", "init_parts=everything"), r"init_parts='everything': expected one of"),
])
def test_init_parts_nonsense_is_refused_naming_the_keys(data_root, tmp_path, extra, pattern):
    with pytest.raises(ConfigError, match=pattern):
        finetune.load_finetune_config(None, finetune_overrides(data_root, tmp_path, extra))
