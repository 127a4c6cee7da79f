"""The README's commands point at things that exist: config files, launcher configs, make targets, CLIs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.cli import schema_for
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = README + (ROOT / "launch" / "README.md").read_text()


def test_config_files_named_in_docs_exist_and_load():
    paths = set(re.findall(r"--config(?:_file)?[ =](\S+\.yaml)", DOCS))
    paths |= set(re.findall(r'"(configs/\S+\.yaml)"', DOCS))
    assert paths, "no config paths found in the docs"
    for rel in paths:
        path = ROOT / rel
        assert path.is_file(), f"documented config {rel} does not exist"
        if rel.startswith("configs/"):
            load_config(schema_for(path.relative_to(ROOT / "configs").parts[0]), path)


def test_make_targets_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"^make (\S+)", README, flags=re.M)):
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"make {target} is not a target"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README


@pytest.mark.parametrize("module", ["pipeline.data.shard_writer", "pipeline.extract", "pipeline.cluster", "pipeline.finetune", "pipeline.evaluate", "pipeline.report", "pipeline.digits_demo", "pipeline.suite",
                                   "pipeline.pretrain"])
def test_documented_entry_points_answer_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr[-2000:]
    assert f"python -m {module}" in README


def test_cli_dispatch(capsys):
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in ("extract", "cluster", "pretrain", "write-shards"):
        assert name in listed
    assert cli.main(["nope"]) == 2


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "slurm").iterdir() if p.suffix in (".sbatch", ".sh")))
def test_slurm_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert script in (ROOT / "slurm" / "README.md").read_text()


def test_every_test_named_in_reliability_doc_exists():
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)", doc))
    assert len(named) > 40, "RELIABILITY.md names too few tests"
    for path, name in sorted(named):
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, flags=re.M), f"RELIABILITY.md names {path}::{name}, which does not exist"


def test_bench_scripts_in_readme_exist_and_answer_help():
    readme = (ROOT / "README.md").read_text()
    scripts = sorted(set(re.findall(r"bench/[a-z_]+\.py", readme)))
    assert "bench/profile_meta.py" in scripts and "bench/run_all.py" in scripts
    for script in scripts:
        out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout, (script, out.stderr[-500:])

