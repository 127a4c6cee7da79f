"""``pipeline <command> [args]``: one entry point dispatching to the stage modules' ``main(argv)``.

Commands are listed explicitly (no registration by import side effects); each module is imported
only when its command runs, so ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.config import ConfigError, run_main

COMMANDS: dict[str, tuple[str, str]] = {
    "write-shards": ("pipeline.data.shard_writer", "pack images + captions into webdataset shards"),
    "demo-data": ("pipeline.digits_demo.data", "build the bundled digits demo data and backbone"),
    "extract": ("pipeline.extract", "embed shards with the frozen backbone (one feature file per shard)"),
    "cluster": ("pipeline.cluster", "cluster features into domains and concepts; assign every shard"),
    "pretrain": ("pipeline.pretrain", "stage-1 meta-pretraining (one process; use accelerate launch for more)"),
    "finetune": ("pipeline.finetune", "stage-2 few-shot ProMetaR / IVLP / CoOp / zero-shot run, then evaluation"),
    "evaluate": ("pipeline.evaluate", "re-evaluate a saved stage-2 run (base/new/HM, other datasets)"),
    "report": ("pipeline.report", "aggregate a tree of runs into report.md, report.csv and plots"),
    "demo-e2e": ("pipeline.digits_demo.run", "the end-to-end digits demo: stage 1, 5 methods x 3 seeds, report"),
}


# The config dataclass of each folder under configs/ ("module:Class", imported on use so that
# `pipeline --help` does not import torch). The schemas live with the stages they configure.
SCHEMAS: dict[str, str] = {
    "model": "pipeline.config:ModelConfig",
    "cluster": "pipeline.cluster:ClusterConfig",
    "extract": "pipeline.extract:ExtractConfig",
    "pretrain": "pipeline.pretrain_config:PretrainConfig",
    "finetune": "pipeline.finetune_config:FinetuneConfig",
}


def schema_for(folder: str) -> type:
    """The config dataclass for YAMLs under ``configs/<folder>/``."""
    if folder not in SCHEMAS:
        raise ConfigError(f"configs/{folder}: no schema registered in pipeline.cli.SCHEMAS")
    module, name = SCHEMAS[folder].split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    """``pipeline <command> [args]``: the command's ``main(args)``, run as a command line (the console
    script's entry point): a user error, e.g. a :class:`ConfigError`, is one line ``error: ...`` on stderr
    and exit status 2 (:func:`pipeline.config.run_main`); other exceptions keep their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pipeline <command> [args...]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<14} {doc}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pipeline: unknown command {name!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
