"""A/B of the contiguous self-attention input (``pipeline.prompts._ContiguousAttentionInput``): plain and
ProMetaR iterations with it on (the pipeline's default) and off, interleaved in one process, the order
flipped every other round so neither always runs first. Off, ``nn.MultiheadAttention`` projects a
strided ``[L, N, E]`` view, which ``matmul`` runs as a ``bmm`` over a broadcast weight.

    python bench/ab_attention_input.py --arch ViT-B-16 --classes 50 --rounds 3 --threads 2
    python bench/ab_attention_input.py --rounds 15          # tiny-vit
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_meta  # noqa: E402
from common import cli, spread  # noqa: E402

import pipeline.prompts as prompts_mod  # noqa: E402

MODES = {"contiguous": prompts_mod._ContiguousAttentionInput, "strided": contextlib.nullcontext}


def _in_mode(fn, mode: str):
    def run():
        saved = prompts_mod._ContiguousAttentionInput
        prompts_mod._ContiguousAttentionInput = MODES[mode]  # looked up at every forward
        try:
            return fn()
        finally:
            prompts_mod._ContiguousAttentionInput = saved
    return run


def run(argv: list[str]) -> dict:
    """Run the A/B; returns a JSON-able dict (see :func:`markdown`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="plain,prometar")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in bench_meta.VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}; choose from {list(bench_meta.VARIANTS)}")
    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(arch=args.arch, device="cpu", precision="fp32", autocast="no", batch=args.batch,
                            classes=args.classes)
    model, batch = bench_meta.build(ns)
    fns = {(v, m): _in_mode(bench_meta.make_iteration(v, model, batch, ns), m) for v in variants for m in MODES}
    for fn in fns.values():
        fn()  # warm-up: frozen caches
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for r in range(args.rounds):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for key, fn in order:
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    rows = {}
    for v in variants:
        on, off = times[(v, "contiguous")], times[(v, "strided")]
        rows[v] = {"contiguous": spread(on), "strided": spread(off),
                   "ratio": spread([a / b for a, b in zip(on, off)])}
    return {"args": vars(args), "torch": torch.__version__, "rows": rows}


def markdown(result: dict) -> str:
    """Medians per variant and mode, and the per-round ratio contiguous / strided."""
    a = result["args"]
    lines = [f"arch={a['arch']} classes={a['classes']} batch={a['batch']} rounds={a['rounds']} threads={a['threads']} "
             f"torch={result['torch']}", "",
             "| iteration | strided median (ms) | contiguous median (ms) | contiguous / strided per round, min / median / max |",
             "|---|---:|---:|---:|"]
    for v, r in result["rows"].items():
        x = r["ratio"]
        lines.append(f"| {v} | {1000 * r['strided']['median']:.1f} | {1000 * r['contiguous']['median']:.1f} | "
                     f"{x['min']:.2f} / **{x['median']:.2f}** / {x['max']:.2f} |")
    rows = result["rows"]
    if {"plain", "prometar"} <= set(rows):
        for mode in MODES:
            ratio = rows["prometar"][mode]["median"] / rows["plain"][mode]["median"]
            lines.append(f"\nprometar / plain with the {mode} input (medians): {ratio:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, markdown)
