"""Streams of stage-1 tasks: resampled shards -> raw samples -> per-concept buffers -> episodes.

Tasks are organised in *slots*: an outer step uses ``tasks_per_step`` tasks, task ``j`` comes from
slot ``j``'s stream, and rank ``r`` of ``W`` owns slots ``r, r + W, ...``. Each slot's stream is seeded
by ``(seed, data epoch, slot, worker)`` only, never by the rank, so the *global* set of tasks of a step
is the same whatever the number of ranks: one rank with 4 tasks per step computes exactly what two
ranks with 2 each compute (a tested property), and a resumed run rebuilds the same streams.
The shards are drawn, read and shuffled by a :class:`~pipeline.data.sources.ShardSource`, the same
source the image-text reader uses, with the slot in place of the rank in its seed.

A data epoch is a fixed number of outer steps; streams are rebuilt (reseeded) at each epoch, so resuming
replays at most one epoch's worth of tasks to reach the saved position.

Bad data is skipped and counted with the reader's counters (:data:`COUNTERS`, same meaning as in
:mod:`pipeline.data.shards`): a sample is checked when it is read (image and caption present, caption
valid UTF-8 and not blank, image header readable and within ``max_image_pixels``) and its pixels are
decoded only when a task uses it; an image that fails then is dropped from its buffer and counted as
``bad_image`` too. A stream that can never form a task raises :class:`~pipeline.data.shards.NoUsableData`
instead of waiting forever: when too many shard openings in a row give no usable sample, and when
:func:`task_watchdog` openings pass without a task (e.g. every image undecodable, clusters from other
shards, or the only domain able to give cross-domain queries is unreadable).

Labels are bound to content: each sample carries its content digest, and a sample whose digest differs
from the one recorded in its shard's assignment file raises
:class:`~pipeline.data.features.ContentMismatch` naming the shard, at the first sample of that shard
(the start-up check :func:`pipeline.data.task_checks.check_task_data` spot-checks shards before
training; this is the check that covers every shard).
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import ConfigError
from pipeline.data.episodes import ConceptTable, Episode, EpisodeConfig, EpisodeSampler
from pipeline.data.sample_checks import (
    SKIP_REASONS,
    NoUsableData,
    StreamHealth,
    check_sample,
    checked_image,
    open_image,
    sample_digest,
)
from pipeline.data.sources import ShardSource, StreamSeed, expand_sources, source_weights

COUNTERS = ("samples", "shards", *SKIP_REASONS, "unassigned")
"""Every counter a slot stream reports with its episodes (running totals of the emitting worker)."""


@dataclass(frozen=True)
class TaskDataConfig:
    """Where stage-1 tasks come from: the shards and their concept clustering."""

    urls: str = ""
    """Shard URLs with brace expansion (``::`` separates sources); the same shards that were extracted."""
    weights: str = ""
    """Sampling weight per ``::`` source, e.g. ``3::1``; empty = equal."""
    clusters_dir: str = "runs/clusters"
    """Output folder of ``pipeline cluster`` (``concepts.json`` and ``assign/``)."""
    workers: int = 1
    """DataLoader workers per task slot (decoding runs there)."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer before the per-concept buffers."""
    shuffle_initial: int = 100
    """Samples collected before the shuffle buffer starts emitting."""
    image_keys: str = "jpg;jpeg;png;webp"
    """File extensions tried, in order, for a sample's image."""
    text_key: str = "txt"
    """File extension of the caption (samples without a caption are skipped and counted)."""
    max_image_pixels: int = 89_478_485
    """Images whose header declares more pixels are skipped (``oversized_image``) without being decoded;
    0 = no own limit (PIL's decompression-bomb error still applies). See ``ShardDataConfig``."""
    max_member_bytes: int = 128 * 2**20
    """Larger tar members are skipped unread (``oversized_member``); 0 = no limit. See ``ShardDataConfig``."""
    epoch_steps: int = 100
    """Outer steps per data epoch (streams are reseeded at each epoch; resume replays < one epoch)."""

    def validate(self) -> None:
        if not self.urls:
            raise ConfigError("data.urls is empty: give the shards to build tasks from")
        if self.workers < 0 or self.shuffle_buffer < 0 or self.shuffle_initial < 0:
            raise ConfigError("data.workers, data.shuffle_buffer and data.shuffle_initial must be >= 0")
        if self.epoch_steps < 1:
            raise ConfigError(f"data.epoch_steps={self.epoch_steps} must be >= 1")
        if self.max_image_pixels < 0:
            raise ConfigError(f"data.max_image_pixels={self.max_image_pixels} must be >= 0")
        if self.max_member_bytes < 0:
            raise ConfigError(f"data.max_member_bytes={self.max_member_bytes} must be >= 0")
        expand_sources(self.urls)
        source_weights(self.weights, len(self.urls.split("::")))


