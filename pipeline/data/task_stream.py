"""Streams of stage-1 tasks: resampled shards -> raw samples -> per-concept buffers -> episodes.

Tasks are organised in *slots*: an outer step uses ``tasks_per_step`` tasks, task ``j`` comes from
slot ``j``'s stream, and rank ``r`` of ``W`` owns slots ``r, r + W, ...``. Each slot's stream is seeded
by ``(seed, data epoch, slot, worker)`` only, never by the rank, so the *global* set of tasks of a step
is the same whatever the number of ranks: one rank with 4 tasks per step computes exactly what two
ranks with 2 each compute (a tested property), and a resumed run rebuilds the same streams.

A data epoch is a fixed number of outer steps; streams are rebuilt (reseeded) at each epoch, so resuming
replays at most one epoch's worth of tasks to reach the saved position.
"""

from __future__ import annotations

import io
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import ConfigError
from pipeline.data.episodes import ConceptTable, Episode, EpisodeConfig, EpisodeSampler
from pipeline.data.shards import expand_sources, iter_tar_samples, source_weights


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
    epoch_steps: int = 100
    """Outer steps per data epoch (streams are reseeded at each epoch; resume replays < one epoch)."""

    def validate(self) -> None:
        if not self.urls:
            raise ConfigError("data.urls is empty: give the shards to build tasks from")
        if self.workers < 0 or self.shuffle_buffer < 0 or self.shuffle_initial < 0:
            raise ConfigError("data.workers, data.shuffle_buffer and data.shuffle_initial must be >= 0")
        if self.epoch_steps < 1:
            raise ConfigError(f"data.epoch_steps={self.epoch_steps} must be >= 1")
        expand_sources(self.urls)
        source_weights(self.weights, len(self.urls.split("::")))


class SlotStream(IterableDataset):
    """The episodes of one task slot for one data epoch (iterate through :func:`slot_loader`)."""

    def __init__(self, data: TaskDataConfig, episodes: EpisodeConfig, preprocess: Callable, seed: int,
                 epoch: int, slot: int):
        self.data, self.episodes, self.preprocess = data, episodes, preprocess
        self.seed, self.epoch, self.slot = seed, epoch, slot
        self.sources = expand_sources(data.urls)
        self.weights = source_weights(data.weights, len(self.sources))
        self.table = ConceptTable(data.clusters_dir, episodes.k_shot + episodes.q_query, episodes.assignment_cache)
        self.table.check(episodes)

    def _rng(self, worker: int, what: str) -> random.Random:
        return random.Random(f"{what}-{self.seed}-{self.epoch}-{self.slot}-{worker}")

    def _urls(self, worker: int, stats: Counter) -> Iterator[str]:
        rng = self._rng(worker, "shards")
        limit = max(20, 3 * sum(len(s) for s in self.sources))
        while True:
            if stats["shards"] - stats["_shards_at_last_good"] > limit:
                raise RuntimeError(f"{limit} shards in a row gave no usable sample; check data.urls={self.data.urls!r}")
            yield rng.choice(rng.choices(self.sources, weights=self.weights, k=1)[0])

    def _raw(self, samples: Iterator[dict], stats: Counter) -> Iterator[dict]:
        """Raw samples with an image and a non-empty caption (bytes kept; decoded only when used)."""
        keys = [k.strip().lower() for k in self.data.image_keys.split(";") if k.strip()]
        for s in samples:
            ext = next((k for k in keys if k in s), None)
            caption = s.get(self.data.text_key, b"").decode("utf-8", errors="replace").strip()
            if ext is None or not caption:
                stats["missing_image" if ext is None else "missing_caption"] += 1
                continue
            stats["samples"] += 1
            stats["_shards_at_last_good"] = stats["shards"]
            yield {"key": s["__key__"], "url": s["__url__"], "image": s[ext]}

    def _decode(self, raw: bytes, rng: random.Random):
        # torchvision's random crops draw from the global torch RNG, whose state depends on what else the
        # process did; a per-stream seed per image keeps the views identical for any rank layout
        with Image.open(io.BytesIO(raw)) as im, torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            return self.preprocess(im.convert("RGB"))

    def __iter__(self) -> Iterator[tuple[Episode, dict]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stats: Counter = Counter()
        stages = [lambda: self._urls(worker, stats), lambda src: iter_tar_samples(src, stats)]
        if self.data.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.data.shuffle_buffer, self.data.shuffle_initial,
                                      rng=self._rng(worker, "samples")))
        stages.append(lambda src: self._raw(src, stats))
        seed = int(self._rng(worker, "episodes").getrandbits(63))
        views = self._rng(worker, "views")
        sampler = EpisodeSampler(self.table, self.episodes, seed, decode=lambda raw: self._decode(raw, views))
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for episode in sampler(iter(wds.DataPipeline(*stages))):
                counts = {k: v for k, v in stats.items() if not k.startswith("_")}
                counts.update(unassigned=sampler.unassigned, bad_image=sampler.bad_images, worker=worker)
                yield episode, counts


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
