"""Small stage-1 task data for tests: generated shards plus a planted concept clustering."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.features import Assignments, write_assignments
from pipeline.data.shard_writer import Pair, write_shards
from pipeline.data.sources import read_sample_digests

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""The readers' default image extensions (``TaskDataConfig.image_keys``)."""


def content_digests(shard: str | Path, image_keys: tuple[str, ...] = IMAGE_KEYS, text_key: str = "txt") -> dict[str, int]:
    """Key -> content digest of every sample of a local shard that the readers' checks keep: what
    ``pipeline extract`` records for the samples it embeds, computed without a backbone."""
    return read_sample_digests(str(shard), image_keys, text_key)


def plant_assignments(shard: str | Path, path: str | Path, concept_of: Mapping[str, int],
                      domain_of: Mapping[int, int] | None = None) -> Path:
    """Write the assignment file ``path`` of ``shard`` labelling its samples by ``concept_of`` (key ->
    concept), with the content digests and fingerprint ``pipeline cluster`` would carry over from extraction.

    Keys the readers skip anyway (no caption, no image...) get digest 0: they are never looked up.
    """
    digests = content_digests(shard)
    keys = list(concept_of)
    concept = np.array([concept_of[k] for k in keys], dtype=np.int64)
    domain = np.array([(domain_of or {}).get(int(c), -1) for c in concept], dtype=np.int64)
    return write_assignments(path, Assignments(
        np.array(keys, dtype=object), np.full(len(keys), "", dtype=object), domain, concept,
        np.ones(len(keys), dtype=np.float32), np.array([digests.get(k, 0) for k in keys], dtype=np.uint64)))


def make_task_data(root: Path, domains: int = 2, concepts_per_domain: int = 3, per_concept: int = 8,
                   per_shard: int = 12, size: int = 20) -> dict:
    """Shards of coloured images whose concept is ``i % n_concepts``, and ``clusters/`` for them.

    Images of one concept share a base colour (plus noise), so prompts have something to learn.
    Returns ``{"urls", "clusters_dir", "n_samples"}``.
    """
    n_concepts = domains * concepts_per_domain
    n = n_concepts * per_concept
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (n_concepts, 3))
    pairs = []
    for i in range(n):
        c = i % n_concepts
        pixels = np.clip(colours[c] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        pairs.append(Pair(buf.getvalue(), f"a picture of thing {c} number {i}"))
    shards = root / "shards"
    report = write_shards(pairs, shards, per_shard, image_format="keep")
    clusters = root / "clusters"
    (clusters / "assign").mkdir(parents=True)
    concepts = [{"id": c, "domain": c // concepts_per_domain, "name": f"thing {c}", "size": per_concept,
                 "examples": []} for c in range(n_concepts)]
    (clusters / "concepts.json").write_text(json.dumps(concepts))
    for s in range(len(report.shards)):
        keys = [f"{i:09d}" for i in range(s * per_shard, min(n, (s + 1) * per_shard))]
        plant_assignments(shards / f"{s:06d}.tar", clusters / "assign" / f"{s:06d}.npz",
                          {k: int(k) % n_concepts for k in keys}, {c: c // concepts_per_domain for c in range(n_concepts)})
    return {"urls": str(shards / f"{{000000..{len(report.shards) - 1:06d}}}.tar"), "clusters_dir": str(clusters),
            "n_samples": n}


def pretrain_overrides(data: dict, run_dir: Path, steps: int = 4, tasks: int = 2, extra: tuple = ()) -> list[str]:
    """Dotted overrides for a seconds-long stage-1 run on the tiny backbone."""
    return [
        f"run_dir={run_dir}", f"data.urls={data['urls']}", f"data.clusters_dir={data['clusters_dir']}",
        "data.workers=0", "data.shuffle_buffer=16", "data.shuffle_initial=4", "data.epoch_steps=3",
        "model.backbone.arch=tiny-vit-s", "model.backbone.pretrained=", "model.prompts.depth_text=2",
        "model.prompts.depth_vision=2", "episodes.n_way=2", "episodes.k_shot=2", "episodes.q_query=2",
        "episodes.p_cross_domain=0.5", "episodes.buffer_per_concept=8", f"tasks_per_step={tasks}",
        f"optim.steps={steps}", "optim.warmup_steps=1", "optim.lr=0.01", "regulator.lr=0.01",
        "checkpoint.every=2", "tracking.wandb_mode=disabled", "tracking.log_every=1", "cpu=true",
        "regulator.hidden=16", *extra,
    ]
