"""Fault injection: bad configs and missing files fail before training, naming the key or the path.

docs/ARCHITECTURE.md section 9: unknown keys, wrong types and inconsistent values (n_way larger than the available
concepts, tasks not divisible by the ranks, ZeRO-3 with a functional inner loop...) and missing files
(checkpoints, shards, clusterings, artifacts, datasets) must stop a stage *before* anything runs. Each
test calls an entry point's ``main`` and checks three things: the error type, that the message names
the offending key or path, and that nothing was written to the run folder. The training loops are
replaced by a sentinel, so a check that wrongly lets a bad config through fails the test at once
instead of training (or, for an impossible task, waiting forever in the episode sampler); the
positive controls reach the sentinel, so the checks do not refuse good configs either.

Configs are data, never code: YAML ``!!python/...`` tags and OmegaConf interpolations/resolvers are
refused without running anything (checked with marker files and a canary resolver).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from pipeline import cluster, evaluate, extract, finetune, pretrain
from pipeline.checkpoint import list_checkpoints
from pipeline.config import ConfigError, load_config
from pipeline.distributed import check_launcher

from .helpers.fewshot_data import finetune_overrides, make_coop_dataset
from .helpers.tasks import make_task_data, pretrain_overrides

LAUNCHER_CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "accelerate"


class TrainingStarted(Exception):
    """Raised by the stand-in training loops: the config got past every check."""


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Replace both training loops, and keep launcher variables of the outer shell out of the tests."""
    from pipeline import finetune_loop, pretrain_loop

    def sentinel(cfg, cfg_dict):
        raise TrainingStarted(type(cfg).__name__)

    monkeypatch.setattr(pretrain_loop, "train", sentinel)
    monkeypatch.setattr(finetune_loop, "train", sentinel)
    for var in ("WORLD_SIZE", "RANK", "SLURM_PROCID", "SLURM_NTASKS", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("tasks"))  # 2 domains x 3 concepts x 8 samples, 4 shards


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_coop_dataset(tmp_path_factory.mktemp("pets"))  # 5 classes, 4 train / 2 val / 3 test each


def fails_before_training(call, pattern: str, run_dir: Path | None = None, exc=ConfigError) -> str:
    """Run ``call``; it must raise ``exc`` matching ``pattern`` and leave ``run_dir`` absent."""
    with pytest.raises(exc) as e:
        call()
    msg = str(e.value)
    assert re.search(pattern, msg), f"message does not match {pattern!r}: {msg}"
    if run_dir is not None:
        assert not list_checkpoints(run_dir), f"checkpoint written to {run_dir}"
        assert not run_dir.exists(), f"{run_dir} was created: {sorted(p.name for p in run_dir.rglob('*'))}"
    return msg


def run_pretrain(task_data, run_dir, *extra, steps=2, tasks=2):
    return lambda: pretrain.main(pretrain_overrides(task_data, run_dir, steps=steps, tasks=tasks, extra=extra))


def run_finetune(root, run_root, *extra):
    return lambda: finetune.main(finetune_overrides(root, run_root, extra))


def ft_run_dir(run_root, name="prometar"):
    return run_root / "OxfordPets" / name / "seed_1"


def test_good_configs_reach_training(task_data, data_root, tmp_path):
    """Positive controls: the checks below refuse faults, not valid configs."""
    with pytest.raises(TrainingStarted):
        run_pretrain(task_data, tmp_path / "p")()
    with pytest.raises(TrainingStarted):  # a subset of the clustered shards that still holds the tasks
        run_pretrain({**task_data, "urls": task_data["urls"].replace("000003", "000002")}, tmp_path / "p",
                     "episodes.k_shot=1", "episodes.q_query=1")()
    with pytest.raises(TrainingStarted):
        run_finetune(data_root, tmp_path / "f")()
    assert not (tmp_path / "p").exists() and not (tmp_path / "f").exists()


# ----------------------------------------------------------------------------- keys, types, values
@pytest.mark.parametrize("override, pattern", [
    ("tasks_per_stp=2", r"unknown key 'tasks_per_stp' \(did you mean 'tasks_per_step'\?\)"),
    ("episodes.nway=2", r"unknown key 'episodes.nway' \(did you mean 'episodes.n_way'\?\)"),
    ("model.backbone.arhc=tiny-vit", r"'model.backbone.arhc' \(did you mean 'model.backbone.arch'\?\)"),
    ("optim.stepz=3", r"did you mean 'optim.steps'"),
    ("zzz.qqq=1", r"unknown key 'zzz' \(valid keys at the top level: run_dir, model, data"),
])
def test_unknown_keys_name_the_key_and_suggest(task_data, tmp_path, override, pattern):
    fails_before_training(run_pretrain(task_data, tmp_path / "run", override), pattern, tmp_path / "run")