class SlotStream(IterableDataset):
    """The episodes of one task slot for one data epoch (iterate through :func:`slot_loader`)."""

    def __init__(self, data: TaskDataConfig, episodes: EpisodeConfig, preprocess: Callable, seed: int,
                 epoch: int, slot: int):
        self.data, self.episodes, self.preprocess = data, episodes, preprocess
        self.seed, self.epoch, self.slot = seed, epoch, slot
        self.source = ShardSource(data.urls, data.weights, data.image_keys, data.shuffle_buffer,
                                  data.shuffle_initial, data.max_member_bytes)
        self.table = ConceptTable(data.clusters_dir, episodes.k_shot + episodes.q_query, episodes.assignment_cache)
        self.table.check(episodes)

    def _watch(self, stats: Counter, sampler: EpisodeSampler) -> Callable[[], None]:
        """The slot's own give-up rule, run before each shard opening: too many openings without a task."""
        watchdog = task_watchdog(self.source.sources, self.data.shuffle_buffer)

        def check() -> None:
            idle = stats["shards"] - stats["_open_at_task"]
            if idle >= watchdog:
                raise NoUsableData(self._no_task_message(idle, stats, sampler))
        return check

    def _no_task_message(self, idle: int, stats: Counter, sampler: EpisodeSampler) -> str:
        counts = {k: v for k, v in self._counts(stats, sampler).items() if v}
        hint = ""
        if stats["samples"] and sampler.unassigned == stats["samples"]:
            hint = (f"; no sample read has a concept in {self.data.clusters_dir}/assign: were the clusters made "
                    "from these shards?")
        return (f"no task could be formed in the last {idle} shards opened (counts: {counts}); "
                f"{sampler.readiness()}{hint}; check data.urls={self.data.urls!r}, data.clusters_dir and episodes.*")

    def _raw(self, samples: Iterator[dict], stats: Counter, health: StreamHealth) -> Iterator[dict]:
        """Checked raw samples (bytes kept; pixels decoded only when a task uses them)."""
        for s in samples:
            checked = check_sample(s, self.source.image_keys, self.data.text_key, stats)
            # reading the header costs microseconds and keeps bytes that are no image (or a bomb) out of
            # the buffers; truncated pixel data still shows only when the image is decoded for a task
            if checked is not None and checked_image(s[checked[0]], self.data.max_image_pixels, stats,
                                                     header_only=True) is None:
                checked = None
            health.sample(s, checked is not None)
            if checked is None:
                continue
            stats["samples"] += 1
            ext, caption = checked
            # the content digest binds the sample to its assignment (a clustering of another shard set with
            # the same file names and keys is refused, not used): docs/ARCHITECTURE.md section 4
            yield {"key": s["__key__"], "url": s["__url__"], "image": s[ext],
                   "digest": sample_digest(caption, len(s[ext]))}

    def _decode(self, raw: bytes, rng: random.Random):
        # torchvision's random crops draw from the global torch RNG, whose state depends on what else the
        # process did; a per-stream seed per image keeps the views identical for any rank layout
        # (the CPU generator only: torch.manual_seed also queues a seed for every lazy accelerator backend,
        # formatting a stack trace each time, which cost a third of the data path's CPU time)
        with open_image(raw, self.data.max_image_pixels) as im, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(rng.getrandbits(63))
            return self.preprocess(im.convert("RGB"))

    @staticmethod
    def _counts(stats: Counter, sampler: EpisodeSampler) -> dict[str, int]:
        counts = {k: stats.get(k, 0) for k in COUNTERS}
        counts["unassigned"] = sampler.unassigned
        counts["bad_image"] += sampler.bad_images  # read-time (header) + use-time (pixels) failures
        return counts

    def __iter__(self) -> Iterator[tuple[Episode, dict]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stats: Counter = Counter()
        health = self.source.health(stats)
        seed = StreamSeed(self.seed, self.epoch, self.slot, worker)  # never the rank: see the module docstring
        views = seed.rng("views")
        sampler = EpisodeSampler(self.table, self.episodes, int(seed.rng("episodes").getrandbits(63)),
                                 decode=lambda raw: self._decode(raw, views))
        raw = self.source.samples(self.source.resampled(seed, health, self._watch(stats, sampler)), stats, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for episode in sampler(self._raw(raw, stats, health)):
                stats["_open_at_task"] = stats["shards"]
                yield episode, {**self._counts(stats, sampler), "worker": worker}


def task_watchdog(sources: list[list[str]], shuffle_buffer: int = 0) -> int:
    """Shard openings without a new task after which a slot stream gives up.

    Ten times the shards (at least 100) is far more than any reachable task needs: ten draws per shard
    leave a given shard unread with probability e^-10. ``shuffle_buffer`` is added because the buffer
    fills before the sampler sees a sample, which takes up to one opening per buffered sample with tiny
    shards. An impossible stream still fails within seconds on small data.
    """
    return max(100, 10 * sum(len(s) for s in sources)) + shuffle_buffer


def slot_loader(data: TaskDataConfig, episodes: EpisodeConfig, preprocess: Callable, seed: int, epoch: int,
                slot: int) -> Iterator[tuple[Episode, dict]]:
    """Endless iterator of ``(episode, counters)`` for one slot and data epoch.

    Workers are dealt episodes round-robin by the DataLoader, which keeps the order deterministic for a
    fixed worker count. The counters are the emitting worker's running totals.
    """
    dataset = SlotStream(data, episodes, preprocess, seed, epoch, slot)
    if data.workers == 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=data.workers, persistent_workers=False)
    return iter(loader)
