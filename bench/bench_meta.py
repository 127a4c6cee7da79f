"""Meta overhead: one ProMetaR iteration vs one plain IVLP prompt-tuning iteration (docs/ARCHITECTURE.md section 8).

All variants run side by side in one process on the same batch and backbone (the in-repo ``tiny-vit``
by default: 12 layers per tower, IVLP 4+4 tokens at depth 9), interleaved so machine load affects them
alike. Reported per variant: min / median / max wall time over iterations, and the ratio to the plain
iteration of the same round (min / median / max over rounds). Peak memory is measured per variant in a
fresh subprocess: on CUDA ``torch.cuda.max_memory_allocated`` during the iterations, on CPU the increase
of the resident set size, polled while three iterations run, over its value just before them (glibc's
mmap threshold is lowered in that subprocess so freed tensors are returned and RSS tracks live memory).
``--flops`` also counts the floating-point operations of one iteration of each variant
(``torch.utils.flop_counter``, on the math backend, whose attention it can count): the ratio a
compute-bound device would see, independent of load.

``--attention`` picks the SDPA backend: ``auto`` (default) runs the iterations as the pipeline does
(fused kernels in passes with a single backward, math in second-order ones; see
:func:`pipeline.prompts.first_order_attention`), ``math`` forces the math backend everywhere (the
behaviour before fused kernels were allowed), ``both`` runs every variant under both, alternating within
each round, and adds the per-round ratio ``auto / math`` (rows ``NAME@math`` and ``NAME@auto``).
``--variants`` restricts the variants (comma-separated).

    python bench/bench_meta.py                      # CPU, tiny-vit, markdown table on stdout
    python bench/bench_meta.py --device cuda --arch ViT-B-16 --autocast bf16 --batch 4 --classes 50
    python bench/bench_meta.py --attention both --variants plain,regularized_only --no-memory
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cli, spread  # noqa: E402

from pipeline.backbone import load_backbone  # noqa: E402
from pipeline.config import BackboneConfig, PromptConfig  # noqa: E402
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig  # noqa: E402
from pipeline.meta.objective import Batch, Objective  # noqa: E402
from pipeline.meta.prometar import prometar_iteration  # noqa: E402
from pipeline.meta.regulator import Regulator  # noqa: E402
from pipeline.prompts import PromptedCLIP, first_order_attention  # noqa: E402

VARIANTS = {
    "plain": None,
    "prometar": MetaConfig(),
    "prometar_first_order": MetaConfig(first_order=True),
    "regularized_only": MetaConfig(meta_step=False),
}


def build(args):
    torch.manual_seed(0)
    if str(args.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # what a user's GPU run would use
    backbone = load_backbone(BackboneConfig(arch=args.arch, pretrained="", precision=args.precision), device=args.device)
    model = PromptedCLIP(backbone, PromptConfig(type="ivlp", depth_text=9, depth_vision=9), generator=torch.Generator().manual_seed(0))
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(1)
    classes = tuple(f"class {i}" for i in range(args.classes))
    labels = torch.arange(args.batch) % min(args.classes, args.batch)
    images = torch.randn(args.batch, 3, size, size, generator=g).to(args.device, backbone.dtype)
    return model, Batch(images, labels.to(args.device), classes)


def make_iteration(name, model, batch, args):
    prompts = {k: torch.nn.Parameter(v.detach().clone()) for k, v in model.initial_prompts().items()}
    sgd = torch.optim.SGD(list(prompts.values()), lr=0.0025)
    if name == "plain":
        def plain():
            with first_order_attention():  # one backward: fused attention allowed, as the pipeline runs it
                logits = model.logits(batch.images, batch.classnames, prompts)
            loss = F.cross_entropy(logits, batch.labels)
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
        return plain
    objective = Objective(model, LossConfig())
    regulator = Regulator.for_prompts(prompts, RegulatorConfig())
    adamw = torch.optim.AdamW(regulator.parameters(), lr=RegulatorConfig().lr)
    gen = torch.Generator().manual_seed(2)
    cfg = VARIANTS[name]
    frozen = objective.with_frozen(batch)  # frozen features once per batch, as a data pipeline would
    return lambda: prometar_iteration(objective, prompts, regulator, frozen, cfg, sgd, adamw, gen)


ATTENTION_MODES = ("auto", "math")


def labels(args) -> list[str]:
    """Row labels: the variants, as ``NAME@MODE`` under ``--attention both``."""
    if args.attention == "both":
        return [f"{v}@{m}" for v in args.variants for m in ATTENTION_MODES]
    return list(args.variants)


def split_label(label: str, args) -> tuple[str, str]:
    """``(variant, attention mode)`` of a row label."""
    name, _, mode = label.partition("@")
    return name, mode or args.attention


def with_attention(fn, mode: str):
    """``fn`` under the attention mode: ``math`` forces the math backend around the whole iteration (an
    outer ``sdpa_kernel`` holds where the pipeline's own context enters none); ``auto`` leaves it as is."""
    if mode == "auto":
        return fn

    def run_math():
        with sdpa_kernel(SDPBackend.MATH):
            return fn()
    return run_math


def make_labelled(label: str, model, batch, args):
    name, mode = split_label(label, args)
    return with_attention(make_iteration(name, model, batch, args), mode)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def autocast(args):
    """bf16 autocast on CUDA as the pipeline runs it (``mixed_precision=bf16``); nothing otherwise."""
    if args.autocast == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


def time_all(args) -> dict[str, list[float]]:
    model, batch = build(args)
    iterations = {label: make_labelled(label, model, batch, args) for label in labels(args)}
    with autocast(args):
        for _ in range(args.warmup):
            for fn in iterations.values():
                fn()
        times: dict[str, list[float]] = {label: [] for label in iterations}
        for i in range(args.iters):
            # interleaved: the same load for every variant; the order flips every round, so under
            # --attention both neither backend always runs first
            order = list(iterations.items()) if i % 2 == 0 else list(iterations.items())[::-1]
            for name, fn in order:
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                times[name].append(time.perf_counter() - t)
    return times


def count_flops(args) -> dict[str, float]:
    """Floating-point operations of one iteration of each variant (after a warm-up iteration, so the
    frozen-feature caches are filled as in a running loop)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, batch = build(args)
    out = {}
    with autocast(args):
        for name in labels(args):
            # counted on the math backend whatever the timed mode: the same arithmetic, but the counter
            # has no formula for the CPU flash kernel (it would count its attention as 0 FLOP)
            fn = with_attention(make_iteration(split_label(name, args)[0], model, batch, args), "math")
            fn()
            with FlopCounterMode(display=False) as counter:
                fn()
            out[name] = float(counter.get_total_flops())
    return out


def memory_one(args, name):
    model, batch = build(args)
    fn = make_labelled(name, model, batch, args)
    cuda = str(args.device).startswith("cuda")
    with autocast(args):
        return _memory(fn, cuda)


def _memory(fn, cuda: bool) -> float:
    if cuda:
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU: poll the resident set size while the iterations run. The subprocess is started with
    # glibc's mmap threshold lowered, so freed tensors go back to the OS and RSS tracks live memory.
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    fn()
    gc.collect()
    base = rss()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    for _ in range(3):
        fn()
    stop.set()
    thread.join()
    return (peak[0] - base) / 2**20


def run(argv: list[str]) -> dict:
    """Run the benchmark; returns a JSON-able dict (see :func:`markdown`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="backbone weights dtype")
    p.add_argument("--autocast", default="no", choices=("no", "bf16"), help="bf16 autocast (GPU runs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--flops", action="store_true", help="also count FLOPs per variant")
    p.add_argument("--attention", default="auto", choices=("auto", "math", "both"),
                   help="SDPA backend: as the pipeline picks it, math everywhere, or both side by side")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--memory-of", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return {"peak_mib": memory_one(args, args.memory_of)}
    times = time_all(args)
    result: dict = {"args": vars(args), "torch": torch.__version__, "variants": {}}
    device_name = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"
    result["device_name"] = device_name
    flops = count_flops(args) if args.flops else {}
    for name in times:
        variant, mode = split_label(name, args)
        # the reference row: the first variant (plain by default) under the same attention mode
        ref = args.variants[0] + (f"@{mode}" if args.attention == "both" else "")
        ratios = [t / p0 for t, p0 in zip(times[name], times[ref])]  # per interleaved round
        entry = {"time_s": spread(times[name]), "ratio": spread(ratios),
                 "samples_per_s": args.batch / statistics.median(times[name])}
        if args.attention == "both" and mode == "auto":
            entry["vs_math"] = spread([t / m for t, m in zip(times[name], times[f"{variant}@math"])])
        if flops:
            entry["gflop"] = flops[name] / 1e9
            entry["flop_ratio"] = flops[name] / flops[ref]
        if not args.no_memory:
            cmd = [sys.executable, __file__, *argv, "--memory-of", name]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            entry["peak_mib"] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        result["variants"][name] = entry
    if not args.no_memory:
        for name, entry in result["variants"].items():
            mode = split_label(name, args)[1]
            ref = args.variants[0] + (f"@{mode}" if args.attention == "both" else "")
            entry["memory_ratio"] = entry["peak_mib"] / max(result["variants"][ref]["peak_mib"], 1e-9)
    return result


def markdown(result: dict) -> str:
    """The result as a markdown table (one row per variant)."""
    a = result["args"]
    cuda = str(a["device"]).startswith("cuda")
    what = "CUDA peak allocated" if cuda else "peak RSS over idle"
    lines = [f"arch={a['arch']} device={a['device']} ({result['device_name']}) precision={a['precision']} "
             f"autocast={a['autocast']} batch={a['batch']} classes={a['classes']} iters={a['iters']} "
             f"threads={a['threads']} attention={a.get('attention', 'math')} torch={result['torch']}", ""]
    ref = a.get("variants", ["plain"])[0]
    head = f"| iteration | time min / median / max (ms) | x {ref} min / median / max | samples/s |"
    rule = "|---|---:|---:|---:|"
    some = next(iter(result["variants"].values()))
    both = a.get("attention") == "both"
    if both:
        head, rule = head + " auto / math min / median / max |", rule + "---:|"
    if "gflop" in some:
        head, rule = head + " GFLOP | FLOP x plain |", rule + "---:|---:|"
    if "peak_mib" in some:
        head, rule = head + f" {what} (MiB) | x plain |", rule + "---:|---:|"
    lines += [head, rule]
    for name, e in result["variants"].items():
        t, r = e["time_s"], e["ratio"]
        row = (f"| {name} | {1000 * t['min']:.1f} / {1000 * t['median']:.1f} / {1000 * t['max']:.1f} | "
               f"{r['min']:.2f} / **{r['median']:.2f}** / {r['max']:.2f} | {e['samples_per_s']:.1f} |")
        if both:
            v = e.get("vs_math")
            row += f" {v['min']:.2f} / **{v['median']:.2f}** / {v['max']:.2f} |" if v else " |"
        if "gflop" in e:
            row += f" {e['gflop']:.2f} | {e['flop_ratio']:.2f} |"
        if "peak_mib" in e:
            row += f" {e['peak_mib']:.1f} | {e['memory_ratio']:.2f} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--memory-of" in argv:  # the per-variant memory subprocess answers in JSON on stdout
        print(json.dumps(run(argv)))
        return
    cli(run, markdown, argv)


if __name__ == "__main__":
    main()