def test_unknown_keys_in_yaml_and_in_stage2(task_data, data_root, tmp_path):
    f = tmp_path / "delta.yaml"
    f.write_text("episodes:\n  n_way: 2\n  q_querry: 3\n")
    args = ["--config", str(f), *pretrain_overrides(task_data, tmp_path / "run")]
    msg = fails_before_training(lambda: pretrain.main(args), r"'episodes.q_querry'.*'episodes.q_query'", tmp_path / "run")
    assert str(f) in msg  # which layer said it
    fails_before_training(run_finetune(data_root, tmp_path / "ft", "optim.epoch=3"),
                          r"unknown key 'optim.epoch' \(did you mean 'optim.epochs'\?\)", tmp_path / "ft")
    fails_before_training(run_finetune(data_root, tmp_path / "ft", "data.shots=2"), r"'data.shots'", tmp_path / "ft")


@pytest.mark.parametrize("yaml_text, pattern", [
    ("tasks_per_step: four\n", r"'tasks_per_step'.*'four'.*Integer"),  # string for int
    ("tasks_per_step: [2, 4]\n", r"'tasks_per_step'.*could not be converted to Integer"),  # list for scalar
    ("optim:\n  lr: {peak: 0.1}\n", r"'optim.lr'.*Float"),  # mapping for scalar
    ("episodes: 3\n", r"'episodes' is a section \(EpisodeConfig\).*got int 3"),  # scalar for section
    ("tasks_per_step: 2.5\n", r"'tasks_per_step'.*2.5"),  # float for int
    ("seed: null\n", r"'seed'.*None"),  # null for a non-optional field
    ("cpu: maybe\n", r"'cpu'.*not a valid bool"),
    ("frozen_templates: 'a photo of {}'\n", r"'frozen_templates'.*str is not"),  # scalar for a list
    ("run_dir: 2024-01-01\n", r"run_dir: YAML read .* as date"),  # YAML 1.1 typed a path as a date
    ("tracking:\n  tags: [ok, 2024-01-02]\n", r"tracking.tags\[1\]: YAML read"),
    ("1: x\n", r"key '1' is of type int"),
    ("seed: ???\n", r"seed='\?\?\?': give a value"),  # a merge would silently keep the default
])
def test_wrong_types_and_values_name_the_key(task_data, tmp_path, yaml_text, pattern):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    args = ["--config", str(f), *pretrain_overrides(task_data, tmp_path / "run")]
    fails_before_training(lambda: pretrain.main(args), pattern, tmp_path / "run")


@pytest.mark.parametrize("override, pattern", [
    ("mixed_precision=fp16", r"mixed_precision='fp16'"),
    ("regulator.kind=magic", r"regulator.kind='magic': expected one of"),
    ("meta.task_classes=some", r"meta.task_classes='some'"),
    ("model.backbone.precision=fp8", r"backbone.precision='fp8'"),
    ("model.prompts.type=maple2", r"prompts.type='maple2'"),
    ("tracking.wandb_mode=cloud", r"tracking.wandb_mode='cloud'"),
    ("episodes.p_cross_domain=1.5", r"episodes.p_cross_domain=1.5"),
    ("episodes.buffer_per_concept=3", r"episodes.buffer_per_concept=3 must be >= k_shot \+ q_query"),
    ("frozen_templates=[a photo]", r"frozen_templates: 'a photo' has no '\{\}'"),
    ("model.prompts.depth_text=99", r"model.prompts.depth_text=99 exceeds the 4 text layers of tiny-vit-s"),
])
def test_bad_values_stage1(task_data, tmp_path, override, pattern):
    fails_before_training(run_pretrain(task_data, tmp_path / "run", override), pattern, tmp_path / "run")


@pytest.mark.parametrize("extra, pattern", [
    (("method=maple",), r"method='maple'"),
    (("init=pretrained",), r"init='pretrained'"),
    (("data.dataset=Pets",), r"data.dataset='Pets'"),
    (("data.subsample=half",), r"data.subsample='half'"),
    (("eval.subsets=[base,old]",), r"eval.subsets: 'old'"),
    (("eval.targets=[ImageNetV3]",), r"eval.targets: 'ImageNetV3' is not a dataset"),
    (("frozen_templates=[a photo]",), r"frozen_templates: 'a photo' has no '\{\}'"),
    # method presets against explicit settings (the preset never silently wins)
    (("method=coop", "regulator.kind=modulate"), r"regulator.kind='modulate' conflicts with method=coop"),
    (("method=coop", "loss.weight_text=10"), r"loss.weight_text=10.0 conflicts with method=coop"),
    (("method=ivlp", "regulator.kind=transform"), r"regulator.kind='transform' conflicts with method=ivlp"),
    (("method=zeroshot", "model.prompts.type=ivlp"), r"model.prompts.type='ivlp' conflicts with method=zeroshot"),
    (("method=zeroshot", "init=artifact", "artifact=x.pt"), r"method=zeroshot trains no prompts"),
    (("artifact=x.pt",), r"artifact='x.pt' is set but init='words'"),
    (("init_parts=regulator",), r"init_parts=regulator takes parts of a stage-1 artifact but init=words"),
    (("method=ivlp", "init=artifact", "artifact=x.pt", "init_parts=prompts+frozen_regulator"),
     r"init_parts=prompts\+frozen_regulator loads the artifact's regulator, but method=ivlp uses regulator.kind=none"),
    (("method=prometar", "meta.outer_weight=0.0005"), r"meta.outer_weight=0.0005 conflicts with method=prometar"),
    (("method=prometar_no_meta", "meta.matched_step=true"), r"meta.matched_step=True conflicts with method=prometar_no_meta"),
    (("meta.inner_steps=0",), r"meta.inner_steps must be >= 1 when meta.meta_step is true"),
    (("model.seed=2",), r"model.seed=2 disagrees with seed=1"),
])
def test_bad_values_and_conflicts_stage2(data_root, tmp_path, extra, pattern):
    fails_before_training(run_finetune(data_root, tmp_path / "ft", *extra), pattern, tmp_path / "ft")


