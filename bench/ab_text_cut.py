"""A/B of the class-text padding cut: plain and ProMetaR iterations with the cut on and off, interleaved
in one process (the cut is switched off for one of two identical models).

    python bench/ab_text_cut.py --classes 50 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_meta  # noqa: E402

from pipeline.prompts import PromptedCLIP  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    build_args = argparse.Namespace(arch=args.arch, device="cpu", precision="fp32", batch=args.batch,
                                    classes=args.classes)
    cut = PromptedCLIP.text_length
    setups = {}
    for label, length in (("cut", cut), ("full context", lambda self, ids: int(ids.shape[1]))):
        PromptedCLIP.text_length = length  # token ids are cached per model at first use, so this sticks
        model, batch = bench_meta.build(build_args)
        setups[label] = {n: bench_meta.make_iteration(n, model, batch, build_args) for n in ("plain", "prometar")}
        for fn in setups[label].values():
            fn()
    PromptedCLIP.text_length = cut
    times = {(label, n): [] for label in setups for n in setups[label]}
    for _ in range(args.rounds):
        for label, fns in setups.items():
            for n, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[(label, n)].append(time.perf_counter() - t)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print("| text | plain (ms) | prometar (ms) | prometar / plain |\n|---|---:|---:|---:|")
    for label in setups:
        print(f"| {label} | {med[(label, 'plain')]:.1f} | {med[(label, 'prometar')]:.1f} | "
              f"{med[(label, 'prometar')] / med[(label, 'plain')]:.2f} |")


if __name__ == "__main__":
    main()
