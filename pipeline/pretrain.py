"""Stage 1: GRAM-style distributed meta-pretraining of prompts and a gradient regulator.

    accelerate launch pipeline/pretrain.py --config configs/pretrain/<x>.yaml key=value ...
    python -m pipeline.pretrain ...            # one process
    python -m pipeline.pretrain                # no arguments: the bundled digits demo

Each outer step takes ``tasks_per_step`` tasks (support/query episodes from the concept clustering),
split over ranks by task slot; every rank computes its tasks' meta-gradients w.r.t. the initial prompts
and the regulator, the gradients are averaged over tasks and ranks with one flat all-reduce, and every
rank takes the same AdamW step (docs/ARCHITECTURE.md section 7). Checkpoints are atomic and resumable; SIGTERM or
SIGUSR1 saves one and exits 0 for a SLURM requeue. The result is an artifact (prompts + regulator +
metadata) that stage 2 starts from.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/pretrain.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import pretrain_loop
from pipeline.config import load_config, parse_config_args, to_dict
from pipeline.pretrain_config import CheckpointConfig, OptimConfig, PretrainConfig  # noqa: F401  (public API)
from pipeline.pretrain_loop import lr_lambda, preflight  # noqa: F401  (public API)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml"


def parse(argv: list[str]) -> PretrainConfig:
    path, overrides = parse_config_args(argv, "pipeline.pretrain", __doc__.splitlines()[0], "PretrainConfig")
    return load_config(PretrainConfig, path, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # our users' first command: say what runs and how to run something else
        from pipeline.digits_demo.inputs import prepare_pretrain_demo

        print(f"pretrain: no arguments given, so running the bundled digits demo with --config {DEMO_CONFIG} "
              "(pass --config <yaml> [key=value ...] to run your own; see configs/pretrain/)", flush=True)
        argv = prepare_pretrain_demo(DEMO_CONFIG)
    cfg = parse(argv)
    preflight(cfg)
    result = pretrain_loop.train(cfg, to_dict(cfg))
    if result["status"] == "done":
        print(f"pretrain: {result['step']} steps, {result['nonfinite_steps']} skipped (non-finite); artifact "
              f"{cfg.artifact or Path(cfg.run_dir) / 'artifact.pt'}; metrics {Path(cfg.run_dir) / 'metrics.jsonl'}")
    else:
        print(f"pretrain: {result['status']} at step {result['step']}; rerun the same command to resume")
    return 0 if result["status"] in ("done", "preempted") else 1


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
