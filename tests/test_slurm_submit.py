"""slurm/submit.py checks the whole chain before the first sbatch, without SLURM.

A fake ``sbatch`` on ``PATH`` records every call (and answers with a job id), so these tests need no
cluster: a bad chain must make ``submit.main`` return 2, name the problem on stderr and leave the record
empty; the positive control submits all five jobs. tests/test_slurm.py submits for real.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers.fewshot_data import finetune_overrides, make_coop_dataset
from .helpers.tasks import make_task_data, pretrain_overrides

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("slurm_submit", ROOT / "slurm" / "submit.py")
submit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(submit)

FAKE_SBATCH = """#!/bin/sh
# records its arguments, answers like `sbatch --parsable` (shell builtins only: PATH holds no system folder)
echo "$*" >> "$FAKE_SBATCH_LOG"
n=0
while read -r line; do n=$((n + 1)); done < "$FAKE_SBATCH_LOG"
echo "$((1000 + n))"
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain_inputs")
    return {"task": make_task_data(root / "task"), "downstream": make_coop_dataset(root / "downstream")}


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """``sbatch`` on PATH that records its calls in the returned file (absent: never called)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch_calls.txt"
    # no system folder on PATH: a real sbatch there (a local test cluster) must never be reached
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}")
    assert shutil.which("sbatch") == str(bin_dir / "sbatch")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
    monkeypatch.setenv("PIPELINE_PYTHON", sys.executable)
    for var in ("PROCS_PER_NODE", "ACCELERATE_CONFIG", "WORLD_SIZE", "SLURM_NTASKS", "PIPELINE_TRACEBACK"):
        monkeypatch.delenv(var, raising=False)
    return log


class Chain:
    """A valid extract -> cluster -> pretrain -> finetune -> report submission, easy to break one piece of."""

    def __init__(self, inputs: dict, tmp: Path):
        task, self.tmp = inputs["task"], tmp
        self.task = task
        self.feats, self.clusters, self.run, self.runs = (tmp / n for n in ("features", "clusters", "pretrain", "ft"))
        self.files = {name: tmp / f"{name}.yaml" for name in ("extract", "cluster", "pretrain", "finetune")}
        for f in self.files.values():
            f.write_text("{}\n")
        self.table = tmp / "sweep.tsv"
        self.table.write_text("dataset seed method\nOxfordPets 1 prometar\n\nOxfordPets 2 ivlp\n")
        self.shards = 4
        self.args = {
            "extract": [f"urls={task['urls']}", f"out_dir={self.feats}", "backbone.arch=tiny-vit-s",
                        "backbone.pretrained=", "cpu=true"],
            "cluster": [f"features_dir={self.feats}", f"out_dir={self.clusters}", "n_domains=2"],
            "pretrain": [a for a in pretrain_overrides(task, self.run) if not a.startswith("data.clusters_dir=")]
            + [f"data.clusters_dir={self.clusters}"],
            "finetune": [a for a in finetune_overrides(inputs["downstream"], self.runs)
                         if not a.startswith(("run_root=", "data.dataset="))]
            + ["init=artifact", f"artifact={self.run / 'artifact.pt'}"],
        }
        self.extra: list[str] = []

    def argv(self) -> list[str]:
        out = ["--shards", str(self.shards), "--run-root", str(self.runs), "--table", str(self.table), *self.extra]
        for stage in ("extract", "cluster", "pretrain", "finetune"):
            out += [f"--{stage}", str(self.files[stage]), f"--{stage}-args", *self.args[stage]]
        return out


def _submit(chain: Chain, capsys) -> tuple[int, str, str]:
    rc = submit.main(chain.argv())
    out, err = capsys.readouterr()
    return rc, out, err


def test_valid_chain_is_checked_then_submitted(inputs, tmp_path, fake_sbatch, capsys):
    """Positive control: every check passes, the five jobs are queued in order, nothing is written."""
    chain = Chain(inputs, tmp_path)
    rc, out, err = _submit(chain, capsys)
    assert rc == 0, err
    assert out.split() == ["extract=1001", "cluster=1002", "pretrain=1003", "finetune=1004", "report=1005"]
    calls = fake_sbatch.read_text().splitlines()
    assert [re.search(r"slurm/(\S+\.sbatch)", c).group(1) for c in calls] == [
        "extract_array.sbatch", "cluster.sbatch", "pretrain_multinode.sbatch", "finetune_array.sbatch", "report.sbatch"]
    assert "--array=0-3%64" in calls[0] and "--array=0-1" in calls[3] and "--dependency=afterok:1004" in calls[4]
    for path in (chain.feats, chain.clusters, chain.run, chain.runs):
        assert not path.exists(), f"the checks created {path}"


def _set(chain: Chain, stage: str, item: str) -> None:
    chain.args[stage].append(item)  # a later override wins, as in the job


# id -> (change to a valid chain, pattern of the problem line on stderr)
FAULTS = {
    "unknown_key_in_extract_args": (lambda c: _set(c, "extract", "batch_sise=4"),
                                    r"--extract .*unknown key 'batch_sise' \(did you mean 'batch_size'\?\)"),
    "wrong_type_in_pretrain_yaml": (lambda c: c.files["pretrain"].write_text("tasks_per_step: four\n"),
                                    r"--pretrain .*pretrain.yaml: invalid value for 'tasks_per_step'"),
    "duplicate_key_in_cluster_yaml": (lambda c: c.files["cluster"].write_text("n_domains: 2\nn_domains: 3\n"),
                                      r"--cluster .*cluster.yaml: duplicate key 'n_domains' at line 2"),
    "missing_config_file": (lambda c: c.files.update(cluster=c.tmp / "nope.yaml"),
                            r"--cluster .*nope.yaml: config file .*nope.yaml: no such file"),
    "bad_method_in_table": (lambda c: c.table.write_text("dataset seed method\nOxfordPets 1 maple\n"),
                            r"table line 2 \(OxfordPets 1 maple\): .*method='maple'"),
    "unknown_dataset_in_table": (lambda c: c.table.write_text("dataset seed method\nPets 1 prometar\n"),
                                 r"table line 2 \(Pets 1 prometar\): .*data.dataset='Pets'"),
    "shard_range_past_the_files": (lambda c: (_set(c, "extract", "urls=" + c.task["urls"].replace("000003", "000005")),
                                              setattr(c, "shards", 6)),
                                   r"--extract: urls: 2 of the 6 shard files do not exist \(first: .*000004.tar\)"),
    "shards_flag_disagrees": (lambda c: setattr(c, "shards", 3),
                              r"--shards=3 but the extraction's urls name 4 shards; the array would leave shards "
                              r"unembedded; use --shards 4"),
    "shards_per_task_given_twice": (lambda c: _set(c, "extract", "shards_per_task=2"),
                                    r"--extract-args set shards_per_task=2 but --shards-per-task=1"),
    "extract_shard_fixed": (lambda c: _set(c, "extract", "shard=0"), r"--extract: shard=0 makes every array task"),
    "missing_backbone_checkpoint": (lambda c: _set(c, "extract", "backbone.pretrained=/nope/clip.pt"),
                                    r"--extract: backbone.pretrained='/nope/clip.pt': no such checkpoint file"),
    "cluster_reads_other_features": (lambda c: _set(c, "cluster", f"features_dir={c.tmp / 'old_features'}"),
                                     r"--cluster: features_dir=.*old_features is not the extraction's out_dir"),
    "cluster_mode_fit": (lambda c: _set(c, "cluster", "mode=fit"),
                         r"--cluster: mode=fit shard=-1: cluster.sbatch is one job"),
    "pretrain_reads_an_old_clustering": (lambda c: _set(c, "pretrain", f"data.clusters_dir={c.tmp / 'old'}"),
                                         r"--pretrain: data.clusters_dir=.*old is not the cluster job's out_dir"),
    "pretrain_shards_missing": (lambda c: _set(c, "pretrain", f"data.urls={c.tmp}/no/{{0..3}}.tar"),
                                r"--pretrain: data.urls: none of the 4 shard files exists"),
    "tasks_not_divisible_by_ranks": (lambda c: c.extra.extend(["--nodes", "3"]),
                                     r"--pretrain \(--nodes=3 x PROCS_PER_NODE=1\): tasks_per_step=2 is not "
                                     r"divisible by the 3 ranks"),
    "artifact_not_the_chains": (lambda c: _set(c, "finetune", f"artifact={c.tmp / 'other.pt'}"),
                                r"artifact=.*other.pt is not the artifact this chain's pretraining writes"),
    "run_root_given_twice": (lambda c: _set(c, "finetune", f"run_root={c.tmp / 'elsewhere'}"),
                             r"run_root=.*elsewhere but --run-root=.*ft; the report would read another folder"),
    "dataset_root_missing": (lambda c: _set(c, "finetune", f"data.root={c.tmp / 'no_data'}"),
                             r"table line 2 \(OxfordPets 1 prometar\): data.root: .*no_data does not exist"),
    "table_missing": (lambda c: setattr(c, "table", c.tmp / "nope.tsv"), r"--table: .*nope.tsv does not exist"),
    "table_header_reordered": (lambda c: c.table.write_text("seed dataset method\n1 OxfordPets prometar\n"),
                               r"--table .*: first line is 'seed dataset method', expected the header "
                               r"'dataset seed method'"),
    "table_row_with_four_fields": (lambda c: c.table.write_text("dataset seed method\nOxfordPets 1 prometar x\n"),
                                   r"--table .*: line 2 has 4 fields, expected 3"),
    "table_seed_not_a_number": (lambda c: c.table.write_text("dataset seed method\nOxfordPets one prometar\n"),
                                r"--table .*: line 2: seed 'one' is not a non-negative integer"),
    "table_without_rows": (lambda c: c.table.write_text("dataset seed method\n\n"),
                           r"--table .*: no rows after the header"),
    "jobs_python_missing": (lambda c: None, r"PIPELINE_PYTHON: the jobs' interpreter /nope/python is not"),
    "accelerate_config_missing": (lambda c: None, r"ACCELERATE_CONFIG: the pretraining launcher config "
                                                  r"launch/accelerate/nope.yaml does not exist"),
    "sbatch_script_missing": (lambda c: None, r"cluster: sbatch script .*slurm/nope.sbatch does not exist"),
    "no_sbatch_on_path": (lambda c: None, r"sbatch is not on PATH"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_chain_fails_before_any_sbatch(inputs, tmp_path, fake_sbatch, capsys, monkeypatch, fault):
    change, pattern = FAULTS[fault]
    chain = Chain(inputs, tmp_path)
    change(chain)
    if fault == "jobs_python_missing":
        monkeypatch.setenv("PIPELINE_PYTHON", "/nope/python")
    elif fault == "accelerate_config_missing":
        monkeypatch.setenv("ACCELERATE_CONFIG", "launch/accelerate/nope.yaml")
    elif fault == "sbatch_script_missing":
        monkeypatch.setitem(submit.SCRIPTS, "cluster", "nope.sbatch")
    elif fault == "no_sbatch_on_path":
        monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
        assert shutil.which("sbatch") is None
    rc, out, err = _submit(chain, capsys)
    assert rc == 2, (out, err)
    assert re.search(r"submit: \d+ problems?; nothing was submitted:", err), err
    assert re.search(pattern, err), f"no line matches {pattern!r}:\n{err}"
    assert not fake_sbatch.exists(), f"sbatch was called: {fake_sbatch.read_text()}"
    assert out == ""


def test_every_problem_is_listed_at_once_and_dry_run_checks_too(inputs, tmp_path, fake_sbatch, capsys):
    chain = Chain(inputs, tmp_path)
    _set(chain, "extract", "batch_sise=4")
    chain.table.write_text("dataset seed method\nOxfordPets 1 maple\n")
    chain.extra.append("--dry-run")
    rc, _, err = _submit(chain, capsys)
    assert rc == 2 and "submit: 2 problems; nothing was submitted:" in err, err
    assert "batch_sise" in err and "method='maple'" in err
    assert not fake_sbatch.exists()


def test_submit_script_on_the_command_line_fails_before_sbatch(inputs, tmp_path, fake_sbatch):
    """`python slurm/submit.py ...` from another folder: the same checks, exit status 2, no job queued."""
    chain = Chain(inputs, tmp_path)
    chain.files["pretrain"].write_text("optim:\n  stepz: 3\n")
    out = subprocess.run([sys.executable, str(ROOT / "slurm" / "submit.py"), *chain.argv()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "unknown key 'optim.stepz' (did you mean 'optim.steps'?)" in out.stderr
    assert "Traceback" not in out.stderr and not fake_sbatch.exists()
