"""Meta overhead: one ProMetaR iteration vs one plain IVLP prompt-tuning iteration (DESIGN section 8).

Both run side by side in one process on the same batch and backbone (the in-repo ``tiny-vit`` by
default: 12 layers per tower, IVLP 4+4 tokens at depth 9), interleaved so machine load affects both
alike; the reported time is the median over iterations. Peak memory is measured per variant in a fresh
subprocess: on CUDA ``torch.cuda.max_memory_allocated`` during the iterations, on CPU the increase of
the resident set size, polled while three iterations run, over its value just before them (glibc's
mmap threshold is lowered in that subprocess so freed tensors are returned and RSS tracks live memory).

    python bench/bench_meta.py                      # CPU, tiny-vit, markdown table on stdout
    python bench/bench_meta.py --device cuda --arch ViT-B-16 --batch 4 --classes 50
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbone import load_backbone  # noqa: E402
from pipeline.config import BackboneConfig, PromptConfig  # noqa: E402
from pipeline.meta.config import LossConfig, MetaConfig, RegulatorConfig  # noqa: E402
from pipeline.meta.objective import Batch, Objective  # noqa: E402
from pipeline.meta.prometar import prometar_iteration  # noqa: E402
from pipeline.prompts import PromptedCLIP  # noqa: E402
from pipeline.regulator import Regulator  # noqa: E402

VARIANTS = {
    "plain": None,
    "prometar": MetaConfig(),
    "prometar_first_order": MetaConfig(first_order=True),
    "regularized_only": MetaConfig(meta_step=False),
}


def build(args):
    torch.manual_seed(0)
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


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_all(args):
    model, batch = build(args)
    iterations = {name: make_iteration(name, model, batch, args) for name in VARIANTS}
    for _ in range(args.warmup):
        for fn in iterations.values():
            fn()
    times = {name: [] for name in VARIANTS}
    for _ in range(args.iters):
        for name, fn in iterations.items():  # interleaved: the same load for every variant
            sync(args.device)
            t = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def memory_one(args, name):
    model, batch = build(args)
    fn = make_iteration(name, model, batch, args)
    cuda = str(args.device).startswith("cuda")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny-vit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--memory-of", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_mib": memory_one(args, args.memory_of)}))
        return
    times = time_all(args)
    memory = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--memory-of", name]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        memory[name] = json.loads(out)["peak_mib"]
    what = "CUDA peak allocated" if str(args.device).startswith("cuda") else "peak RSS over idle"
    print(f"arch={args.arch} device={args.device} precision={args.precision} batch={args.batch} "
          f"classes={args.classes} iters={args.iters} threads={args.threads} torch={torch.__version__}")
    print(f"\n| iteration | median time (ms) | x plain | {what} (MiB) | x plain |")
    print("|---|---:|---:|---:|---:|")
    for name in VARIANTS:
        print(
            f"| {name} | {1000 * times[name]:.1f} | {times[name] / times['plain']:.2f} | "
            f"{memory[name]:.1f} | {memory[name] / max(memory['plain'], 1e-9):.2f} |"
        )


if __name__ == "__main__":
    main()
