"""Stage 2 entry point: every method end to end on a tiny fake dataset, presets, paths, skip/force, artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import evaluate, finetune
from pipeline.checkpoint import artifact_metadata, load_artifact, save_artifact
from pipeline.config import ConfigError, to_dict
from pipeline.meta.regulator import Regulator

from .helpers.fewshot_data import finetune_overrides, make_coop_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_coop_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("method", ["prometar", "ivlp", "coop", "zeroshot"])
def test_each_method_trains_evaluates_and_writes_results(data_root, tmp_path, method):
    args = finetune_overrides(data_root, tmp_path, (f"method={method}", "seed=2"))
    assert finetune.main(args) == 0
    run = tmp_path / "OxfordPets" / method / "seed_2"  # deterministic: <run_root>/<dataset>/<method>/seed_<seed>
    res = json.loads((run / "results.json").read_text())
    assert (res["dataset"], res["method"], res["seed"], res["trained_on"]) == ("OxfordPets", method, 2, "base")
    assert res["base"]["n_classes"] == 3 and res["new"]["n_classes"] == 2  # 5 classes: ceil(5/2) base
    assert res["base"]["total"] == 9 and res["new"]["total"] == 6
    assert res["hm"] == pytest.approx(evaluate.harmonic_mean(res["base"]["accuracy"], res["new"]["accuracy"]))
    assert res["config"]["data"]["seed"] == 2 and res["git_revision"]
    if method == "zeroshot":
        assert res["train"]["steps"] == 0 and not (run / "prompts.pt").exists()
        return
    assert res["train"]["steps"] == 2  # 3 base classes x 2 shots / batch 4
    art = load_artifact(run / "prompts.pt")
    assert art.metadata["method"] == method and art.metadata["stage"] == "finetune"
    assert set(art.prompts) == ({"text"} if method == "coop" else {"text", "vision"})
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all("lr" in x for x in lines)
    if method == "prometar":  # the regulator learns, with its own explicit learning rate
        assert all(x["meta/regulator_update"] > 0 for x in lines) and "regulator_lr" in lines[0]
    else:
        assert not any(k.startswith("meta/") for k in lines[0])


def test_skip_when_results_exist_force_reruns_and_standalone_evaluate(data_root, tmp_path):
    args = finetune_overrides(data_root, tmp_path, ("method=ivlp",))
    assert finetune.main(args) == 0
    results = tmp_path / "OxfordPets" / "ivlp" / "seed_1" / "results.json"
    first = json.loads(results.read_text())
    out = finetune.run(finetune.load_finetune_config(None, args))
    assert out["skipped"] and json.loads(results.read_text())["time"] == first["time"]
    assert finetune.main([*args, "force=true"]) == 0
    second = json.loads(results.read_text())
    assert second["time"] > first["time"]
    assert second["base"]["accuracy"] == first["base"]["accuracy"]  # same seed: same run
    assert evaluate.main([str(results.parent)]) == 0  # from the saved prompts alone
    third = json.loads(results.read_text())
    for s in ("base", "new"):
        assert third[s]["correct"] == second[s]["correct"]
    assert third["train"] == second["train"]


def test_method_presets_are_explicit_and_conflicts_fail(data_root, tmp_path):
    base = finetune_overrides(data_root, tmp_path)
    cfg = finetune.load_finetune_config(None, [*base, "method=coop"])
    assert cfg.model.prompts.type == "coop" and cfg.regulator.kind == "none" and not cfg.meta.meta_step
    assert cfg.loss.weight_text == 0 and cfg.loss.weight_image == 0
    cfg = finetune.load_finetune_config(None, [*base, "method=ivlp", "seed=3"])  # IVLP: cross-entropy only
    assert cfg.regulator.kind == "none" and not cfg.meta.meta_step and not cfg.meta.matched_step
    assert cfg.loss.weight_text == 0 and cfg.loss.weight_image == 0
    assert cfg.data.seed == 3 and cfg.model.seed == 3 and str(cfg.run_dir).endswith("OxfordPets/ivlp/seed_3")
    cfg = finetune.load_finetune_config(None, [*base, "method=promptsrc_lite"])  # the old `ivlp` recipe
    assert cfg.model.prompts.type == "ivlp" and cfg.regulator.kind == "constant" and not cfg.meta.meta_step
    assert cfg.meta.task_classes == "all"  # ProMetaR's virtual tasks in the full base label space
    with pytest.raises(ConfigError, match="model.prompts.type"):
        finetune.load_finetune_config(None, [*base, "method=coop", "model.prompts.type=ivlp"])
    with pytest.raises(ConfigError, match="meta.meta_step"):
        finetune.load_finetune_config(None, [*base, "meta.meta_step=false"])  # prometar needs the meta step
    with pytest.raises(ConfigError, match="data.seed"):
        finetune.load_finetune_config(None, [*base, "seed=1", "data.seed=2"])
    with pytest.raises(ConfigError, match="artifact"):
        finetune.load_finetune_config(None, [*base, "init=artifact"])
    with pytest.raises(ConfigError, match="method"):
        finetune.load_finetune_config(None, [*base, "method=maple"])
    cfg = finetune.load_finetune_config(None, [*base, "init=random"])
    assert cfg.model.prompts.init_words == ""
    with pytest.raises(ConfigError, match="init_words"):
        finetune.load_finetune_config(None, [*base, "init=random", "model.prompts.init_words=a photo of a"])


def _artifact(tmp_path, cfg, **prompt_changes):
    """An artifact shaped like ``cfg``'s prompts (with changes), e.g. made for another backbone."""
    d = to_dict(cfg)
    d["model"]["backbone"].update(prompt_changes.pop("backbone", {}))
    depth = prompt_changes.pop("depth", 2)
    prompts = {"text": torch.randn(depth, 4, 32), "vision": torch.randn(depth, 4, 48)}
    regulator = Regulator.for_prompts(prompts, cfg.regulator)
    meta = artifact_metadata(d, prompts, {"stage": "pretrain", "steps": 3, "regulator.kind": cfg.regulator.kind})
    path = tmp_path / f"artifact_{len(list(tmp_path.glob('artifact_*')))}.pt"
    save_artifact(path, prompts, regulator.state_dict(), meta)
    return path, prompts


