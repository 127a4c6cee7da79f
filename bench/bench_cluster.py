"""Benchmark: fit + assign of the cross-modal hierarchy on N synthetic 512-d pairs (time, peak memory).

    .venv/bin/python bench/bench_cluster.py --n 1000000 --reps 3

Synthetic pairs have planted structure (domains in caption space, concepts in image space), so k-means
does real work. Fit uses faiss's subsampling (k * max_points_per_centroid points per k-means); assignment
is exact nearest-centroid search over every point, batched.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import numpy as np

from pipeline.data.clustering import KMeansConfig, fit_hierarchy


def synthetic(n: int, d: int, domains: int, concepts: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    dom = rng.integers(0, domains, n)
    con = rng.integers(0, concepts, n)
    dom_c = rng.normal(size=(domains, d)).astype(np.float32)
    con_c = rng.normal(size=(domains, concepts, d)).astype(np.float32)
    text = dom_c[dom] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    image = con_c[dom, con] + 0.7 * rng.standard_normal((n, d), dtype=np.float32)
    return image, text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--domains", type=int, default=16)
    p.add_argument("--concepts", type=int, default=32, help="concepts per domain")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
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
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    fmt = lambda xs: f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f} s"  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, n={args.n}, dim={args.dim}, "
          f"{args.domains} domains x {args.concepts} concepts, reps={args.reps}")
    print(f"fit    (min/median/max): {fmt(fits)}")
    print(f"assign (min/median/max): {fmt(assigns)}  -> {args.n / statistics.median(assigns):,.0f} points/s")
    print(f"peak RSS: {peak_gib:.2f} GiB (process, including the {image.nbytes * 2 / 2**30:.2f} GiB input)")


if __name__ == "__main__":
    main()
