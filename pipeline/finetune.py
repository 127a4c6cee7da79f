"""Stage 2: few-shot prompt tuning with ProMetaR, and the baselines, on one dataset (docs/ARCHITECTURE.md sections 5, 6).

    python -m pipeline.finetune --config configs/finetune/<x>.yaml data.dataset=EuroSAT seed=2 method=ivlp

One process (stage 2 is cheap next to stage 1; several runs of a sweep go to several jobs instead).
Each run writes ``<run_root>/<dataset>/<name or method>/seed_<seed>/``: ``metrics.jsonl``, W&B files,
per-epoch checkpoints, ``prompts.pt`` (an artifact, usable by :mod:`pipeline.evaluate`) and
``results.json``. A run whose ``results.json`` exists is skipped unless ``force=true``, so a SLURM
array can be resubmitted as a whole. A killed run resumes from its last finished epoch.

Methods are presets of config fields (:mod:`pipeline.finetune_config`); the loop is
:mod:`pipeline.finetune_loop`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipeline/finetune.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_config_args
from pipeline.finetune_config import (  # noqa: F401  (public API of the stage)
    INIT_PRESETS,
    METHOD_PRESETS,
    METHODS,
    EvalConfig,
    FinetuneConfig,
    FinetuneOptimConfig,
    load_finetune_config,
)
from pipeline.finetune_loop import check_shots, preflight, run  # noqa: F401  (public API of the stage)


def parse(argv: list[str]) -> FinetuneConfig:
    path, overrides = parse_config_args(argv, "python -m pipeline.finetune", __doc__.splitlines()[0],
                                        "FinetuneConfig")
    return load_finetune_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(argv)
    out = run(cfg)
    if not out.get("skipped"):
        parts = [f"{s} {out[s]['accuracy']:.2f}" for s in cfg.eval.subsets if s in out]
        if "hm" in out:
            parts.append(f"HM {out['hm']:.2f}")
        print(f"finetune: {cfg.data.dataset} {cfg.label} seed {cfg.seed}: {', '.join(parts)}; "
              f"results {cfg.run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
