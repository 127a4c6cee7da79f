"""The sbatch scripts, submitted for real to a SLURM controller (slurm/local_cluster.sh starts one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import load_artifact
from pipeline.data.features import finished_stems

from .conftest import require
from .helpers.tasks import make_task_data, pretrain_overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and bool(re.search(r"idle|mixed|allocated", out.stdout))


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    require(_cluster_up(), "slurm", "no SLURM controller answers (start one with: bash slurm/local_cluster.sh start)")


def _env(**extra) -> dict:
    env = dict(os.environ, PIPELINE_ROOT=str(ROOT), PIPELINE_PYTHON=sys.executable, WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", **extra)
    for key in [k for k in env if k.startswith("SLURM_")]:  # never inherit a surrounding job's variables
        env.pop(key)
    return env


def sbatch(args: list[str], **env) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=_env(**env), capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_states(job: str) -> list[str]:
    """States of a job (one per array task) while the controller remembers it."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    return re.findall(r"JobState=(\S+)", out.stdout)


def wait(job: str, timeout: float = 300, until=("COMPLETED",)) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = job_states(job)
        if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                          for s in states):
            return states
        time.sleep(1)
    raise TimeoutError(f"job {job} still {job_states(job)} after {timeout} s")


def _log(tmp_path, pattern: str) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob(pattern)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("slurm_data"), per_concept=12)


def _extract_args(data, out) -> list[str]:
    return [f"urls={data['urls']}", f"out_dir={out}", "backbone.arch=tiny-vit-s", "backbone.pretrained=",
            "batch_size=16", "workers=0", "cpu=true"]


def test_extract_array_completes_and_resubmission_does_no_work(data, tmp_path):
    out = tmp_path / "features"
    n = len(list(Path(data["urls"].split("{")[0]).glob("*.tar")))
    log = str(tmp_path / "extract_%A_%a.out")
    job = sbatch([f"--array=0-{n - 1}", f"--output={log}", "slurm/extract_array.sbatch", *_extract_args(data, out)])
    assert wait(job) == ["COMPLETED"] * n
    assert len(finished_stems(out)) == n
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    again = sbatch([f"--array=0-{n - 1}", f"--output={tmp_path / 'again_%A_%a.out'}", "slurm/extract_array.sbatch",
                    *_extract_args(data, out)])
    assert wait(again) == ["COMPLETED"] * n
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.npz")} == stamps  # nothing rewritten
    logs = _log(tmp_path, "again_*.out")
    assert logs.count("'extracted': 0") == n and logs.count("'already_done': 1") == n


def test_pretrain_job_is_requeued_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    args = pretrain_overrides(data, run, steps=10, extra=("checkpoint.every=100", "optim.warmup_steps=2"))
    job = sbatch([f"--output={tmp_path / 'pretrain_%j.out'}", "slurm/pretrain_multinode.sbatch", *args],
                 ACCELERATE_CONFIG="launch/accelerate/cpu_2proc.yaml", PROCS_PER_NODE="1")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    assert metrics.exists(), _log(tmp_path, "pretrain_*.out")
    # what SLURM sends before the time limit (--signal=B:USR1@300), now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # SLURM holds a requeued job (BeginTime) for about two minutes before it is eligible again. Shorten
    # the hold, but not to zero: the old allocation's credential must be revoked first, or the restart
    # is killed as "non-startable" (seen when released within the same second).
    deadline, pending_since = time.time() + 180, None
    while time.time() < deadline and "restart 1" not in _log(tmp_path, "pretrain_*.out"):
        info = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        if "Restarts=1" in info and "JobState=PENDING" in info:
            pending_since = pending_since or time.time()
            if time.time() - pending_since > 15:
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    assert wait(job, timeout=400) == ["COMPLETED"], _log(tmp_path, "pretrain_*.out")
    log = _log(tmp_path, "pretrain_*.out")
    assert "requeueing job" in log and "restart 1" in log, log[-3000:]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 11))  # resumed: no step lost, none repeated in the metrics
    # same result as an uninterrupted single-process run
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "pipeline.pretrain",
                    *pretrain_overrides(data, ref, steps=10, extra=("checkpoint.every=100", "optim.warmup_steps=2"))],
                   cwd=ROOT, env=_env(), check=True, capture_output=True)
    a, b = load_artifact(ref / "artifact.pt"), load_artifact(run / "artifact.pt")
    for k in a.prompts:
        assert (a.prompts[k] - b.prompts[k]).abs().max() <= 1e-6, k