def test_missing_config_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    fails_before_training(lambda: pretrain.main(["--config", str(missing)]), re.escape(f"{missing}: no such file"))
    fails_before_training(lambda: finetune.main(["--config", str(missing)]), re.escape(str(missing)))
    fails_before_training(lambda: cluster.main(["--config", str(tmp_path)]), "not a file")


# ----------------------------------------------------------------------------- stage 1 consistency
def test_n_way_larger_than_available_concepts(task_data, tmp_path):
    run = tmp_path / "run"
    fails_before_training(run_pretrain(task_data, run, "episodes.n_way=4"),
                          r"episodes.n_way=4 but the clustering has at most 3 usable concepts in one domain", run)
    # each concept has 8 samples: 5 + 4 per task leaves no usable concept at all
    fails_before_training(run_pretrain(task_data, run, "episodes.k_shot=5", "episodes.q_query=4",
                                       "episodes.buffer_per_concept=16"),
                          r"n_way=2 but the clustering has at most 0 usable concepts.*k_shot \+ q_query = 9", run)


def test_n_way_counts_only_the_shards_in_use(task_data, tmp_path):
    """concepts.json counts every clustered shard; one shard of 12 samples holds 2 per concept."""
    one = {**task_data, "urls": task_data["urls"].rsplit("/", 1)[0] + "/000001.tar"}
    fails_before_training(run_pretrain(one, tmp_path / "run"),
                          r"n_way=2 but the clustering has at most 0 usable concepts.*assignments of the 1 shards",
                          tmp_path / "run")


def test_duplicate_concept_names_count_once(task_data, tmp_path):
    """The sampler needs distinct class names in a task; equal names would make it wait forever."""
    clusters = tmp_path / "clusters"
    shutil.copytree(task_data["clusters_dir"], clusters)
    concepts = json.loads((clusters / "concepts.json").read_text())
    for c in concepts:
        c["name"] = f"thing of domain {c['domain']}"
    (clusters / "concepts.json").write_text(json.dumps(concepts))
    fails_before_training(run_pretrain({**task_data, "clusters_dir": str(clusters)}, tmp_path / "run"),
                          r"n_way=2 but the clustering has at most 1 usable concepts", tmp_path / "run")


def test_cross_domain_queries_need_two_domains(tmp_path):
    data = make_task_data(tmp_path / "one", domains=1, concepts_per_domain=3, per_concept=6)
    fails_before_training(run_pretrain(data, tmp_path / "run"),
                          r"episodes.p_cross_domain=0.5 needs 2 domains with n_way=2 usable concepts but the "
                          r"clustering has 1", tmp_path / "run")
    with pytest.raises(TrainingStarted):  # same-domain tasks only: fine
        run_pretrain(data, tmp_path / "run", "episodes.p_cross_domain=0")()


