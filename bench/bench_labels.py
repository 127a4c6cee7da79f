"""Label-space scaling: one ProMetaR iteration vs one plain IVLP iteration as the number of classes grows.

The same iterations as ``bench/bench_meta.py`` (imported: same model build, same batch, same variants;
batch 4, IVLP 4+4 tokens at depth 9, random weights), one fresh subprocess per (variant, classes), each
under an address-space limit (``--memory-limit-gib``, as ``ulimit -v``) so a size that does not fit ends
that subprocess with an out-of-memory error instead of taking the machine down. Per run: a warm-up
iteration (it fills the per-class-name frozen text cache, as the first iteration of a training run
does), then one timed iteration, then one iteration under ``torch.utils.flop_counter`` (on the math
attention backend, whose attention it can count). Peak memory: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the resident set size polled during the timed
iteration, over its value just before it (glibc's mmap threshold lowered so freed tensors leave the
resident set), plus the process's ``ru_maxrss``.

Sizes are run in increasing order; before each size, the peak of every variant is extrapolated
linearly in the number of classes from the two largest sizes measured so far, and a size whose
extrapolated peak exceeds ``--memory-limit-gib`` is not run (reported as skipped with the
extrapolation), never guessed.

    python bench/bench_labels.py --arch ViT-B-16 --classes 50,200,500,1000 --threads 2
    python bench/bench_labels.py --quick          # tiny-vit, 10,40 classes: checks the machinery
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_meta  # noqa: E402
from common import cli  # noqa: E402

VARIANTS = ("plain", "prometar")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(args) -> dict:
    """In the subprocess: warm-up, timed iteration with peak memory, FLOP-counted iteration."""
    from torch.utils.flop_counter import FlopCounterMode

    ns = argparse.Namespace(arch=args.arch, device=args.device, precision="fp32", autocast=args.autocast,
                            batch=args.batch, classes=args.one_classes)
    model, batch = bench_meta.build(ns)
    fn = bench_meta.make_iteration(args.one_variant, model, batch, ns)
    cuda = str(args.device).startswith("cuda")
    out: dict = {}
    with bench_meta.autocast(ns):
        t = time.perf_counter()
        fn()  # warm-up: frozen text features of every class name, token embeddings of the class set
        bench_meta.sync(args.device)
        out["warmup_s"] = time.perf_counter() - t
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss()
        peak = [base]
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.0005)

        thread = None if cuda else threading.Thread(target=poll, daemon=True)
        if thread is not None:
            thread.start()
        t = time.perf_counter()
        fn()
        bench_meta.sync(args.device)
        out["time_s"] = time.perf_counter() - t
        if thread is not None:
            stop.set()
            thread.join()
            out["peak_over_idle_mib"] = (peak[0] - base) / 2**20
            out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
        else:
            out["peak_over_idle_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if not args.no_flops:
            # counted on the math backend, as bench_meta counts: the counter has no formula for the CPU
            # flash kernel the single-backward passes use, and would count their attention as 0 FLOP
            counted = bench_meta.with_attention(fn, "math")
            with FlopCounterMode(display=False) as counter:
                counted()
            out["gflop"] = counter.get_total_flops() / 1e9
    return out


def _limit(gib: float):
    def set_limit():  # in the child before exec: its address space, like `ulimit -v`
        n = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (n, n))
    return set_limit


def _subprocess(argv: list[str], variant: str, classes: int, gib: float, timeout: float) -> dict:
    cmd = [sys.executable, __file__, *argv, "--one-variant", variant, "--one-classes", str(classes)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              preexec_fn=_limit(gib) if gib > 0 else None)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        return {"error": f"exit status {proc.returncode}: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(points: dict[int, float], classes: int) -> float | None:
    """Linear extrapolation in the number of classes from the two largest measured sizes."""
    if len(points) < 2:
        return None
    (c0, m0), (c1, m1) = sorted(points.items())[-2:]
    return m1 + (m1 - m0) / (c1 - c0) * (classes - c1)


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns a JSON-able dict (see :func:`markdown`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", default="no", choices=("no", "bf16"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", default="50,200,500,1000", help="comma-separated label-space sizes, increasing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit-gib", type=float, default=20.0,
                   help="address-space limit of each measuring subprocess; sizes extrapolated above it are skipped")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="per subprocess")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny-vit at 10,40 classes (checks the machinery)")
    p.add_argument("--one-variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--one-classes", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.classes = "tiny-vit", "10,40"
        argv = [*argv, "--arch", "tiny-vit"]
    torch.set_num_threads(args.threads)
    if args.one_variant:
        return measure_one(args)
    sizes = sorted(int(c) for c in args.classes.split(","))
    rows: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for classes in sizes:
        for variant in VARIANTS:
            fits = {c: r["maxrss_mib"] if "maxrss_mib" in r else r["peak_over_idle_mib"]
                    for c, r in rows[variant].items() if "error" not in r and "skipped" not in r}
            guess = extrapolate(fits, classes)
            if guess is not None and guess > args.memory_limit_gib * 1024:
                rows[variant][classes] = {"skipped": f"extrapolated peak {guess / 1024:.1f} GiB > "
                                                     f"{args.memory_limit_gib:g} GiB limit"}
                continue
            print(f"[labels] {variant} at {classes} classes", file=sys.stderr, flush=True)
            rows[variant][classes] = _subprocess(argv, variant, classes, args.memory_limit_gib, args.timeout_s)
    growth = {}
    for variant in VARIANTS:  # per-class slope between the two largest measured sizes
        ok = {c: r for c, r in rows[variant].items() if "time_s" in r}
        if len(ok) >= 2:
            (c0, r0), (c1, r1) = sorted(ok.items())[-2:]
            growth[variant] = {key: (r1[key] - r0[key]) / (c1 - c0) for key in ("time_s", "gflop", "peak_over_idle_mib",
                                                                            "maxrss_mib") if key in r0 and key in r1}
            growth[variant]["between"] = [c0, c1]
    return {"args": {k: v for k, v in vars(args).items() if not k.startswith("one_")}, "torch": torch.__version__,
            "rows": {v: {str(c): r for c, r in rs.items()} for v, rs in rows.items()}, "growth": growth}


def markdown(result: dict) -> str:
    """One row per (classes, variant); then the per-class growth between the two largest sizes."""
    a = result["args"]
    cuda = str(a["device"]).startswith("cuda")
    lines = [f"arch={a['arch']} (random weights) device={a['device']} autocast={a['autocast']} batch={a['batch']} "
             f"threads={a['threads']} memory limit {a['memory_limit_gib']:g} GiB per run, torch={result['torch']}", "",
             f"| classes | iteration | time (s) | x plain | GFLOP | FLOP x plain | "
             f"{'CUDA peak allocated' if cuda else 'peak RSS over idle'} (MiB) | "
             f"{'' if cuda else 'max RSS (MiB) | '}warm-up (s) |",
             f"|---:|---|---:|---:|---:|---:|---:|{'' if cuda else '---:|'}---:|"]
    sizes = sorted({int(c) for rs in result["rows"].values() for c in rs})
    for c in sizes:
        plain = result["rows"]["plain"].get(str(c), {})
        for variant, rs in result["rows"].items():
            r = rs.get(str(c), {})
            if "time_s" not in r:
                lines.append(f"| {c} | {variant} | {r.get('skipped') or r.get('error', 'not run')} |")
                continue
            x = f"{r['time_s'] / plain['time_s']:.2f}" if "time_s" in plain else ""
            fx = f"{r['gflop'] / plain['gflop']:.2f}" if "gflop" in r and "gflop" in plain else ""
            cells = [f"{r['time_s']:.2f}", x, f"{r['gflop']:.4g}" if "gflop" in r else "", fx,
                     f"{r['peak_over_idle_mib']:.0f}"]
            if not cuda:
                cells.append(f"{r['maxrss_mib']:.0f}")
            cells.append(f"{r['warmup_s']:.2f}")
            lines.append(f"| {c} | {variant} | " + " | ".join(cells) + " |")
    if result["growth"]:
        lines += ["", "Growth per added class (between the two largest sizes measured):", ""]
        for variant, g in result["growth"].items():
            parts = [f"{g['time_s'] * 1000:.1f} ms"]
            if "gflop" in g:
                parts.append(f"{g['gflop']:.2f} GFLOP")
            parts.append(f"{g['peak_over_idle_mib']:.1f} MiB peak over idle")
            if "maxrss_mib" in g:
                parts.append(f"{g['maxrss_mib']:.1f} MiB max RSS")
            lines.append(f"- {variant} ({g['between'][0]} -> {g['between'][1]} classes): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--one-variant" in argv:  # the measuring subprocess answers in JSON on stdout
        print(json.dumps(run(argv)))
        return
    cli(run, markdown, argv)


if __name__ == "__main__":
    main()
