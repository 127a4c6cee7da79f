"""The end-to-end digits demo: demo backbone -> stage 1 -> stage 2 (5 methods x 3 seeds) -> report.

    python -m pipeline.digits_demo [--seeds 1 2 3] [--force]

Run from the repository root. Steps, each cached or idempotent:

1. ``python -m pipeline.pretrain`` with no arguments: builds the digits data, the demo backbone
   (open_clip_train), features and clusters when missing, then stage-1 meta-pretraining into
   ``runs/demo/pretrain/artifact.pt`` (a finished run is resumed at its last step, i.e. not redone);
2. ``configs/finetune/demo.yaml`` on the 5 base digits for every seed: ``zeroshot`` (frozen CLIP),
   ``ivlp`` (cross-entropy only), ``promptsrc_lite`` (cross-entropy + fixed L1 consistency),
   ``prometar`` (prompts from "a photo of a") and ``prometar_stage1`` (``prometar`` with prompts and
   regulator from the stage-1 artifact), each evaluated on base and new digits in their own label spaces;
3. ``python -m pipeline.report runs/demo/finetune``: ``report.md``, ``report.csv`` and plots there.

``--force`` reruns the stage-2 runs that already have results (stage 1 is never redone here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline import finetune, pretrain, report

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "demo.yaml"
ARTIFACT = "runs/demo/pretrain/artifact.pt"
RUNS = [
    ("zeroshot", ["method=zeroshot"]),
    ("ivlp", ["method=ivlp"]),
    ("promptsrc_lite", ["method=promptsrc_lite"]),
    ("prometar", ["method=prometar"]),
    ("prometar_stage1", ["method=prometar", "init=artifact", f"artifact={ARTIFACT}", "name=prometar_stage1"]),
]
"""(name, overrides) of the compared methods (presets of pipeline.finetune_config.METHOD_PRESETS)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m pipeline.digits_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--force", action="store_true", help="rerun stage-2 runs that already have results")
    ap.add_argument("extra", nargs="*", help="dotted overrides for every stage-2 run")
    args = ap.parse_args(argv)
    t0 = time.time()
    if pretrain.main([]) != 0:
        print("demo: stage 1 did not finish", file=sys.stderr)
        return 1
    t1 = time.time()
    for seed in args.seeds:
        for _, overrides in RUNS:
            cfg = finetune.load_finetune_config(CONFIG, [*overrides, f"seed={seed}",
                                                         f"force={str(args.force).lower()}", *args.extra])
            finetune.run(cfg)
    t2 = time.time()
    root = finetune.load_finetune_config(CONFIG, args.extra).run_root
    out = report.report(root)
    print(out["markdown"])
    print(f"demo: stage 1 {t1 - t0:.0f} s, stage 2 ({len(args.seeds) * len(RUNS)} runs) {t2 - t1:.0f} s, "
          f"total {time.time() - t0:.0f} s; report {out['out']}/report.md")
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
