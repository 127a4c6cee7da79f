"""Submit the pipeline with dependencies: extract (array) -> cluster -> pretrain [-> finetune array -> report].

    python slurm/submit.py --shards 1000 --extract configs/extract/x.yaml --cluster configs/cluster/x.yaml \
        --pretrain configs/pretrain/x.yaml [--nodes 2] [--max-parallel 64] [--sweep name] [--dry-run] \
        [--finetune configs/finetune/y.yaml --table sweep.tsv --finetune-args init=artifact artifact=...]

Each job starts only when the previous one succeeded (``--dependency=afterok``); the extraction array is
idempotent, so resubmitting the chain after a failure redoes only what is missing. Prints the job ids.
Extra ``key=value`` overrides for a stage go after ``--extract-args``/``--cluster-args``/``--pretrain-args``.

Before the first ``sbatch`` (also with ``--dry-run``) the whole chain is checked, and nothing is queued
unless every check passes (exit status 2 and one line per problem otherwise): each config is loaded with
its stage's loader and overrides, as the job will load it (unknown keys, wrong types, bad values); the
inputs that exist before the chain runs (shard files, backbone checkpoints, datasets, the sweep table,
the sbatch scripts, the Python of the jobs, the accelerate config) exist; and the stages fit together
(``--shards`` is the number of shards, the cluster job reads the extraction's ``out_dir``, pretraining
reads the cluster job's ``out_dir``, ``init=artifact`` reads pretraining's artifact, the report reads
the sweep's ``run_root``). Outputs of earlier jobs (features, clusters, the artifact) are not required
to exist. Relative paths are checked from the repository root, where the jobs run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python slurm/submit.py` puts slurm/, not the repository, on sys.path
    sys.path.insert(0, str(ROOT))

SCRIPTS = {"extract": "extract_array.sbatch", "cluster": "cluster.sbatch", "pretrain": "pretrain_multinode.sbatch",
           "finetune": "finetune_array.sbatch", "report": "report.sbatch"}
TABLE_HEADER = ("dataset", "seed", "method")
"""Columns of the sweep table, in the order ``finetune_array.sbatch`` reads them."""
DEFAULT_ACCELERATE_CONFIG = "launch/accelerate/multi_node.yaml"  # pretrain_multinode.sbatch's default


def sbatch(script: str, args: list[str], options: list[str], dry_run: bool, env: dict) -> str:
    """Submit one script (argument lists only; nothing goes through a shell); returns the job id."""
    cmd = ["sbatch", "--parsable", *options, str(ROOT / "slurm" / script), *args]
    print("+", " ".join(cmd), file=sys.stderr)
    if dry_run:
        return f"<{script}>"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return out.stdout.strip().split(";")[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of :func:`main`."""
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
    p.add_argument("--dry-run", action="store_true", help="check the chain and print the sbatch commands only")
    return p.parse_args(argv)


