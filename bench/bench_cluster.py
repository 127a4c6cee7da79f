"""Benchmark: fit + assign of the cross-modal hierarchy on N synthetic 512-d pairs (time, peak memory).

    .venv/bin/python bench/bench_cluster.py --n 1000000 --reps 3

Synthetic pairs have planted structure (domains in caption space, concepts in image space), so k-means
does real work. Fit uses faiss's subsampling (k * max_points_per_centroid points per k-means); assignment
is exact nearest-centroid search over every point, batched.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cli, spread  # noqa: E402

from pipeline.data.clustering import KMeansConfig, fit_hierarchy  # noqa: E402


def synthetic(n: int, d: int, domains: int, concepts: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    dom = rng.integers(0, domains, n)
    con = rng.integers(0, concepts, n)
    dom_c = rng.normal(size=(domains, d)).astype(np.float32)
    con_c = rng.normal(size=(domains, concepts, d)).astype(np.float32)
    text = dom_c[dom] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    image = con_c[dom, con] + 0.7 * rng.standard_normal((n, d), dtype=np.float32)
    return image, text


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns a JSON-able dict (see :func:`markdown`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--domains", type=int, default=16)
    p.add_argument("--concepts", type=int, default=32, help="concepts per domain")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    image, text = synthetic(args.n, args.dim, args.domains, args.concepts)
    captions = [""] * args.n  # names are not timed here; the fit picks medoid captions by index
    fits, assigns = [], []
    for r in range(args.reps):
        t0 = time.perf_counter()
        h = fit_hierarchy(image, text, captions, args.domains, args.concepts, KMeansConfig(seed=r))
        t1 = time.perf_counter()
        h.assign(image, text)
        t2 = time.perf_counter()
        fits.append(t1 - t0)
        assigns.append(t2 - t1)
    return {"args": vars(args), "fit_s": spread(fits), "assign_s": spread(assigns),
            "assign_points_per_s": args.n / statistics.median(assigns),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "input_gib": image.nbytes * 2 / 2**30}


def markdown(result: dict) -> str:
    a, f, s = result["args"], result["fit_s"], result["assign_s"]
    return "\n".join([
        f"{a['n']:,} synthetic {a['dim']}-d pairs, {a['domains']} domains x {a['concepts']} concepts, "
        f"{a['reps']} repetitions.", "",
        "| N | fit min / median / max | assign min / median / max | assign throughput | peak RSS |",
        "|---|---|---|---|---|",
        f"| {a['n']:,} | {f['min']:.1f} / **{f['median']:.1f}** / {f['max']:.1f} s | {s['min']:.1f} / "
        f"**{s['median']:.1f}** / {s['max']:.1f} s | {result['assign_points_per_s']:,.0f} points/s | "
        f"{result['peak_rss_gib']:.2f} GiB (incl. the {result['input_gib']:.2f} GiB input) |",
    ])


def main(argv: list[str] | None = None) -> None:
    cli(run, markdown, argv)


if __name__ == "__main__":
    main()
