"""Submit the pipeline with dependencies: extract (array) -> cluster -> pretrain [-> finetune array -> report].

    python slurm/submit.py --shards 1000 --extract configs/extract/x.yaml --cluster configs/cluster/x.yaml \
        --pretrain configs/pretrain/x.yaml [--nodes 2] [--max-parallel 64] [--sweep name] [--dry-run] \
        [--finetune configs/finetune/y.yaml --table sweep.tsv --finetune-args init=artifact artifact=...]

Each job starts only when the previous one succeeded (``--dependency=afterok``); the extraction array is
idempotent, so resubmitting the chain after a failure redoes only what is missing. Prints the job ids.
Extra ``key=value`` overrides for a stage go after ``--extract-args``/``--cluster-args``/``--pretrain-args``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sbatch(script: str, args: list[str], options: list[str], dry_run: bool, env: dict) -> str:
    """Submit one script (argument lists only; nothing goes through a shell); returns the job id."""
    cmd = ["sbatch", "--parsable", *options, str(ROOT / "slurm" / script), *args]
    print("+", " ".join(cmd), file=sys.stderr)
    if dry_run:
        return f"<{script}>"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return out.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, required=True, help="number of shards (array size of the extraction)")
    p.add_argument("--shards-per-task", type=int, default=1)
    p.add_argument("--extract", required=True, help="ExtractConfig YAML")
    p.add_argument("--cluster", required=True, help="ClusterConfig YAML")
    p.add_argument("--pretrain", required=True, help="PretrainConfig YAML")
    p.add_argument("--extract-args", nargs="*", default=[])
    p.add_argument("--cluster-args", nargs="*", default=[])
    p.add_argument("--pretrain-args", nargs="*", default=[])
    p.add_argument("--finetune", default="", help="FinetuneConfig YAML: adds a finetune array and a report")
    p.add_argument("--table", default="", help="sweep table (header `dataset seed method`, one run per row)")
    p.add_argument("--finetune-args", nargs="*", default=[])
    p.add_argument("--run-root", default="runs/finetune", help="run_root of the finetune runs (for the report)")
    p.add_argument("--nodes", type=int, default=1, help="pretraining nodes")
    p.add_argument("--max-parallel", type=int, default=64, help="extraction tasks running at once")
    p.add_argument("--sweep", default="", help="W&B group of every job of this chain")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    a = p.parse_args(argv)
    env = dict(os.environ, PIPELINE_ROOT=str(ROOT))
    if a.sweep:
        env["SWEEP"] = a.sweep
    common = [f"--partition={a.partition}"] if a.partition else []
    tasks = -(-a.shards // a.shards_per_task)
    extract = sbatch("extract_array.sbatch", ["--config", a.extract, f"shards_per_task={a.shards_per_task}",
                                              *a.extract_args],
                     [*common, f"--array=0-{tasks - 1}%{a.max_parallel}"], a.dry_run, env)
    cluster = sbatch("cluster.sbatch", ["--config", a.cluster, *a.cluster_args],
                     [*common, f"--dependency=afterok:{extract}"], a.dry_run, env)
    pretrain = sbatch("pretrain_multinode.sbatch", ["--config", a.pretrain, *a.pretrain_args],
                      [*common, f"--nodes={a.nodes}", f"--dependency=afterok:{cluster}"], a.dry_run, env)
    jobs = f"extract={extract} cluster={cluster} pretrain={pretrain}"
    if a.finetune:
        rows = [r for r in Path(a.table).read_text().splitlines()[1:] if r.strip()]
        env["SWEEP_TABLE"] = str(Path(a.table).resolve())
        finetune = sbatch("finetune_array.sbatch", ["--config", a.finetune, f"run_root={a.run_root}",
                                                    *a.finetune_args],
                          [*common, f"--array=0-{len(rows) - 1}", f"--dependency=afterok:{pretrain}"], a.dry_run, env)
        report = sbatch("report.sbatch", [a.run_root], [*common, f"--dependency=afterok:{finetune}"], a.dry_run, env)
        jobs += f" finetune={finetune} report={report}"
    print(jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
