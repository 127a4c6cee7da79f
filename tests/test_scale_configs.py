"""The real-scale chain (CC3M-sized shards, ViT-B/16 OpenAI, multi-node stage 1, the ProMetaR fine-tuning
arrays): every config loads and resolves as its job will load it, the stages fit together, and the whole
chain passes the start-up checks of ``slurm/submit.py`` and of each stage with tiny stand-ins for the data
and the weights (generated shards, a planted clustering, a CoOp-layout dataset, the in-repo ``tiny-vit``,
12 layers per tower, so the recipe's prompt depth 9 is kept)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pipeline.backbone import check_backbone
from pipeline.cluster import ClusterConfig
from pipeline.config import load_config
from pipeline.data.datasets_meta import BASE_TO_NEW, DOMAIN_SHIFT
from pipeline.extract import ExtractConfig
from pipeline.extract import preflight as extract_preflight
from pipeline.finetune_config import load_finetune_config
from pipeline.finetune_loop import preflight as finetune_preflight
from pipeline.pretrain_config import PretrainConfig
from pipeline.pretrain_loop import preflight as pretrain_preflight

from .helpers.fewshot_data import make_coop_dataset
from .helpers.tasks import make_task_data

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("slurm_submit", ROOT / "slurm" / "submit.py")
submit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(submit)

EXTRACT, CLUSTER, PRETRAIN = (ROOT / "configs" / k / "cc3m_vitb16.yaml" for k in ("extract", "cluster", "pretrain"))
B2N, TRANSFER = ROOT / "configs/finetune/prometar_vitb16.yaml", ROOT / "configs/finetune/imagenet_transfer.yaml"
B2N_TABLE, TRANSFER_TABLE = (ROOT / "slurm/sweeps" / n for n in ("base_to_new_vitb16.tsv", "imagenet_transfer_vitb16.tsv"))
TINY = "tiny-vit"  # 12 layers per tower: the recipe's depth-9 prompts fit


def test_configs_resolve_to_the_recipe_and_fit_together():
    extract = load_config(ExtractConfig, EXTRACT, [])
    cluster = load_config(ClusterConfig, CLUSTER, [])
    pretrain = load_config(PretrainConfig, PRETRAIN, [])
    for backbone in (extract.backbone, pretrain.model.backbone):
        assert (backbone.arch, backbone.pretrained) == ("ViT-B-16", "openai")
    check_backbone(extract.backbone, key="backbone")  # a known open_clip tag; nothing is downloaded
    check_backbone(pretrain.model.backbone, pretrain.model.prompts, key="model.backbone", prompts_key="model.prompts")
    assert cluster.features_dir == extract.out_dir and pretrain.data.clusters_dir == cluster.out_dir
    assert pretrain.data.urls == extract.urls and cluster.name_tokenizer == "ViT-B-16"
    assert cluster.name_prompt_tokens == 4 and pretrain.model.prompts.depth_text == 9
    assert pretrain.mixed_precision == "bf16" and not pretrain.cpu
    assert all(pretrain.tasks_per_step % world == 0 for world in (1, 8, 16, 64))
    # the stage-2 recipe takes the stage-1 artifact: same backbone, same prompt type and shapes
    ft = load_finetune_config(B2N, ["init=artifact", f"artifact={pretrain.run_dir}/artifact.pt"])
    assert ft.model.backbone == pretrain.model.backbone and ft.model.prompts == pretrain.model.prompts


def _rows(table: Path) -> list[tuple[str, str, str]]:
    return [(d, s, m) for _, d, s, m in submit.read_table(table)]


def test_sweep_tables_cover_the_protocols_and_every_row_resolves():
    b2n, transfer = _rows(B2N_TABLE), _rows(TRANSFER_TABLE)
    assert sorted({d for d, _, _ in b2n}) == sorted(BASE_TO_NEW) and len(b2n) == 3 * len(BASE_TO_NEW)
    assert {s for _, s, _ in b2n} == {"1", "2", "3"} and {d for d, _, _ in transfer} == {"ImageNet"}
    for config, rows in ((B2N, b2n), (TRANSFER, transfer)):
        for dataset, seed, method in rows:  # as slurm/finetune_array.sbatch loads each array task
            cfg = load_finetune_config(config, [f"data.dataset={dataset}", f"seed={seed}", f"method={method}",
                                                "init=artifact", "artifact=runs/cc3m_vitb16/pretrain/artifact.pt",
                                                "name=prometar_stage1"])
            assert cfg.model.backbone.arch == "ViT-B-16" and cfg.data.k_shot == 16
    cfg = load_finetune_config(TRANSFER, ["seed=1", "method=prometar"])
    # domain generalisation and cross-dataset transfer: all ImageNet classes, then every other dataset
    assert cfg.data.subsample == "all" and set(DOMAIN_SHIFT) <= set(cfg.eval.targets)
    assert set(BASE_TO_NEW) - {"ImageNet"} <= set(cfg.eval.targets)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    pretrain = load_config(PretrainConfig, PRETRAIN, [])
    ep = pretrain.episodes
    # enough concepts per domain for an n_way task and a cross-domain query, enough images per concept
    task = make_task_data(root / "task", domains=2, concepts_per_domain=ep.n_way, per_concept=ep.k_shot + ep.q_query,
                          per_shard=20)
    return {"task": task, "coop": make_coop_dataset(root / "coop", per_split={"train": 16, "val": 4, "test": 2}),
            "root": root}


def test_the_chain_passes_the_start_up_checks_with_tiny_stand_ins(stand_ins, monkeypatch):
    task, coop, root = stand_ins["task"], stand_ins["coop"], stand_ins["root"]
    n_shards = len(list(Path(task["urls"]).parent.glob("*.tar")))
    small = [f"backbone.arch={TINY}", "backbone.pretrained="]
    extract_args = [f"urls={task['urls']}", *small]
    pretrain_args = [f"data.urls={task['urls']}", f"model.backbone.arch={TINY}", "model.backbone.pretrained="]
    table = root / "table.tsv"  # the stand-in has the OxfordPets layout; the real tables are checked above
    table.write_text("dataset seed method\nOxfordPets 1 prometar\nOxfordPets 2 prometar\n")
    finetune_args = [f"data.root={coop}", f"data.shot_cache_dir={root}/shots", f"model.backbone.arch={TINY}",
                     "model.backbone.pretrained=", "data.k_shot=16", "init=artifact",
                     "artifact=runs/cc3m_vitb16/pretrain/artifact.pt", "name=prometar_stage1"]
    argv = ["--dry-run", "--shards", str(n_shards), "--nodes", "8", "--extract", str(EXTRACT), "--extract-args",
            *extract_args, "--cluster", str(CLUSTER), "--pretrain", str(PRETRAIN), "--pretrain-args", *pretrain_args,
            "--finetune", str(B2N), "--table", str(table), "--run-root", "runs/finetune", "--finetune-args",
            *finetune_args]
    env = {"PIPELINE_PYTHON": sys.executable, "PROCS_PER_NODE": "8",
           "ACCELERATE_CONFIG": str(ROOT / "launch/accelerate/multi_node.yaml")}
    assert list(submit.check_chain(submit.parse_args(argv), env)) == []
    # 8 nodes x 8 GPUs = 64 ranks; a count that does not divide tasks_per_step is refused
    assert any("not divisible" in p for p in submit.check_chain(submit.parse_args(
        [*argv[:4], "7", *argv[5:]]), env))
    # each stage's own start-up checks, on the stand-ins
    extract_preflight(load_config(ExtractConfig, EXTRACT, extract_args))
    cfg = load_config(PretrainConfig, PRETRAIN, [*pretrain_args, f"data.clusters_dir={task['clusters_dir']}",
                                                 f"run_dir={root}/pretrain"])
    pretrain_preflight(cfg, environ={"WORLD_SIZE": "64"})
    ft = load_finetune_config(B2N, [*finetune_args[:-3], "data.dataset=OxfordPets", "seed=1", "method=prometar",
                                    f"run_root={root}/ft"])
    finetune_preflight(ft, environ={})
