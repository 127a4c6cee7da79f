"""Stage-1 inputs of the digits demo: digits shards and backbone, their features and clustering.

``python -m pipeline.pretrain`` with no arguments calls :func:`prepare_pretrain_demo`, which builds what
is missing (each step is cached and idempotent) and returns the arguments of the demo run. Paths are
relative to the working directory (run from the repository root): ``cache/demo`` and ``runs/demo``.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import cluster, extract
from pipeline.config import load_config
from pipeline.digits_demo.data import DemoConfig, build_demo
from pipeline.distributed import launcher_rank
from pipeline.fileio import atomic_write_text

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
READY = Path("runs/demo/.inputs-ready")


def build_pretrain_inputs() -> dict:
    """Digits data + demo backbone (open_clip_train), frozen features, clusters; returns the paths."""
    info = build_demo(DemoConfig())
    urls = info["shards"]
    ext = load_config(extract.ExtractConfig, CONFIGS / "extract" / "demo.yaml", [f"urls={urls}"])
    report = extract.run(ext)
    print(f"demo: features {report}")
    clusters = load_config(cluster.ClusterConfig, CONFIGS / "cluster" / "demo.yaml")
    if not (Path(clusters.out_dir) / "concepts.json").exists() or report["extracted"]:
        cluster.main(["--config", str(CONFIGS / "cluster" / "demo.yaml")])
    return {"urls": urls, "backbone": info["backbone"], "zero_shot_top1": info["zero_shot_top1"]}


def prepare_pretrain_demo(config: Path, timeout_s: float = 1800.0) -> list[str]:
    """Arguments of the demo pretraining run; rank 0 builds the inputs, other ranks wait for them."""
    rank = launcher_rank()
    if rank == 0:
        READY.unlink(missing_ok=True)
        info = build_pretrain_inputs()
        atomic_write_text(READY, info["urls"])  # other ranks poll for it: never let them read it half written
    else:
        deadline = time.time() + timeout_s
        while not READY.exists():
            if time.time() > deadline:
                raise TimeoutError(f"rank {rank}: demo inputs not ready after {timeout_s:.0f} s ({READY})")
            time.sleep(1.0)
    return ["--config", str(config), f"data.urls={READY.read_text().strip()}"]
