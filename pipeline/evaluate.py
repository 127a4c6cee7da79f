"""Evaluate a finished stage-2 run again: base / new / HM, domain generalization, cross-dataset.

    python -m pipeline.evaluate <run_dir> [--targets ImageNetV2 ImageNetSketch ...] [--subsets base new]

Reads the run's config and ``prompts.pt``, evaluates with :mod:`pipeline.evaluation` (the protocol) and
rewrites ``<run_dir>/results.json``, keeping its training summary. ``--root`` points at another data folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.config import to_dict
from pipeline.evaluation import (  # noqa: F401  (harmonic_mean, evaluate: public API of the protocol)
    RESULTS_FILE,
    evaluate,
    harmonic_mean,
    load_run,
    preflight,
    read_run,
    write_results,
)
from pipeline.run_lock import RunLock


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run folder written by pipeline.finetune")
    ap.add_argument("--subsets", nargs="*", default=None, help="class subsets (default: the run's eval.subsets)")
    ap.add_argument("--targets", nargs="*", default=None, help="other datasets (domain / cross-dataset)")
    ap.add_argument("--root", default=None, help="data root (default: the run's data.root)")
    args = ap.parse_args(argv)
    cfg, cfg_dict = read_run(args.run_dir)
    ev = cfg.eval
    if args.subsets is not None:
        ev = replace(ev, subsets=tuple(args.subsets))
    if args.targets is not None:
        ev = replace(ev, targets=tuple(args.targets))
    cfg = replace(cfg, eval=ev, data=replace(cfg.data, root=args.root) if args.root else cfg.data)
    preflight(cfg, args.run_dir)
    with RunLock(args.run_dir):  # not while a training run (or another evaluation) writes this folder
        cfg, _, model, prompts, transform = load_run(args.run_dir, cfg)
        results = evaluate(cfg, model, prompts, transform)
        old = Path(args.run_dir) / RESULTS_FILE
        extra = {}
        if old.exists():  # keep the training summary of the run
            extra = {k: v for k, v in json.loads(old.read_text()).items() if k == "train"}
        # the config in effect: --subsets, --targets and --root are recorded with the results they gave
        path = write_results(args.run_dir, cfg, to_dict(cfg), results, extra)
    summary = {k: round(v["accuracy"], 2) for k, v in results.items() if isinstance(v, dict) and "accuracy" in v}
    if "hm" in results:
        summary["hm"] = round(results["hm"], 2)
    for name, t in results.get("targets", {}).items():
        summary[name] = round(t["accuracy"], 2)
    print(f"evaluate: {json.dumps(summary)}; wrote {path}")
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
