"""Where the time of one iteration goes: operator classes, their share and their achieved GFLOP/s.

The iterations of ``bench/bench_meta.py`` (imported: same model, batch and variants), each run once to
warm up, then once under ``torch.profiler`` (self CPU/CUDA time per operator) and once under
``torch.utils.flop_counter`` (FLOPs per operator; the counter has no formula for the CPU flash kernel, so
the iteration is also counted on the math attention backend and the difference is booked to *attention*). Operators are grouped into classes: *matmul*
(``mm``/``bmm``/``addmm``/``baddbmm``/``linear``/convolution), *attention* (the SDPA kernels),
*elementwise & norms* (activations, layer norm, softmax and their backwards, ``mul``/``add``/...),
*copies & layout* (``copy_``, ``cat``, ``index``, ``clone``, ...), *dispatch* (``view``/``reshape``/
``expand``/... and every other operator that moves no data) and *other*. Per class: self time, share of
the iteration, FLOPs and achieved GFLOP/s. A FLOP-proportional iteration (measured time ratio to
*plain* = FLOP ratio) needs the classes that do no FLOPs to grow no faster than the matmuls; the table
shows which class breaks it.

    python bench/profile_meta.py --arch ViT-B-16 --classes 50 --batch 4 --threads 2
    python bench/profile_meta.py --variants plain,prometar --top 15      # tiny-vit, also the top operators
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_meta  # noqa: E402
from common import cli  # noqa: E402

CLASSES = ("matmul", "attention", "elementwise & norms", "copies & layout", "dispatch", "other")
_PATTERNS = [
    ("matmul", r"^aten::(mm|bmm|addmm|baddbmm|matmul|linear|_convolution|convolution|mkldnn_convolution|"
               r"convolution_backward|_mkldnn.*|addbmm)$"),
    ("attention", r"scaled_dot_product|_flash_attention|_efficient_attention|_cudnn_attention"),
    ("copies & layout", r"^aten::(copy_|_to_copy|to|clone|contiguous|cat|stack|index|index_select|index_put_|"
                        r"_index_put_impl_|gather|scatter|scatter_add_|fill_|zero_|zeros|zeros_like|empty_like|"
                        r"new_zeros|ones_like|full|where|masked_fill_?|_unsafe_index|embedding|embedding_backward|"
                        r"embedding_dense_backward|cumsum|sort|roll|flip|constant_pad_nd|narrow_copy|"
                        r"slice_backward|select_backward|index_select_backward|unfold_backward)$"),
    ("dispatch", r"^aten::(view|_unsafe_view|reshape|expand|expand_as|as_strided|t|transpose|permute|unsqueeze|"
                 r"squeeze|slice|select|split|split_with_sizes|chunk|unbind|detach|alias|lift_fresh|"
                 r"resolve_conj|resolve_neg|_reshape_alias|flatten|unflatten|empty|empty_strided|"
                 r"result_type|numel|size|stride|is_nonzero|item|_local_scalar_dense|set_|"
                 r"broadcast_tensors|movedim|narrow|conj|_neg_view|_conj|view_as|contiguous)$"),
    ("elementwise & norms", r"^aten::"),  # every other aten operator computes elementwise or reduces
]
_COMPILED = [(name, re.compile(p)) for name, p in _PATTERNS]


def op_name(name: str) -> str:
    """The profiler's spelling (``aten::mm``) of an operator name; FLOP-counter keys read ``aten.mm``
    (an overload packet) or ``aten.mm.default``."""
    if name.startswith("aten."):
        return "aten::" + name.split(".")[1]
    return name


def op_class(name: str) -> str:
    """The class (one of :data:`CLASSES`) of a profiler or FLOP-counter operator name."""
    name = op_name(name)
    for cls, pattern in _COMPILED:
        if pattern.search(name):
            return cls
    return "other"


def _flop_counts(counter) -> dict[str, int]:
    """FLOPs per operator name (overload dropped) from a finished ``FlopCounterMode``."""
    out: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = op_name(str(op))
        out[name] = out.get(name, 0) + int(n)
    return out


def profile_one(label: str, model, batch, args) -> dict:
    """Warm-up, one profiled iteration, one FLOP-counted iteration of ``label``."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    cuda = str(args.device).startswith("cuda")
    fn = bench_meta.make_labelled(label, model, batch, args)
    fn()  # warm-up: frozen text caches filled, as in a running loop
    bench_meta.sync(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        bench_meta.sync(args.device)
    wall = time.perf_counter() - t
    # FLOPs per operator as timed; the counter has no formula for the CPU flash kernel, so the iteration
    # is counted again on the math backend (the same arithmetic) and the difference is the fused
    # kernels' attention
    math = bench_meta.with_attention(
        bench_meta.make_iteration(bench_meta.split_label(label, args)[0], model, batch, args), "math")
    math()  # warm-up of the new iteration, as for the timed one (fn has run twice already)
    flops = {}
    for mode, counted in (("as timed", fn), ("math", math)):
        with FlopCounterMode(display=False) as counter:
            counted()
        flops[mode] = _flop_counts(counter)
    fused_attention = sum(flops["math"].values()) - sum(flops["as timed"].values())
    flops = flops["as timed"]
    ops: dict[str, dict] = {}
    for e in prof.key_averages():
        self_us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if not e.key.startswith("aten::") or self_us <= 0:
            continue  # autograd nodes, profiler markers: their self time is bookkeeping, kept as "other"
        ops[e.key] = {"self_ms": self_us / 1000, "calls": e.count, "gflop": flops.get(e.key, 0) / 1e9}
    for name, n in flops.items():  # counted operators the profiler saw no self time for
        ops.setdefault(name, {"self_ms": 0.0, "calls": 0, "gflop": n / 1e9})
    total_self = sum(o["self_ms"] for o in ops.values())
    classes = {c: {"self_ms": 0.0, "calls": 0, "gflop": 0.0} for c in CLASSES}
    for name, o in ops.items():
        c = classes[op_class(name)]
        c["self_ms"] += o["self_ms"]
        c["calls"] += o["calls"]
        c["gflop"] += o["gflop"]
    classes["attention"]["gflop"] += fused_attention / 1e9
    # the profiled wall time minus the operators' self time: Python, autograd engine, profiler overhead
    classes["other"]["self_ms"] += max(wall * 1000 - total_self, 0.0)
    top = sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"])[: args.top]
    return {"wall_ms": wall * 1000, "gflop": sum(c["gflop"] for c in classes.values()), "classes": classes,
            "top": [{"op": k, **v, "class": op_class(k)} for k, v in top]}


def run(argv: list[str]) -> dict:
    """Run the profile; returns a JSON-able dict (see :func:`markdown`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--autocast", default="no", choices=("no", "bf16"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", default="auto", choices=("auto", "math"))
    p.add_argument("--variants", default="plain,prometar", help="comma-separated; the first is the reference")
    p.add_argument("--top", type=int, default=0, help="also list the N operators with the most self time")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in bench_meta.VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {list(bench_meta.VARIANTS)}")
    torch.set_num_threads(args.threads)
    model, batch = bench_meta.build(args)
    out = {}
    with bench_meta.autocast(args):
        for name in args.variants:
            print(f"[profile] {name}", file=sys.stderr, flush=True)
            out[name] = profile_one(name, model, batch, args)
    return {"args": vars(args), "torch": torch.__version__, "variants": out}


def markdown(result: dict) -> str:
    """Per variant and operator class: self time, share, ratio to the reference variant, GFLOP, GFLOP/s."""
    a = result["args"]
    v = result["variants"]
    ref = a["variants"][0]
    lines = [f"arch={a['arch']} device={a['device']} autocast={a['autocast']} batch={a['batch']} "
             f"classes={a['classes']} threads={a['threads']} attention={a['attention']} torch={result['torch']}", ""]
    lines += ["| iteration | wall (ms, profiled) | x " + ref + " | GFLOP | FLOP x " + ref + " | GFLOP/s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in v.items():
        lines.append(f"| {name} | {r['wall_ms']:.0f} | {r['wall_ms'] / v[ref]['wall_ms']:.2f} | {r['gflop']:.1f} | "
                     f"{r['gflop'] / max(v[ref]['gflop'], 1e-12):.2f} | {r['gflop'] / (r['wall_ms'] / 1000):.1f} |")
    lines += ["", "| iteration | operator class | self time (ms) | share | x " + ref + " | calls | GFLOP | GFLOP/s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in v.items():
        for cls in CLASSES:
            c = r["classes"][cls]
            base = v[ref]["classes"][cls]["self_ms"]
            x = f"{c['self_ms'] / base:.2f}" if base > 0 else ""
            rate = f"{c['gflop'] / (c['self_ms'] / 1000):.1f}" if c["gflop"] > 0 and c["self_ms"] > 0 else ""
            lines.append(f"| {name} | {cls} | {c['self_ms']:.0f} | {100 * c['self_ms'] / r['wall_ms']:.0f}% | {x} | "
                         f"{c['calls']} | {c['gflop']:.1f} | {rate} |")
    if a["top"]:
        for name, r in v.items():
            lines += ["", f"Top operators of {name} by self time:", "",
                      "| operator | class | self time (ms) | calls | GFLOP |", "|---|---|---:|---:|---:|"]
            lines += [f"| `{o['op']}` | {o['class']} | {o['self_ms']:.1f} | {o['calls']} | {o['gflop']:.2f} |"
                      for o in r["top"]]
    return "\n".join(lines)


if __name__ == "__main__":
    cli(run, markdown)
