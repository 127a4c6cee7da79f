"""Stream image-text pairs from webdataset shards into batches (docs/ARCHITECTURE.md sections 2, 7, 9).

Two modes, chosen by :attr:`ShardDataConfig.resampled`:

* **resampled** (training): every worker draws shards with replacement (sources picked by weight,
  then a shard uniformly inside the source) from its own seed ``(seed, epoch, rank, worker)``. An
  epoch is a sample count: each rank yields exactly ``ceil(epoch_samples / (batch_size *
  world_size))`` full batches, dealt out over its workers, so ranks never wait on each other.
* **single pass** (extraction, evaluation): the expanded shard list is split by rank
  (``shards[rank::world_size]``) and then by worker, so every readable sample is read exactly once
  over all ranks and workers. Balance needs ``#shards >= world_size * workers``; with fewer, some
  workers idle. Ranks may yield different batch counts here: each rank simply processes its shards.

Shard order, tar reading and the shuffle buffer are :class:`pipeline.data.sources.ShardSource`'s (shared
with the stage-1 task streams); this module checks and decodes the samples and batches them.

Ranks are explicit arguments (a separate module maps launcher variables to ranks); the loader is a
plain ``torch.utils.data.DataLoader`` that must *not* go through ``accelerator.prepare`` (it would
split the stream a second time).

Bad data never stops the stream; each skip is counted under one of :data:`SKIP_REASONS`
(the checks themselves are in :mod:`pipeline.data.sample_checks`):

* ``missing_image`` / ``missing_caption``: the sample has no member with an image key / the text key;
* ``bad_image``: the image bytes do not decode (corrupt, truncated, zero bytes, not an image). The
  extension is not trusted: PIL detects the format from the bytes, so PNG bytes named ``.jpg`` decode;
* ``oversized_image``: width x height above :attr:`ShardDataConfig.max_image_pixels` (or PIL's own
  decompression-bomb limit), read from the image header, so the pixels are never decoded;
* ``oversized_member``: a tar member above :attr:`ShardDataConfig.max_member_bytes`, skipped unread (a
  multi-gigabyte member never reaches memory);
* ``empty_caption``: the caption is empty or blank (a zero-byte ``.txt`` included);
* ``bad_caption``: the caption is not valid UTF-8. Policy: such samples are *skipped*, not decoded
  with replacement characters, so mojibake never reaches the tokenizer or a concept name; a UTF-8
  byte-order mark is accepted and dropped;
* ``bad_shard``: a shard that cannot be opened, is not a tar (a 0-byte file included) or ends early
  (truncated) is skipped from that point with a warning; its samples completed before the break are
  kept. A valid tar with no members is simply empty (counted in ``shards`` only). Each worker's stream
  names the first few bad shards and then only counts them (:class:`~pipeline.data.sources.ShardWarnings`).

Data that can never deliver fails fast with :class:`NoUsableData` instead of streaming nothing: a
single pass that found no usable sample in any of its shards raises at its end (unless
:attr:`ShardDataConfig.allow_empty`), and a resampled (endless) stream raises once too many shard
opens in a row gave nothing usable (see :class:`StreamHealth`). In single-pass mode over several
ranks each rank checks its own shards.

**Counting across worker processes**: each worker keeps its own counters and attaches a snapshot of
them to every batch it emits, plus one final stats-only item when its stream ends (the loader consumes
that item, it never reaches the caller). The main process keeps the latest snapshot per worker, so
:attr:`ShardLoader.stats` is exact at the end of an epoch and at most one batch behind during it, with
no shared memory or locks.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.config import ShardDataConfig, validate_shard_data
from pipeline.data.sample_checks import (  # noqa: F401  (NoUsableData, SKIP_REASONS: part of this module's API)
    SKIP_REASONS,
    NoUsableData,
    StreamHealth,
    check_sample,
    checked_image,
    public_counts,
)
from pipeline.data.sources import NAMED, ShardSource, StreamSeed

_STATS, _WORKER, _FINAL = "__stats__", "__worker__", "__final__"


def decode_samples(samples: Iterator[dict], stats: Counter, image_keys: tuple[str, ...], text_key: str,
                   preprocess: Callable | None, max_pixels: int = 0,
                   health: StreamHealth | None = None) -> Iterator[dict]:
    """Raw samples -> ``{"image", "caption", "key", "url", "meta", "nbytes"}``; bad ones skipped and counted.

    ``nbytes`` is the byte size of the image member used (what a content digest is computed from:
    :func:`pipeline.data.sample_checks.sample_digest`).

    ``max_pixels`` is :attr:`ShardDataConfig.max_image_pixels`; ``health`` (resampled mode) sees
    every checked sample and stops a stream in which nothing is usable.
    """
    for s in samples:
        out = _decode_one(s, stats, image_keys, text_key, max_pixels)
        if health is not None:
            health.sample(s, out is not None)
        if out is not None:
            out["image"] = preprocess(out["image"]) if preprocess is not None else out["image"]
            yield out


def _decode_one(s: dict, stats: Counter, image_keys: tuple[str, ...], text_key: str,
                max_pixels: int) -> dict | None:
    checked = check_sample(s, image_keys, text_key, stats)
    if checked is None:
        return None
    ext, caption = checked
    image = checked_image(s[ext], max_pixels, stats)
    if image is None:
        return None
    try:
        meta = json.loads(s["json"]) if "json" in s else {}
    except ValueError:  # UnicodeDecodeError included
        meta = {}  # metadata is optional; a broken json must not cost the pair
    stats["samples"] += 1
    return {"image": image, "caption": caption, "key": s["__key__"], "url": s["__url__"], "meta": meta,
            "nbytes": len(s[ext])}


def _collate(samples: list[dict], tokenizer: Callable | None) -> dict:
    images = [s["image"] for s in samples]
    batch = {k: [s[k] for s in samples] for k in ("caption", "key", "url", "meta", "nbytes")}
    batch["image"] = torch.stack(images) if isinstance(images[0], torch.Tensor) else images  # [B, 3, H, W]
    if tokenizer is not None:
        batch["text"] = tokenizer(batch["caption"])  # [B, context_length] token ids
    return batch


class ShardStream(IterableDataset):
    """The per-worker webdataset pipeline; iterate it through :class:`ShardLoader`."""

    def __init__(self, cfg: ShardDataConfig, rank: int, world_size: int, preprocess=None, tokenizer=None,
                 shard_warnings: int = NAMED):
        validate_shard_data(cfg, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, {world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.source = ShardSource(cfg.urls, cfg.weights, cfg.image_keys, cfg.shuffle_buffer, cfg.shuffle_initial,
                                  cfg.max_member_bytes, shard_warnings)
        self.epoch = 0
        self.batches_per_rank = (math.ceil(cfg.epoch_samples / (cfg.batch_size * world_size))
                                 if cfg.resampled else None)

    def _n_batches(self, worker: int, n_workers: int) -> int | None:
        if self.batches_per_rank is None:
            return None
        # deal the rank's batches out so lower worker ids take the remainder; totals match exactly
        return self.batches_per_rank // n_workers + (worker < self.batches_per_rank % n_workers)

    def _batches(self, samples: Iterator[dict], n_batches: int | None) -> Iterator[dict]:
        if n_batches == 0:
            return
        buf, done = [], 0
        for s in samples:
            buf.append(s)
            if len(buf) == self.cfg.batch_size:
                yield _collate(buf, self.tokenizer)
                buf, done = [], done + 1
                if n_batches is not None and done >= n_batches:
                    return
        if buf and not self.cfg.drop_last:
            yield _collate(buf, self.tokenizer)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats: Counter = Counter()  # fresh per pass: this process's share of the counts
        seed = StreamSeed(self.cfg.seed, self.epoch, self.rank, worker)
        # a single pass ends by itself (ShardLoader checks it delivered something); an endless one needs a guard
        health = self.source.health(stats) if self.cfg.resampled else None
        urls = (self.source.resampled(seed, health) if health is not None
                else self.source.split(self.rank, self.world_size, worker, n_workers))
        raw = self.source.samples(urls, stats, seed)
        samples = decode_samples(raw, stats, self.source.image_keys, self.cfg.text_key, self.preprocess,
                                 self.cfg.max_image_pixels, health)
        for batch in self._batches(samples, self._n_batches(worker, n_workers)):
            batch[_STATS], batch[_WORKER] = dict(stats), worker
            yield batch
        yield {_STATS: dict(stats), _WORKER: worker, _FINAL: True}


class ShardLoader:
    """Iterable of batch dicts ``{"image": [B,3,H,W], "text": [B,L] (with a tokenizer), "caption",
    "key", "url", "meta", "nbytes"}`` with skip counters gathered from all workers.

    ``shard_warnings``: bad shards each worker's stream names in a warning before it only counts them
    (:class:`pipeline.data.sources.ShardWarnings`; 0 when the caller reports bad shards itself).
    """

    def __init__(self, cfg: ShardDataConfig, rank: int = 0, world_size: int = 1,
                 preprocess: Callable | None = None, tokenizer: Callable | None = None,
                 shard_warnings: int = NAMED):
        self.cfg = cfg
        self.dataset = ShardStream(cfg, rank, world_size, preprocess, tokenizer, shard_warnings)
        n_shards = self.dataset.source.n_shards
        if not cfg.resampled and n_shards < world_size * max(1, cfg.workers):
            warnings.warn(f"{n_shards} shards for {world_size} ranks x {max(1, cfg.workers)} workers: "
                          "some workers get no shard (results stay exact, throughput drops)", stacklevel=2)
        self._finished: Counter = Counter()
        self._current: dict[int, dict] = {}

    @property
    def num_batches(self) -> int | None:
        """Batches this rank yields per epoch in resampled mode; ``None`` in single-pass mode."""
        return self.dataset.batches_per_rank

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a single-pass ShardLoader has no length; it reads until its shards end")
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Reseed resampling and shuffling for ``epoch`` (workers are re-created every epoch)."""
        self.dataset.epoch = epoch

    @property
    def stats(self) -> dict[str, int]:
        """All counters since construction: ``samples`` (good samples decoded), ``shards`` (shards
        opened) and every :data:`SKIP_REASONS`; exact once an epoch has ended."""
        total = Counter(self._finished)
        for snap in self._current.values():
            total.update(snap)
        return {k: total.get(k, 0) for k in ("samples", "shards", *SKIP_REASONS)}

    @property
    def skip_counts(self) -> dict[str, int]:
        """The skip counters that are non-zero (for logging), keyed by :data:`SKIP_REASONS`;
        :attr:`stats` has every counter, zeros included."""
        return {k: v for k, v in self.stats.items() if k in SKIP_REASONS and v}

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.workers,
                            persistent_workers=False)  # fresh workers pick up set_epoch()
        self._current = {}
        try:
            for item in loader:
                self._current[item.pop(_WORKER)] = public_counts(item.pop(_STATS))
                if not item.pop(_FINAL, False):
                    yield item
            if not self.cfg.resampled and not self.cfg.allow_empty:
                self._check_not_empty()
        finally:
            for snap in self._current.values():
                self._finished.update(snap)
            self._current = {}

    def _check_not_empty(self) -> None:
        """After a complete single pass: raise when its shards gave not one usable sample."""
        done: Counter = Counter()
        for snap in self._current.values():
            done.update(snap)
        if done["shards"] and not done["samples"]:
            counts = {k: done[k] for k in SKIP_REASONS if done[k]}
            raise NoUsableData(f"no usable samples in {done['shards']} shards (skipped: {counts}); check "
                               f"data.urls={self.cfg.urls!r} (data.allow_empty=true lets a pass end empty)")


def build_shard_loader(cfg: ShardDataConfig, rank: int = 0, world_size: int = 1,
                       preprocess: Callable | None = None, tokenizer: Callable | None = None,
                       shard_warnings: int = NAMED) -> ShardLoader:
    """The batch stream of ``rank`` out of ``world_size`` for ``cfg`` (see the module docstring).

    ``preprocess`` maps a PIL RGB image to a tensor (e.g. ``Backbone.preprocess_train``);
    ``tokenizer`` maps a list of captions to token ids (adds ``"text"`` to each batch);
    ``shard_warnings``: see :class:`ShardLoader`.
    """
    return ShardLoader(cfg, rank, world_size, preprocess, tokenizer, shard_warnings)
