"""Start-up checks of stage 1's task data: shards, clustering and episode settings agree.

Run by :func:`pipeline.pretrain.preflight` before anything is built, because a task that can never be
formed (too few concepts, no assignments for these shards) would otherwise keep the episode sampler
waiting for samples that never come, and a clustering of other shards with the same file names and keys
would label every sample wrongly.

Content binding (docs/ARCHITECTURE.md section 4): the assignment files opened here must carry a content
fingerprint (files written before fingerprints are refused) and a spot check compares the first samples
of up to :data:`SPOT_CHECK_SHARDS` local shards, evenly spread over ``data.urls``, with their assignments.
Without a recount only :data:`SPOT_CHECK_SHARDS` assignment files are opened. Reading every shard (or
every assignment file) here would cost a pass over the whole data set on every rank before training;
the stream checks every file when it opens it and every sample when it reads it
(:meth:`pipeline.data.episodes.ConceptTable.concept_of`), so a mismatching or unbound shard the spot
check did not read still stops the run, naming the shard, before any of its labels is used.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.episodes import EpisodeConfig, assignment_table, check_task_widths, mismatch_message
from pipeline.data.features import ContentMismatch, shard_stem
from pipeline.data.sources import check_shard_urls, is_local, read_sample_digests, some_names
from pipeline.data.task_stream import TaskDataConfig
from pipeline.inputs import require_dir, require_file

SPOT_CHECK_SHARDS = 64
"""Local shards whose first samples the start-up check compares with their assignments."""
SPOT_CHECK_SAMPLES = 16
"""Raw samples read from the start of each spot-checked shard (the first image members only)."""


def check_task_data(data: TaskDataConfig, ep: EpisodeConfig) -> None:
    """The shards of ``data.urls`` exist, have concept assignments, and their clustering can give
    ``episodes.n_way``-way tasks (and cross-domain queries when ``episodes.p_cross_domain > 0``).

    Counts come from ``concepts.json``; when ``data.urls`` covers other shards than the assignment
    files (a subset of the clustered data), they are recounted from those shards' assignment files,
    because the sampler only ever sees those. A concept is usable with ``k_shot + q_query`` samples;
    concepts of one domain sharing a name count once (a task's class names must differ).

    The clustering must belong to these shards' content (see the module docstring): assignment files
    without a content fingerprint and shards whose first samples differ from the ones the clustering was
    computed from raise :class:`~pipeline.data.features.ContentMismatch` naming the file or shard.
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
        lacking = [s for s in stems if s not in on_disk]
        warnings.warn(f"data.clusters_dir: {len(lacking)} of {len(stems)} shards have no assignment file in {assign} "
                      f"({some_names(lacking)}); their samples are skipped as unassigned", stacklevel=2)
    recount = set(have) != on_disk
    # every file opened here must carry a content fingerprint; without a recount only an even spread of
    # them is opened, so the cost stays bounded at any scale (the stream checks each file it opens)
    counted = _read_assignments(assign, have if recount else spread(have, SPOT_CHECK_SHARDS), recount)
    sizes, where = {c: m[2] for c, m in meta.items()}, f"sizes in {concepts_file}"
    if recount:
        sizes, where = counted, f"assignments of the {len(have)} shards of data.urls"
    spot_check_content(data, urls, assign, have)
    need, names = ep.k_shot + ep.q_query, defaultdict(set)
    for c, (domain, name, _) in meta.items():
        if sizes.get(c, 0) >= need:
            names[domain].add(name)
    # a task's class names must differ, so concepts of one domain sharing a name count once
    check_task_widths({d: len(v) for d, v in names.items()}, ep, f"each name counted once per domain; {where}")


def _read_assignments(assign: Path, stems: list[str], count: bool) -> Counter:
    """Check that each assignment file of ``stems`` is one and carries a content fingerprint; with ``count``,
    samples per concept over them (one small array per file).

    Unreadable files are reported first, then every file written before fingerprints in one error (the
    first few by name and a count).
    """
    sizes: Counter = Counter()
    stale = []
    for stem in stems:
        path = assign / f"{stem}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                if "fingerprint" not in z.files or "digest" not in z.files:
                    stale.append(path.name)
                if count:
                    ids, counts = np.unique(z["concept"], return_counts=True)
                    sizes.update({int(i): int(n) for i, n in zip(ids, counts)})
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"data.clusters_dir: {path} is not an assignment file of `pipeline cluster` ({e})") from None
    if stale:
        raise ContentMismatch(
            f"data.clusters_dir: {len(stale)} of the {len(stems)} assignment files of data.urls read in {assign} "
            f"were written before content fingerprints ({some_names(stale)}), so their labels cannot be checked "
            "against the shards; re-run `pipeline extract` (it redoes such feature files) and `pipeline cluster`")
    return sizes


def spread(items: list[str], n: int) -> list[str]:
    """At most ``n`` of ``items``, evenly spread over the list with the first and the last included."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, n).round().astype(int).tolist()))]


def spot_check_content(data: TaskDataConfig, urls: list[str], assign: Path, have: list[str]) -> None:
    """Compare the first samples of up to :data:`SPOT_CHECK_SHARDS` local shards (evenly spread) with
    their assignments; raise :class:`~pipeline.data.features.ContentMismatch` naming the first shard
    whose samples are not the ones the clustering was computed from. Remote shards are left to the stream.
    """
    url_of: dict[str, str] = {}
    for u in urls:
        if is_local(u):
            url_of.setdefault(shard_stem(u), u)
    local = spread([s for s in have if s in url_of], SPOT_CHECK_SHARDS)
    image_keys = tuple(k.strip().lower() for k in data.image_keys.split(";") if k.strip())
    for stem in local:
        url, path = url_of[stem], assign / f"{stem}.npz"
        if not Path(url).is_file():  # missing shards were warned about by check_shard_urls
            continue
        digests = read_sample_digests(url, image_keys, data.text_key, SPOT_CHECK_SAMPLES, data.max_member_bytes)
        table = assignment_table(path, url)
        for key, digest in digests.items():
            if key in table and table[key][1] != digest:
                raise ContentMismatch(mismatch_message(url, key, path))