def test_tasks_per_step_not_divisible_by_world_size(task_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun / accelerate launch export to every rank
    fails_before_training(run_pretrain(task_data, run, tasks=2),
                          r"tasks_per_step=2 is not divisible by the 3 ranks.*WORLD_SIZE=3", run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingStarted):
        run_pretrain(task_data, run, tasks=4)()
    monkeypatch.delenv("WORLD_SIZE")  # plain `srun python -m pipeline.pretrain` with 4 tasks
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    fails_before_training(run_pretrain(task_data, run, tasks=6), r"tasks_per_step=6 is not divisible by the 4 ranks", run)


def _launcher_env(tmp_path: Path, zero_stage: int | None) -> dict[str, str]:
    """The variables ``accelerate launch --config_file <ours with zero_stage>`` exports to the script
    (``zero_stage=None``: the key removed from the launcher config)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    cfg = yaml.safe_load((LAUNCHER_CONFIGS / "deepspeed.yaml").read_text())
    assert cfg["deepspeed_config"]["zero_stage"] == 0  # the one stage accepted
    if zero_stage is None:
        del cfg["deepspeed_config"]["zero_stage"]
    else:
        cfg["deepspeed_config"]["zero_stage"] = zero_stage
    cfg["num_processes"] = 2
    path = tmp_path / f"deepspeed_stage{zero_stage}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = launch_command_parser().parse_args(["--config_file", str(path), "pipeline/pretrain.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def test_deepspeed_zero3_launcher_config_is_refused(task_data, tmp_path, monkeypatch):
    env = _launcher_env(tmp_path, 3)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    # without the check, accelerate failed on an unrelated transformers import (GPU) or, with cpu=true,
    # silently dropped DeepSpeed
    for cpu in ("cpu=true", "cpu=false"):
        fails_before_training(run_pretrain(task_data, run, cpu), r"DeepSpeed ZeRO-3 \(ACCELERATE_DEEPSPEED_ZERO_STAGE=3\)"
                              r".*second-order meta-gradients.*set zero_stage: 0.*launch/accelerate/deepspeed.yaml", run)
    msg = fails_before_training(run_pretrain(task_data, run, "meta.first_order=true"), r"ZeRO-3", run)
    assert "second-order" not in msg
    # a DeepSpeed JSON file given by the launcher config wins over the accelerate fields
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    fails_before_training(run_pretrain(task_data, run), re.escape(f"DeepSpeed ZeRO-3 (zero_optimization.stage=3 in {ds})"), run)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "missing.json"))
    fails_before_training(run_pretrain(task_data, run), r"ACCELERATE_DEEPSPEED_CONFIG_FILE.*missing.json does not exist",
                          run)


def test_deepspeed_zero1_2_and_missing_stage_are_refused_zero0_passes(task_data, tmp_path, monkeypatch):
    """ZeRO-1/2 would be accepted and do nothing (stage 1 builds no DeepSpeed engine); a launcher config
    without ``zero_stage`` gets accelerate's default, ZeRO-2, and is refused the same way."""
    run = tmp_path / "run"
    for stage in (2, None):
        env = _launcher_env(tmp_path, stage)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        source = (r"ACCELERATE_DEEPSPEED_ZERO_STAGE=2" if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env
                  else r"ACCELERATE_DEEPSPEED_ZERO_STAGE not set: accelerate's default is ZeRO-2")
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            fails_before_training(run_pretrain(task_data, run), rf"DeepSpeed ZeRO-2 \({source}\) would be accepted and "
                                  r"do nothing: stage 1 builds no DeepSpeed engine.*at most ~12 MB per GPU; "
                                  r"set zero_stage: 0.*launch/accelerate/deepspeed.yaml.*multi_gpu.yaml", run)
    cfg = pretrain.parse(pretrain_overrides(task_data, run))
    ds = tmp_path / "ds.json"  # a DeepSpeed JSON stage wins over the launcher's, both ways
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match=re.escape(f"DeepSpeed ZeRO-1 (zero_optimization.stage=1 in {ds})")):
        check_launcher(cfg.tasks_per_step, True, {**_launcher_env(tmp_path, 0), "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})
    # ZeRO-0 (launch/accelerate/deepspeed.yaml as shipped: DeepSpeed as launcher and process group) passes
    env = _launcher_env(tmp_path, 0)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "0"
    check_launcher(cfg.tasks_per_step, True, env)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TrainingStarted):
        run_pretrain(task_data, run)()


# ----------------------------------------------------------------------------- stage 1 missing files
def test_missing_backbone_checkpoint_and_bad_arch(task_data, data_root, tmp_path):
    missing = tmp_path / "weights" / "clip.pt"
    run = tmp_path / "run"
    fails_before_training(run_pretrain(task_data, run, f"model.backbone.pretrained={missing}"),
                          re.escape(f"model.backbone.pretrained='{missing}': no such checkpoint file"), run)
    fails_before_training(run_pretrain(task_data, run, f"model.backbone.pretrained={tmp_path}"),
                          r"model.backbone.pretrained=.* is a directory", run)
    fails_before_training(run_pretrain(task_data, run, "model.backbone.pretrained=laion9b"),
                          r"'laion9b' is neither a checkpoint file nor a tag of tiny-vit-s", run)
    fails_before_training(run_pretrain(task_data, run, "model.backbone.arch=tiny-vit-z"),
                          r"model.backbone.arch='tiny-vit-z' is not an open_clip architecture \(close: tiny-vit", run)
    fails_before_training(run_finetune(data_root, tmp_path / "ft", f"model.backbone.pretrained={missing}"),
                          re.escape(f"model.backbone.pretrained='{missing}'"), tmp_path / "ft")
    feats = tmp_path / "features"
    fails_before_training(lambda: extract.main([f"urls={task_data['urls']}", f"out_dir={feats}", "cpu=true",
                                                "backbone.arch=tiny-vit-s", f"backbone.pretrained={missing}"]),
                          re.escape(f"backbone.pretrained='{missing}'"), feats)


def test_shard_urls_matching_nothing(task_data, tmp_path):
    run = tmp_path / "run"
    folder = task_data["urls"].rsplit("/", 1)[0]
    typo = f"{folder}x/{{000000..000003}}.tar"
    fails_before_training(run_pretrain({**task_data, "urls": typo}, run),
                          re.escape(f"data.urls='{typo}': none of the 4 shard files exists (first: {folder}x/000000.tar)"),
                          run)
    past = f"{folder}/{{000010..000012}}.tar"
    fails_before_training(run_pretrain({**task_data, "urls": past}, run), r"none of the 3 shard files exists", run)
    feats = tmp_path / "features"
    args = [f"urls={typo}", f"out_dir={feats}", "cpu=true", "backbone.arch=tiny-vit-s", "backbone.pretrained="]
    fails_before_training(lambda: extract.main(args), re.escape(f"urls='{typo}': none of the 4 shard files"), feats)


def test_extract_refuses_missing_shards_and_never_marks_unreadable_ones_done(task_data, tmp_path):
    folder = Path(task_data["urls"].rsplit("/", 1)[0])
    feats = tmp_path / "features"
    urls = f"{folder}/{{000002..000005}}.tar"  # 000004 and 000005 do not exist
    cfg = extract.ExtractConfig(urls=urls, out_dir=str(feats), cpu=True, workers=0)
    fails_before_training(lambda: extract.run(cfg), rf"urls: 2 of the 4 shards to embed do not exist \(first: "
                          rf"{re.escape(str(folder))}/000004.tar\)", feats)
    garbage = tmp_path / "shards" / "000000.tar"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a tar file" * 10)
    args = [f"urls={garbage}", f"out_dir={feats}", "cpu=true", "workers=0", "backbone.arch=tiny-vit-s",
            "backbone.pretrained="]
    with pytest.warns(UserWarning, match="unreadable"):
        assert extract.main(args) == 1  # failed, so a SLURM array task shows it
    assert not (feats / "000000.done").exists()  # a rerun retries it instead of skipping an empty "done" shard


def test_missing_or_foreign_clustering(task_data, tmp_path):
    run = tmp_path / "run"
    nowhere = tmp_path / "clusters_typo"
    fails_before_training(run_pretrain({**task_data, "clusters_dir": str(nowhere)}, run),
                          re.escape(f"data.clusters_dir: {nowhere} does not exist"), run)
    clusters = tmp_path / "clusters"
    (clusters / "assign").mkdir(parents=True)
    fails_before_training(run_pretrain({**task_data, "clusters_dir": str(clusters)}, run),
                          re.escape(f"data.clusters_dir: {clusters / 'concepts.json'} does not exist"), run)
    (clusters / "concepts.json").write_text('[{"id": 0, "domain": 0}]')
    fails_before_training(run_pretrain({**task_data, "clusters_dir": str(clusters)}, run),
                          r"concepts.json is not a concepts file of `pipeline cluster` \(KeyError", run)
    # concepts.json but no assignment for these shards: every sample would be unassigned and the episode
    # sampler would wait forever (it did, before this check)
    shutil.copy(Path(task_data["clusters_dir"]) / "concepts.json", clusters / "concepts.json")
    fails_before_training(run_pretrain({**task_data, "clusters_dir": str(clusters)}, run),
                          r"none of the 4 shards of data.urls has an assignment file \(looked for "
                          + re.escape(str(clusters / "assign" / "000000.npz")), run)
    np.savez(clusters / "assign" / "000000.npz", keys=np.array(["x"]), concept=np.array([0]))
    np.savez(clusters / "assign" / "999999.npz", keys=np.array(["x"]), concept=np.array([0]))
    (clusters / "assign" / "000001.npz").write_bytes(b"garbage")
    fails_before_training(run_pretrain({**task_data, "clusters_dir": str(clusters)}, run),
                          r"000001.npz is not an assignment file", run)


def test_cluster_stage_missing_inputs(task_data, tmp_path):
    out = tmp_path / "clusters"
    fails_before_training(lambda: cluster.main([f"features_dir={tmp_path / 'nofeatures'}", f"out_dir={out}"]),
                          re.escape(f"features_dir: {tmp_path / 'nofeatures'} does not exist"), out)
    feats = tmp_path / "features"  # one real feature file, so the stage gets as far as the mode's inputs
    from pipeline.data.features import ShardFeatures, write_features

    vec = np.eye(4, dtype=np.float16)
    write_features(feats, "000000", ShardFeatures(np.array(list("abcd")), np.array(list("abcd")), vec, vec))
    fails_before_training(lambda: cluster.main([f"features_dir={feats}", f"out_dir={out}", "mode=assign"]),
                          r"mode=assign needs the hierarchy of mode=fit", out)
    assert "hierarchy.npz" in fails_before_training(
        lambda: cluster.main([f"features_dir={feats}", f"out_dir={out}", "mode=summarize"]), "does not exist", out)
    assert cluster.main([f"features_dir={feats}", f"out_dir={out}", "mode=fit", "n_domains=1",
                         "concepts_per_domain=1", "min_points_per_concept=1"]) == 0
    fails_before_training(lambda: cluster.main([f"features_dir={feats}", f"out_dir={out}", "mode=summarize"]),
                          re.escape(f"out_dir: no assignment files in {out / 'assign'}; run mode=assign first"))
    fails_before_training(lambda: cluster.main([f"features_dir={feats}", "kmeans.nredo=0"]), r"kmeans.nredo=0")


# ----------------------------------------------------------------------------- stage 2 missing files
def test_missing_artifact_for_init_artifact(data_root, tmp_path):
    missing = tmp_path / "stage1" / "artifact.pt"
    fails_before_training(run_finetune(data_root, tmp_path / "ft", "init=artifact", f"artifact={missing}"),
                          re.escape(f"artifact: {missing} does not exist; init=artifact needs"), tmp_path / "ft")


def test_missing_dataset_files(data_root, tmp_path):
    ft = tmp_path / "ft"
    missing = tmp_path / "no_data"
    fails_before_training(run_finetune(missing, ft), re.escape(f"data.root: {missing} does not exist"), ft)
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_before_training(run_finetune(empty, ft), re.escape(
        f"dataset OxfordPets under data.root={empty}: {empty / 'oxford_pets' / 'split_zhou_OxfordPets.json'} does not exist"),
        ft)
    fails_before_training(run_finetune(data_root, ft, f"data.split_file={tmp_path / 'split.json'}"),
                          re.escape(f"data.split_file: {tmp_path / 'split.json'} does not exist"), ft)
    moved = tmp_path / "moved"  # split file present, images elsewhere
    (moved / "oxford_pets").mkdir(parents=True)
    shutil.copy(data_root / "oxford_pets" / "split_zhou_OxfordPets.json", moved / "oxford_pets")
    fails_before_training(run_finetune(moved, ft), r"its train split lists .*kind_0/train_0.png, which does not exist",
                          ft)
    (moved / "oxford_pets" / "split_zhou_OxfordPets.json").write_text('{"train": []}')
    fails_before_training(run_finetune(moved, ft), r"is malformed: ValueError: .*split file lacks", ft)


def test_eval_target_missing_fails_before_training(data_root, tmp_path):
    fails_before_training(run_finetune(data_root, tmp_path / "ft", "eval.targets=[DescribableTextures]"),
                          r"eval.targets \(DescribableTextures\): dataset DescribableTextures under data.root=.*"
                          r"dtd/split_zhou_DescribableTextures.json does not exist", tmp_path / "ft")


def test_k_shot_larger_than_images_per_class(data_root, tmp_path):
    ft = tmp_path / "ft"
    fails_before_training(run_finetune(data_root, ft, "data.k_shot=5"),
                          r"data.k_shot=5 but 3 of the 3 base classes of OxfordPets have fewer training images "
                          r"\(fewest: 'kind.0' with 4\).*allow_fewer_shots=true", ft)
    with pytest.raises(TrainingStarted):  # the explicit opt-in to CoOp's behaviour
        run_finetune(data_root, ft, "data.k_shot=5", "allow_fewer_shots=true")()
    with pytest.raises(TrainingStarted):  # zero-shot trains nothing, so shots do not matter
        run_finetune(data_root, ft, "data.k_shot=5", "method=zeroshot")()


def test_launcher_with_several_ranks_is_refused_in_stage2(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    fails_before_training(run_finetune(data_root, tmp_path / "ft"), r"stage 2 runs in one process.*WORLD_SIZE",
                          tmp_path / "ft")


def test_evaluate_missing_run_files(data_root, tmp_path):
    fails_before_training(lambda: evaluate.main([str(tmp_path / "no_run")]),
                          re.escape(f"run_dir: {tmp_path / 'no_run'} does not exist"))
    run = tmp_path / "run"
    run.mkdir()
    fails_before_training(lambda: evaluate.main([str(run)]), r"run_info.json does not exist; not a run folder")
    cfg = finetune.load_finetune_config(None, finetune_overrides(data_root, tmp_path))
    from pipeline.config import to_dict

    (run / "run_info.json").write_text(json.dumps({"config": to_dict(cfg)}))
    fails_before_training(lambda: evaluate.main([str(run)]), r"prompts.pt does not exist; the run has not finished")
    zs = finetune.load_finetune_config(None, [*finetune_overrides(data_root, tmp_path), "method=zeroshot"])
    (run / "run_info.json").write_text(json.dumps({"config": to_dict(zs)}))
    fails_before_training(lambda: evaluate.main([str(run), "--root", str(tmp_path / "elsewhere")]),
                          re.escape(f"data.root: {tmp_path / 'elsewhere'} does not exist"))
    fails_before_training(lambda: evaluate.main([str(run), "--targets", "ImageNetV3"]), r"--targets: 'ImageNetV3'")
    assert not (run / "results.json").exists()


# ----------------------------------------------------------------------------- configs cannot run code
@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!!python/module:os"])
def test_yaml_python_tags_are_refused_and_not_executed(task_data, data_root, tmp_path, tag):
    marker = Path(f"/tmp/pwned_{uuid.uuid4().hex}")
    f = tmp_path / "evil.yaml"
    f.write_text(f'seed: {tag} ["touch {marker}"]\n' if "apply" in tag or "new" in tag else f"seed: {tag} ''\n")
    calls = [
        lambda: pretrain.main(["--config", str(f), *pretrain_overrides(task_data, tmp_path / "run")]),
        lambda: finetune.main(["--config", str(f), *finetune_overrides(data_root, tmp_path / "ft")]),
        lambda: extract.main(["--config", str(f)]),
        lambda: cluster.main(["--config", str(f)]),
    ]
    for call in calls:
        fails_before_training(call, re.escape(str(f)) + r": not a plain-data YAML config .*python/", tmp_path / "run")
        assert not marker.exists(), "a YAML tag executed a command"
    with pytest.raises(ConfigError, match="python/object/apply"):  # the same through a command-line override
        pretrain.main([*pretrain_overrides(task_data, tmp_path / "run"), f'seed=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


@pytest.fixture
def canary():
    """A custom OmegaConf resolver recording every call (as a library registering ``eval`` would)."""
    calls = []
    OmegaConf.register_resolver("canary", lambda *a: calls.append(a) or "resolved", replace=True)
    yield calls
    OmegaConf.clear_resolver("canary")


@pytest.mark.parametrize("text", ["run_dir: ${canary:rm -rf}\n", "run_dir: ${oc.env:HOME}\n",
                                  "tracking:\n  name: prefix-${canary:x}\n", "frozen_templates: ['${canary:1} {}']\n",
                                  "seed: ${oc.decode:'${canary:2}'}\n", "run_dir: \\${escaped}\n"])
def test_interpolations_and_resolvers_are_refused(task_data, data_root, tmp_path, canary, text):
    f = tmp_path / "interp.yaml"
    f.write_text(text)
    fails_before_training(lambda: pretrain.main(["--config", str(f), *pretrain_overrides(task_data, tmp_path / "r")]),
                          r"interpolations and resolvers \(\$\{\.\.\.\}\) are not allowed", tmp_path / "r")
    f.write_text(text.replace("run_dir:", "name:"))  # stage 2 looks presets up on the merged config: no
    fails_before_training(                            # resolver may run there either
        lambda: finetune.main(["--config", str(f), *finetune_overrides(data_root, tmp_path / "f")]),
        r"interpolations and resolvers \(\$\{\.\.\.\}\) are not allowed", tmp_path / "f")
    fails_before_training(lambda: finetune.main([*finetune_overrides(data_root, tmp_path / "f"), "name=${canary:y}"]),
                          r"override 'name=\$\{canary:y\}': name='\$\{canary:y\}': interpolations", tmp_path / "f")
    assert canary == [], "a resolver ran"


def test_stored_configs_are_data_too(data_root, tmp_path, canary):
    """A tampered run_info.json (read back by pipeline.evaluate) cannot run a resolver either."""
    cfg = finetune.load_finetune_config(None, finetune_overrides(data_root, tmp_path))
    from pipeline.config import to_dict

    d = to_dict(cfg)
    d["tracking"]["name"] = "${canary:stored}"
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({"config": d}))
    fails_before_training(lambda: evaluate.main([str(run)]), r"stored config: tracking.name='\$\{canary:stored\}'")
    assert canary == []


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """A 1 kB YAML whose aliases expand to 10^9 values: refused at once instead of eating memory."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines.append("frozen_templates: *a8")
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(lines) + "\n")
    loop = tmp_path / "loop.yaml"
    loop.write_text("frozen_templates: &a ['{}', *a]\n")  # contains itself: expands without end

    def too_slow(signum, frame):  # fail the test instead of expanding for hours
        raise TimeoutError("loading the alias bomb was not stopped within 5 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(5)
    try:
        for path in (f, loop):
            with pytest.raises(ConfigError, match=r"expands to more than 100000 values \(YAML aliases\?\)"):
                load_config(pretrain.PretrainConfig, path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- YAML syntax, duplicate keys
def _stage_calls(f: Path, task_data, data_root, tmp_path) -> list:
    """Every stage that reads a YAML file, given ``f`` (pretrain, finetune, extract, cluster)."""
    return [
        lambda: pretrain.main(["--config", str(f), *pretrain_overrides(task_data, tmp_path / "run")]),
        lambda: finetune.main(["--config", str(f), *finetune_overrides(data_root, tmp_path / "ft")]),
        lambda: extract.main(["--config", str(f)]),
        lambda: cluster.main(["--config", str(f)]),
    ]


def test_yaml_syntax_error_names_file_line_and_column(task_data, data_root, tmp_path):
    """Before: `not a plain-data YAML config (... python tags are refused ...)`, blaming a tag that is not there."""
    f = tmp_path / "broken.yaml"
    f.write_text("episodes:\n  n_way: 2\n  k_shot: [1\n")
    for call in _stage_calls(f, task_data, data_root, tmp_path):
        msg = fails_before_training(call, re.escape(f"{f}: YAML syntax error at line 4, column 1: expected ',' or ']'")
                                    + r".*\(while parsing a flow sequence at line 3, column 11\)", tmp_path / "run")
        assert "python tags" not in msg


def test_duplicate_yaml_keys_are_refused_naming_key_and_line(task_data, data_root, tmp_path):
    """Before: `safe_load` kept the last value silently (here n_way=3, and a finetune seed of 2)."""
    f = tmp_path / "dup.yaml"
    f.write_text("episodes:\n  n_way: 2\n  k_shot: 1\n  n_way: 3\n")
    for call in _stage_calls(f, task_data, data_root, tmp_path):
        fails_before_training(call, re.escape(f"{f}: duplicate key 'n_way' at line 4 (first given at line 2)"),
                              tmp_path / "run")
    f.write_text("seed: 1\nname: a\nseed: 2\n")
    fails_before_training(lambda: finetune.main(["--config", str(f), *finetune_overrides(data_root, tmp_path / "ft")]),
                          re.escape(f"{f}: duplicate key 'seed' at line 3 (first given at line 1)"), tmp_path / "ft")


# ----------------------------------------------------------------------------- one-line errors on the command line
ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ["pipeline/pretrain.py", "pipeline/finetune.py", "pipeline/evaluate.py", "pipeline/extract.py",
                 "pipeline/cluster.py", "pipeline/report.py", "pipeline/data/shard_writer.py",
                 "pipeline/digits_demo/run.py", "pipeline/digits_demo/data.py"]


def _raises(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, monkeypatch):
    """run_main: config, checkpoint and artifact errors -> `error: <message>` on stderr, status 2; bugs keep
    their traceback; PIPELINE_TRACEBACK=1 keeps it for user errors too; main(argv) itself still raises."""
    from pipeline import cli
    from pipeline.checkpoint import CheckpointError, UnsafeCheckpointError
    from pipeline.config import run_main

    monkeypatch.delenv("PIPELINE_TRACEBACK", raising=False)
    user = [ConfigError("seed: bad\n  value"), CheckpointError("x.pt: unreadable (truncated or corrupt)"),
            UnsafeCheckpointError("x.pt: refusing to load"), ValueError("incompatible artifact: prompts.text shape")]
    for exc in user:
        assert run_main(_raises(exc)) == 2
        captured = capsys.readouterr()
        assert captured.err == "error: " + " ".join(str(exc).split()) + "\n" and captured.out == ""
    for bug in (ValueError("a bug"), KeyError("k"), RuntimeError("r"), TypeError("t")):
        with pytest.raises(type(bug)):
            run_main(_raises(bug))
    monkeypatch.setenv("PIPELINE_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        run_main(_raises(ConfigError("x")))
    monkeypatch.delenv("PIPELINE_TRACEBACK")
    # `pipeline <command>` (the console script) dispatches through run_main
    missing = tmp_path / "nope.yaml"
    assert cli.main(["pretrain", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: config file {missing}: no such file\n"
    with pytest.raises(ConfigError, match="no such file"):  # called from Python, main raises as before
        pretrain.main(["--config", str(missing)])


@pytest.mark.parametrize("path", ENTRY_MODULES)
def test_every_entry_point_reports_user_errors_through_run_main(path):
    """Static: each entry module's `if __name__ == "__main__":` block runs main through run_main."""
    import ast

    tree = ast.parse((ROOT / path).read_text())
    last = tree.body[-1]
    assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test), f"{path}: no __main__ block at the end"
    assert "run_main(main)" in ast.unparse(last), f"{path}: the __main__ block does not call run_main(main)"
    assert "run_main(module.main, rest)" in (ROOT / "pipeline" / "cli.py").read_text()


@pytest.mark.parametrize("command", [["-m", "pipeline.pretrain"], ["pipeline/pretrain.py"]],
                         ids=["python -m", "script (as accelerate launch runs it)"])
def test_command_line_prints_one_line_and_exits_2(tmp_path, command):
    """A bad config on the real command line: one `error:` line, status 2, no Python traceback."""
    import subprocess
    import sys

    f = tmp_path / "dup.yaml"
    f.write_text("seed: 1\nseed: 2\n")
    out = subprocess.run([sys.executable, *command, "--config", str(f)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1] == (f"error: {f}: duplicate key 'seed' at line 2 (first given at line 1); "
                                           "each key may appear once per section")