def read_table(path: str | Path) -> list[tuple[int, str, str, str]]:
    """Rows ``(line number, dataset, seed, method)`` of a sweep table; ``ValueError`` naming the line.

    ``finetune_array.sbatch`` skips the first line and reads three whitespace-separated columns by
    position, so the header must be exactly ``dataset seed method`` (a reordered header would silently
    swap settings) and every row must have three fields (a fourth would be glued onto the method).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = tuple(lines[0].split()) if lines else ()
    if header != TABLE_HEADER:
        raise ValueError(f"first line is {' '.join(header) or '(empty)'!r}, expected the header "
                         f"{' '.join(TABLE_HEADER)!r}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:  # the sbatch script skips blank lines too
            continue
        if len(fields) != 3:
            raise ValueError(f"line {number} has {len(fields)} fields, expected 3 ({' '.join(TABLE_HEADER)}): "
                             f"{line.strip()!r}")
        if not fields[1].isdigit():
            raise ValueError(f"line {number}: seed {fields[1]!r} is not a non-negative integer")
        rows.append((number, *fields))
    if not rows:
        raise ValueError("no rows after the header; the finetune array would be empty")
    return rows


@contextlib.contextmanager
def _in_dir(path: Path):
    """Work in ``path`` (the jobs' working directory), then return; ``contextlib.chdir`` needs 3.11."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _missing_local(urls: list[str]) -> list[str]:
    """Local shard files of ``urls`` that do not exist (one listing per folder, not one stat per shard)."""
    from pipeline.data.sources import is_local

    listings: dict[Path, set[str]] = {}
    missing = []
    for url in urls:
        if not is_local(url):  # pipe:, http(s)://, s3:// ... are not probed from the login node
            continue
        folder = Path(url).parent
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        if Path(url).name not in listings[folder]:
            missing.append(url)
    return missing


class Problems(list):
    """Problem lines, one per check that failed."""

    def attempt(self, label: str, check, *args, **kwargs):
        """``check(*args, **kwargs)``; a ``ConfigError`` from it becomes the line ``label: message`` and
        the result ``None`` (so dependent checks are skipped); a check returning ``None`` gives ``True``."""
        from pipeline.config import ConfigError

        try:
            result = check(*args, **kwargs)
        except ConfigError as e:
            self.append(f"{label}: {e}")
            return None
        return True if result is None else result


def check_chain(a: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """Every problem that would make a job of the chain fail (or run on the wrong inputs), one line each;
    empty when the chain may be submitted. Runs in the repository root, where the jobs run."""
    problems = Problems()
    table = Path(a.table).resolve() if a.table else None  # the caller's cwd: main exports it resolved
    with _in_dir(ROOT):
        _check_chain(a, env, table, problems)
    return problems


def _check_chain(a: argparse.Namespace, env: dict[str, str], table: Path | None, problems: Problems) -> None:
    # imported here: the stage modules pull in torch and open_clip, which `--help` does not need
    from pipeline.backbone import check_backbone
    from pipeline.checkpoint import list_checkpoints
    from pipeline.cluster import ClusterConfig
    from pipeline.config import load_config
    from pipeline.data.sources import expand_sources
    from pipeline.distributed import check_launcher
    from pipeline.extract import ExtractConfig
    from pipeline.pretrain_config import PretrainConfig

    attempt = problems.attempt
    for flag in ("shards", "shards_per_task", "nodes", "max_parallel"):
        if getattr(a, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')}={getattr(a, flag)} must be >= 1")
    stages = ["extract", "cluster", "pretrain"] + (["finetune", "report"] if a.finetune else [])
    for stage in stages:
        if not (ROOT / "slurm" / SCRIPTS[stage]).is_file():
            problems.append(f"{stage}: sbatch script {ROOT / 'slurm' / SCRIPTS[stage]} does not exist")
    python = env.get("PIPELINE_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        problems.append(f"PIPELINE_PYTHON: the jobs' interpreter {python} is not an executable file "
                        "(set PIPELINE_PYTHON or create .venv)")
    if not a.dry_run and shutil.which("sbatch", path=env.get("PATH")) is None:
        problems.append("sbatch is not on PATH: submit from a SLURM login node (or use --dry-run)")

    # extraction: the array has one task per block of shards_per_task shards of urls
    extract = attempt(f"--extract {a.extract}", load_config, ExtractConfig, a.extract,
                      [f"shards_per_task={a.shards_per_task}", *a.extract_args])
    if extract:
        if extract.shards_per_task != a.shards_per_task:
            problems.append(f"--extract-args set shards_per_task={extract.shards_per_task} but --shards-per-task="
                            f"{a.shards_per_task} sizes the array; give it once, as --shards-per-task")
        if extract.shard != -1:
            problems.append(f"--extract: shard={extract.shard} makes every array task embed the same shards; "
                            "leave shard=-1 (each task takes SLURM_ARRAY_TASK_ID)")
        attempt("--extract", check_backbone, extract.backbone, key="backbone")
        try:
            shards = [u for source in expand_sources(extract.urls) for u in source]
        except ValueError as e:
            problems.append(f"--extract: urls={extract.urls!r}: {e}")
        else:
            if len(shards) != a.shards:
                problems.append(f"--shards={a.shards} but the extraction's urls name {len(shards)} shards; the "
                                "array would " + ("leave shards unembedded" if a.shards < len(shards) else
                                                  "have tasks past the last shard, which fail") +
                                f"; use --shards {len(shards)}")
            missing = _missing_local(shards)
            if missing:
                problems.append(f"--extract: urls: {len(missing)} of the {len(shards)} shard files do not exist "
                                f"(first: {missing[0]}); the extraction refuses missing shards")

    # clustering: one job doing fit + assign + summary on the extraction's features
    cluster = attempt(f"--cluster {a.cluster}", load_config, ClusterConfig, a.cluster, a.cluster_args)
    if cluster:
        if cluster.mode != "all" or cluster.shard != -1:
            problems.append(f"--cluster: mode={cluster.mode} shard={cluster.shard}: cluster.sbatch is one job that "
                            "must fit, assign every shard and summarize; leave mode=all and shard=-1")
        if extract and not _same(cluster.features_dir, extract.out_dir):
            problems.append(f"--cluster: features_dir={cluster.features_dir} is not the extraction's out_dir="
                            f"{extract.out_dir}; the cluster job would not read the features this chain makes")

    # pretraining: reads the cluster job's output; tasks split over nodes x processes per node
    pretrain = attempt(f"--pretrain {a.pretrain}", load_config, PretrainConfig, a.pretrain, a.pretrain_args)
    if pretrain:
        if cluster and not _same(pretrain.data.clusters_dir, cluster.out_dir):
            problems.append(f"--pretrain: data.clusters_dir={pretrain.data.clusters_dir} is not the cluster job's "
                            f"out_dir={cluster.out_dir}; pretraining would not read the clustering this chain makes")
        attempt("--pretrain", check_backbone, pretrain.model.backbone, pretrain.model.prompts,
                key="model.backbone", prompts_key="model.prompts")
        try:
            urls = [u for source in expand_sources(pretrain.data.urls) for u in source]
        except ValueError as e:
            problems.append(f"--pretrain: data.urls={pretrain.data.urls!r}: {e}")
        else:
            if urls and len(_missing_local(urls)) == len(urls):
                problems.append(f"--pretrain: data.urls: none of the {len(urls)} shard files exists "
                                f"(first: {urls[0]})")
        procs = env.get("PROCS_PER_NODE", "1")
        if not procs.isdigit() or int(procs) < 1:
            problems.append(f"PROCS_PER_NODE={procs!r} is not a positive integer")
        else:
            world = {"WORLD_SIZE": str(max(a.nodes, 1) * int(procs))}
            attempt(f"--pretrain (--nodes={a.nodes} x PROCS_PER_NODE={procs})", check_launcher,
                    pretrain.tasks_per_step, pretrain.meta.meta_step and not pretrain.meta.first_order, world)
        accel = env.get("ACCELERATE_CONFIG") or DEFAULT_ACCELERATE_CONFIG
        if not Path(accel).is_file():
            problems.append(f"ACCELERATE_CONFIG: the pretraining launcher config {accel} does not exist")
        if not pretrain.checkpoint.resume and list_checkpoints(pretrain.run_dir):
            problems.append(f"--pretrain: checkpoint.resume=false but run_dir={pretrain.run_dir} already holds "
                            "checkpoints; use a new run_dir")

    if a.finetune:
        _check_finetune(a, table, pretrain, problems)
    elif a.table or a.finetune_args:
        problems.append("--table / --finetune-args are given without --finetune; nothing would use them")


def _check_finetune(a: argparse.Namespace, table: Path | None, pretrain, problems: Problems) -> None:
    """The sweep table and every row's config, loaded as finetune_array.sbatch will load it."""
    from pipeline.finetune_config import load_finetune_config
    from pipeline.finetune_loop import preflight as finetune_preflight

    if table is None:
        problems.append("--finetune needs --table (the `dataset seed method` sweep table)")
        return
    if not table.is_file():
        problems.append(f"--table: {table} " + ("is not a file" if table.exists() else "does not exist"))
        return
    try:
        rows = read_table(table)
    except (ValueError, OSError) as e:
        problems.append(f"--table {table}: {e}")
        return
    artifact = (pretrain.artifact or Path(pretrain.run_dir) / "artifact.pt") if pretrain else None
    checked: set[tuple] = set()
    for number, dataset, seed, method in rows:
        label = f"--finetune {a.finetune} with table line {number} ({dataset} {seed} {method})"
        cfg = problems.attempt(label, load_finetune_config, a.finetune, [
            f"run_root={a.run_root}", *a.finetune_args, f"data.dataset={dataset}", f"seed={seed}",
            f"method={method}", f"tracking.group={a.sweep or 'finetune'}"])
        if not cfg:
            continue
        if not _same(cfg.run_root, a.run_root):
            problems.append(f"{label}: run_root={cfg.run_root} but --run-root={a.run_root}; the report would "
                            "read another folder (give it once, as --run-root)")
        if cfg.init == "artifact" and artifact is not None:
            if not _same(cfg.artifact, artifact):
                problems.append(f"{label}: artifact={cfg.artifact} is not the artifact this chain's pretraining "
                                f"writes ({artifact}); to start from another artifact, submit the sweep on its "
                                "own with finetune_array.sbatch")
                continue
            # the artifact is made by the pretraining job: check everything else the run's preflight checks
            cfg = replace(cfg, init="random", artifact="")
        key = (cfg.data.dataset, cfg.method, cfg.init)  # the seed changes nothing preflight looks at
        if key not in checked:
            checked.add(key)
            problems.attempt(label, finetune_preflight, cfg, environ={})


def main(argv: list[str] | None = None) -> int:
    """Check the chain (:func:`check_chain`), then submit it; returns 2 without submitting anything
    when a check fails, listing every problem on stderr."""
    a = parse_args(argv)
    env = dict(os.environ, PIPELINE_ROOT=str(ROOT))
    if a.sweep:
        env["SWEEP"] = a.sweep
    problems = check_chain(a, env)
    if problems:
        print(f"submit: {len(problems)} problem{'s' if len(problems) != 1 else ''}; nothing was submitted:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
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
        rows = read_table(a.table)
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