def _two_fake_datasets(root: Path) -> Path:
    """OxfordPets and DescribableTextures in the CoOp layout (same tiny images, different names)."""
    from .helpers.fewshot_data import make_coop_dataset

    make_coop_dataset(root)
    shutil.copytree(root / "oxford_pets" / "images", root / "dtd" / "images")
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(
        (root / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    return root


def test_dependency_chain_extract_cluster_pretrain_finetune_report(data, tmp_path):
    from .helpers.fewshot_data import finetune_overrides

    feats, clusters, run = tmp_path / "features", tmp_path / "clusters", tmp_path / "pretrain"
    for name, text in {"extract.yaml": "", "cluster.yaml": "", "pretrain.yaml": "", "finetune.yaml": ""}.items():
        (tmp_path / name).write_text(text or "{}\n")
    pre = [a for a in pretrain_overrides(data, run, steps=3, extra=("episodes.p_cross_domain=0",))
           if not a.startswith("data.clusters_dir=")] + [f"data.clusters_dir={clusters}"]
    table = tmp_path / "sweep.tsv"
    table.write_text("dataset seed method\nOxfordPets 1 prometar\nOxfordPets 2 prometar\n"
                     "DescribableTextures 1 prometar\nDescribableTextures 2 prometar\n")
    root = _two_fake_datasets(tmp_path / "downstream")
    runs = tmp_path / "finetune"
    ft = [a for a in finetune_overrides(root, runs) if not a.startswith(("run_root=", "data.dataset="))]
    n_shards = len(list(Path(data["urls"].split("{")[0]).glob("*.tar")))
    cmd = [sys.executable, "slurm/submit.py", "--shards", str(n_shards),
           "--extract", str(tmp_path / "extract.yaml"), "--extract-args", *_extract_args(data, feats),
           "--cluster", str(tmp_path / "cluster.yaml"), "--cluster-args", f"features_dir={feats}",
           f"out_dir={clusters}", "n_domains=2", "concepts_per_domain=3", "min_points_per_concept=4",
           "--pretrain", str(tmp_path / "pretrain.yaml"), "--pretrain-args", *pre,
           "--finetune", str(tmp_path / "finetune.yaml"), "--table", str(table), "--run-root", str(runs),
           "--finetune-args", *ft, "init=artifact", f"artifact={run / 'artifact.pt'}", "--sweep", "ci-chain"]
    env = _env(ACCELERATE_CONFIG="launch/accelerate/cpu_2proc.yaml", PROCS_PER_NODE="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    jobs = dict(item.split("=") for item in out.stdout.split())
    assert list(jobs) == ["extract", "cluster", "pretrain", "finetune", "report"]
    for name in jobs:  # each starts only after the previous one succeeded
        states = wait(jobs[name], timeout=400)
        assert set(states) == {"COMPLETED"}, (name, states, _log(ROOT, f"{name}_{jobs[name]}*.out")[-3000:])
    results = sorted(runs.glob("*/*/seed_*/results.json"))
    assert len(results) == 4
    assert {p.parts[-4] for p in results} == {"OxfordPets", "DescribableTextures"}
    assert (runs / "report.md").exists() and "DescribableTextures" in (runs / "report.md").read_text()
    assert load_artifact(run / "artifact.pt").metadata["stage"] == "pretrain"
    for name, job in jobs.items():
        for log in ROOT.glob(f"{name}_{job}*.out"):
            log.unlink()


@pytest.mark.slow  # trains the demo backbone when it is not cached; .ci/run runs it after `make demo`
def test_dependency_chain_on_the_demo_data(tmp_path, monkeypatch):
    """extract -> cluster -> pretrain -> finetune array -> report on the bundled digits (backbone cached)."""
    from pipeline.data.sources import expand_sources
    from pipeline.digits_demo.data import DemoConfig, build_demo

    monkeypatch.chdir(ROOT)  # the demo's paths (cache/demo, configs) are relative to the repository
    info = build_demo(DemoConfig())  # trains the demo backbone once (cached), as `make demo` does
    feats, clusters, run, runs = (tmp_path / n for n in ("features", "clusters", "pretrain", "finetune"))
    table = tmp_path / "sweep.tsv"
    table.write_text("dataset seed method\nDigits 1 prometar\nDigits 2 prometar\n")
    cmd = [sys.executable, "slurm/submit.py", "--shards", str(len(expand_sources(info["shards"])[0])),
           "--extract", "configs/extract/demo.yaml", "--extract-args", f"urls={info['shards']}", f"out_dir={feats}",
           "--cluster", "configs/cluster/demo.yaml", "--cluster-args", f"features_dir={feats}", f"out_dir={clusters}",
           "--pretrain", "configs/pretrain/demo.yaml", "--pretrain-args", f"run_dir={run}",
           f"data.urls={info['shards']}", f"data.clusters_dir={clusters}", "optim.steps=4", "checkpoint.every=2",
           "episodes.p_cross_domain=0", "data.workers=0", "tracking.wandb_mode=disabled",
           "--finetune", "configs/finetune/demo.yaml", "--table", str(table), "--run-root", str(runs),
           "--finetune-args", "optim.epochs=1", f"data.shot_cache_dir={tmp_path / 'shots'}", "init=artifact",
           f"artifact={run / 'artifact.pt'}", "tracking.wandb_mode=disabled", "--sweep", "ci-demo-chain"]
    env = _env(ACCELERATE_CONFIG="launch/accelerate/cpu_2proc.yaml", PROCS_PER_NODE="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    jobs = dict(item.split("=") for item in out.stdout.split())
    for name in jobs:
        states = wait(jobs[name], timeout=400)
        assert set(states) == {"COMPLETED"}, (name, states, _log(ROOT, f"{name}_{jobs[name]}*.out")[-3000:])
    assert len(list(feats.glob("*.done"))) == len(expand_sources(info["shards"])[0])
    assert (clusters / "concepts.json").exists() and load_artifact(run / "artifact.pt").metadata["steps"] == 4
    results = sorted(runs.glob("Digits/*/seed_*/results.json"))
    assert len(results) == 2 and (runs / "report.md").exists()
    for name, job in jobs.items():
        for log in ROOT.glob(f"{name}_{job}*.out"):
            log.unlink()
