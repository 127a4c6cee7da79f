"""Run every benchmark and write its figures into docs/BENCHMARKS.md.

Each benchmark runs in its own subprocess (its own thread settings and memory) and prints a markdown
table; the table, the exact command, the machine and the date replace the block between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in the document (a missing block is appended at
the end). Prose around the blocks is written by hand and left alone.

    python bench/run_all.py                 # everything that this machine can run (~45 min on 2 cores)
    python bench/run_all.py --quick         # small sizes, a few minutes (checks the machinery)
    python bench/run_all.py --only meta-50,reader
    python bench/run_all.py --list

The ``gpu-*`` benchmarks run only where CUDA is available; elsewhere their blocks are left as they are
(figures recorded on a GPU machine are not overwritten by a CPU-only run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pipeline.tracking, for the machine line
DOC = ROOT / "docs" / "BENCHMARKS.md"


@dataclass(frozen=True)
class Bench:
    """One benchmark: a script and its arguments (full and ``--quick``)."""

    title: str
    script: str
    args: tuple[str, ...]
    quick: tuple[str, ...]
    gpu: bool = False


_META = ("--batch", "4", "--flops")
BENCHES: dict[str, Bench] = {
    "meta-50": Bench("Meta overhead, tiny-vit, 50-class label space", "bench_meta.py",
                     ("--iters", "20", "--classes", "50", *_META), ("--iters", "3", "--warmup", "1", "--classes", "50", *_META)),
    "meta-10": Bench("Meta overhead, tiny-vit, 10-class label space", "bench_meta.py",
                     ("--iters", "20", "--classes", "10", *_META), ("--iters", "3", "--warmup", "1", "--classes", "10", *_META)),
    "meta-vitb16-cpu": Bench("Meta overhead, ViT-B/16 on the CPU", "bench_meta.py",
                             ("--arch", "ViT-B-16", "--iters", "3", "--warmup", "1", "--classes", "50", "--threads", "2",
                              "--no-memory", *_META),
                             ("--arch", "ViT-B-16", "--iters", "1", "--warmup", "0", "--classes", "10", "--threads", "2",
                              "--no-memory", "--batch", "4")),
    "labels-vitb16-cpu": Bench("Label-space scaling, ViT-B/16 on the CPU", "bench_labels.py",
                               ("--arch", "ViT-B-16", "--classes", "50,200,500,1000", "--threads", "2"),
                               ("--quick", "--threads", "1")),
    "ab-attention-input-vitb16": Bench("Contiguous attention input on and off, ViT-B/16 on the CPU",
                                       "ab_attention_input.py",
                                       ("--arch", "ViT-B-16", "--classes", "50", "--rounds", "3", "--threads", "2"),
                                       ("--classes", "10", "--rounds", "2")),
    # where the time of an iteration goes, by operator class (the measured/FLOP ratio explained)
    "profile-vitb16-50": Bench("Profile, ViT-B/16 on the CPU, 50 classes", "profile_meta.py",
                               ("--arch", "ViT-B-16", "--classes", "50", "--threads", "2", "--top", "12"),
                               ("--classes", "50", "--threads", "1", "--top", "5")),
    "profile-vitb16-500": Bench("Profile, ViT-B/16 on the CPU, 500 classes", "profile_meta.py",
                                ("--arch", "ViT-B-16", "--classes", "500", "--threads", "2", "--top", "12"),
                                ("--classes", "200", "--threads", "1", "--top", "5")),
    "reader": Bench("Shard reader vs open_clip_train's loader", "bench_reader.py",
                    ("--workers", "2", "--reps", "5"), ("--workers", "2", "--reps", "1", "--shards", "4",
                                                       "--samples-per-shard", "100", "--train-samples", "400")),
    "datawait": Bench("Stage-1 run: data wait and throughput", "bench_pretrain.py",
                      ("datawait", "--steps", "60"), ("datawait", "--steps", "12", "--skip", "2")),
    "scaling": Bench("Stage-1 run: 1 vs 2 processes", "bench_pretrain.py",
                     ("scaling", "--steps", "40", "--reps", "3"), ("scaling", "--steps", "8", "--skip", "2", "--reps", "1")),
    "cluster": Bench("Clustering 1M pairs", "bench_cluster.py",
                     ("--n", "1000000", "--reps", "3"), ("--n", "50000", "--reps", "1")),
    "gpu-meta-vitb16": Bench("GPU: ViT-B/16 bf16 meta overhead, samples/s, peak memory", "bench_meta.py",
                             ("--device", "cuda", "--arch", "ViT-B-16", "--autocast", "bf16", "--iters", "20",
                              "--classes", "50", *_META),
                             ("--device", "cuda", "--arch", "ViT-B-16", "--autocast", "bf16", "--iters", "3",
                              "--classes", "50", *_META), gpu=True),
    # the whole one-command GPU check (also `make gpu-check`); its steps have their own sizes and deadline
    "gpu-check": Bench("GPU check (`make gpu-check`)", "gpu_check.py", (), (), gpu=True),
}


def machine() -> str:
    """CPU model, cores, memory, GPU and library versions of this machine, in one line."""
    from pipeline.tracking import cpu_model  # imports torch: only when a benchmark has run

    cpu = cpu_model() or platform.machine()
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem = float("nan")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def replace_section(doc: str, name: str, body: str, title: str) -> str:
    """``doc`` with the block of ``name`` replaced by ``body`` (appended under ``title`` when missing)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc, count=1)
    return doc.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"


def run_one(name: str, bench: Bench, quick: bool) -> str:
    """Run one benchmark; returns the markdown block (command, machine, date, load, table)."""
    args = bench.quick if quick else bench.args
    table = Path(tempfile.mkdtemp()) / f"{name}.md"
    # the table comes back through a file: the benchmarks' own stdout also carries logs (demo builds)
    cmd = [sys.executable, str(ROOT / "bench" / bench.script), *args, "--markdown-out", str(table)]
    shown = "python " + shlex.join([f"bench/{bench.script}", *args])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"`{shown}`{' (quick)' if quick else ''}\n\n{machine()}; {when}; load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after; {wall:.0f} s.\n\n{table.read_text().strip()}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (checks the machinery, figures not comparable)")
    p.add_argument("--only", default="", help="comma-separated benchmark names (see --list)")
    p.add_argument("--doc", default=str(DOC), help="markdown file to update")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for name, b in BENCHES.items():
            print(f"{name:18s} {b.title}{' (GPU)' if b.gpu else ''}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHES)}")
    import torch

    doc_path = Path(args.doc)
    for name in names:
        bench = BENCHES[name]
        if bench.gpu and not torch.cuda.is_available():
            print(f"[skip] {name}: needs CUDA; its block in {doc_path} is left as it is", flush=True)
            continue
        print(f"[run ] {name}: {bench.title}", flush=True)
        body = run_one(name, bench, args.quick)
        print(body, flush=True)
        # re-read and write after every benchmark: a long run that fails later keeps what it measured
        doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
        doc_path.write_text(replace_section(doc, name, body, bench.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
