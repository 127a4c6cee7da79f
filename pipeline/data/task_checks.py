"""Start-up checks of stage 1's task data: shards, clustering and episode settings agree.

Run by :func:`pipeline.pretrain.preflight` before anything is built, because a task that can never be
formed (too few concepts, no assignments for these shards) would otherwise keep the episode sampler
waiting for samples that never come.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.episodes import EpisodeConfig, check_task_widths
from pipeline.data.features import shard_stem
from pipeline.data.sources import check_shard_urls
from pipeline.data.task_stream import TaskDataConfig
from pipeline.inputs import require_dir, require_file


def check_task_data(data: TaskDataConfig, ep: EpisodeConfig) -> None:
    """The shards of ``data.urls`` exist, have concept assignments, and their clustering can give
    ``episodes.n_way``-way tasks (and cross-domain queries when ``episodes.p_cross_domain > 0``).

    Counts come from ``concepts.json``; when ``data.urls`` covers other shards than the assignment
    files (a subset of the clustered data), they are recounted from those shards' assignment files,
    because the sampler only ever sees those. A concept is usable with ``k_shot + q_query`` samples;
    concepts of one domain sharing a name count once (a task's class names must differ).
    """
    urls = check_shard_urls(data.urls, "data.urls")
    clusters = require_dir(data.clusters_dir, "data.clusters_dir", "run `pipeline cluster` first")
    concepts_file = require_file(clusters / "concepts.json", "data.clusters_dir",
                                 "it is written by `pipeline cluster` (mode=all or mode=summarize)")
    try:
        meta = {int(c["id"]): (int(c["domain"]), str(c["name"]), int(c["size"]))
                for c in json.loads(concepts_file.read_text())}
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.clusters_dir: {concepts_file} is not a concepts file of `pipeline cluster` "
                          f"({type(e).__name__}: {e})") from None
    assign = clusters / "assign"
    stems = sorted({shard_stem(u) for u in urls})
    on_disk = {p.stem for p in assign.glob("*.npz")}  # one listing, not a stat per shard
    have = [s for s in stems if s in on_disk]
    if not have:
        raise ConfigError(
            f"data.clusters_dir={clusters}: none of the {len(stems)} shards of data.urls has an assignment file "
            f"(looked for {assign / (stems[0] + '.npz')}), so no sample has a concept and no task could ever be "
            "formed; run `pipeline cluster` on these shards' features or point data.clusters_dir at their clustering")
    if len(have) < len(stems):
        warnings.warn(f"data.clusters_dir: {len(stems) - len(have)} of {len(stems)} shards have no assignment file "
                      f"in {assign}; their samples are skipped as unassigned", stacklevel=2)
    sizes, where = {c: m[2] for c, m in meta.items()}, f"sizes in {concepts_file}"
    if set(have) != on_disk:
        sizes, where = _count_assignments(assign, have), f"assignments of the {len(have)} shards of data.urls"
    need, names = ep.k_shot + ep.q_query, defaultdict(set)
    for c, (domain, name, _) in meta.items():
        if sizes.get(c, 0) >= need:
            names[domain].add(name)
    # a task's class names must differ, so concepts of one domain sharing a name count once
    check_task_widths({d: len(v) for d, v in names.items()}, ep, f"each name counted once per domain; {where}")


def _count_assignments(assign: Path, stems: list[str]) -> Counter:
    """Samples per concept over the assignment files of ``stems`` (one small array per file)."""
    sizes: Counter = Counter()
    for stem in stems:
        path = assign / f"{stem}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                ids, counts = np.unique(z["concept"], return_counts=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"data.clusters_dir: {path} is not an assignment file of `pipeline cluster` ({e})") from None
        sizes.update({int(i): int(n) for i, n in zip(ids, counts)})
    return sizes
