"""A tiny fake downstream dataset in the CoOp layout (OxfordPets' folder and split-file names)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_coop_dataset(root: Path, n_classes: int = 5, per_split: dict | None = None, size: int = 32) -> Path:
    """``root/oxford_pets/{images/, split_zhou_OxfordPets.json}``; class ``y`` is named ``kind_y``, its
    images share a colour. Returns ``root`` (the ``data.root`` of a FewShotConfig)."""
    per_split = per_split or {"train": 4, "val": 2, "test": 3}
    d = root / "oxford_pets"
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (n_classes, 3))
    split = {s: [] for s in per_split}
    for y in range(n_classes):
        for s, n in per_split.items():
            for j in range(n):
                rel = f"kind_{y}/{s}_{j}.png"
                (d / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                pixels = np.clip(colours[y] + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / "images" / rel)
                split[s].append([rel, y, f"kind_{y}"])
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def finetune_overrides(root: Path, run_root: Path, extra: tuple = ()) -> list[str]:
    """Dotted overrides for a seconds-long stage-2 run on the tiny random backbone."""
    return [
        f"run_root={run_root}", "data.dataset=OxfordPets", f"data.root={root}", f"data.shot_cache_dir={run_root}/shots",
        "data.k_shot=2", "model.backbone.arch=tiny-vit-s", "model.backbone.pretrained=",
        "model.prompts.depth_text=2", "model.prompts.depth_vision=2", "regulator.hidden=16", "optim.epochs=1",
        "optim.batch_size=4", "tracking.wandb_mode=disabled", "tracking.log_every=1", "cpu=true", "threads=1",
        "eval.batch_size=16", *extra,
    ]