def test_artifact_init_and_refusal_of_mismatches(data_root, tmp_path):
    base = finetune_overrides(data_root, tmp_path, ("optim.epochs=0",))
    cfg = finetune.load_finetune_config(None, base)
    good, prompts = _artifact(tmp_path, cfg)
    args = [*base, "init=artifact", f"artifact={good}", "name=from_stage1"]
    assert finetune.main(args) == 0
    run = tmp_path / "OxfordPets" / "from_stage1" / "seed_1"
    res = json.loads((run / "results.json").read_text())
    assert res["train"]["regulator_from_artifact"] and res["init"] == "artifact"
    saved = load_artifact(run / "prompts.pt").prompts  # 0 epochs: the artifact's prompts unchanged
    assert all(torch.equal(saved[k], prompts[k]) for k in prompts)

    other_arch, _ = _artifact(tmp_path, cfg, backbone={"arch": "tiny-vit"})
    with pytest.raises(ValueError, match=r"backbone.arch='tiny-vit'.*'tiny-vit-s'"):
        finetune.main([*base, "init=artifact", f"artifact={other_arch}", "force=true"])
    deeper, _ = _artifact(tmp_path, cfg, depth=3)
    with pytest.raises(ValueError, match=r"prompts.text shape \(3, 4, 32\) != \(2, 4, 32\)"):
        finetune.main([*base, "init=artifact", f"artifact={deeper}", "force=true"])
    with pytest.raises(ValueError, match="regulator"):  # same prompts, regulator of another width
        finetune.main([*base, "init=artifact", f"artifact={good}", "regulator.hidden=8", "force=true"])


def test_rerun_without_results_resumes_from_the_last_epoch_checkpoint(data_root, tmp_path):
    args = finetune_overrides(data_root, tmp_path, ("method=ivlp", "optim.epochs=2"))
    assert finetune.main(args) == 0
    run = tmp_path / "OxfordPets" / "ivlp" / "seed_1"
    first = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()  # e.g. killed during evaluation
    assert finetune.main(args) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["train"]["steps"] == first["train"]["steps"] == 4 and again["train"]["epochs"] == 2
    assert again["base"]["correct"] == first["base"]["correct"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing trained twice


def test_force_rerun_with_a_refused_artifact_keeps_the_old_checkpoints(data_root, tmp_path):
    base = finetune_overrides(data_root, tmp_path, ("method=ivlp", "optim.epochs=1", "name=kept"))
    assert finetune.main(base) == 0
    run = tmp_path / "OxfordPets" / "kept" / "seed_1"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert before
    cfg = finetune.load_finetune_config(None, base)
    other_arch, _ = _artifact(tmp_path, cfg, backbone={"arch": "tiny-vit"})
    with pytest.raises(ValueError, match="backbone.arch"):
        finetune.main([*base, "init=artifact", f"artifact={other_arch}", "force=true"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # refused before anything was deleted
