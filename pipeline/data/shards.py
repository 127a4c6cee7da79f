"""Stream image-text pairs from webdataset shards into batches (DESIGN sections 2, 7, 9).

Two modes, chosen by :attr:`ShardDataConfig.resampled`:

* **resampled** (training): every worker draws shards with replacement (sources picked by weight,
  then a shard uniformly inside the source) from its own seed ``(seed, epoch, rank, worker)``. An
  epoch is a sample count: each rank yields exactly ``ceil(epoch_samples / (batch_size *
  world_size))`` full batches, dealt out over its workers, so ranks never wait on each other.
* **single pass** (extraction, evaluation): the expanded shard list is split by rank
  (``shards[rank::world_size]``) and then by worker, so every readable sample is read exactly once
  over all ranks and workers. Balance needs ``#shards >= world_size * workers``; with fewer, some
  workers idle. Ranks may yield different batch counts here: each rank simply processes its shards.

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
  kept. A valid tar with no members is simply empty (counted in ``shards`` only).

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
import random
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.config import ShardDataConfig, validate_shard_data
from pipeline.data.sample_checks import (  # noqa: F401  (NoUsableData, SKIP_REASONS: part of this module's API)
    _DROPPED,
    _OPEN,
    SKIP_REASONS,
    NoUsableData,
    StreamHealth,
    _public,
    check_sample,
    checked_image,
    health_limit,
)

_STATS, _WORKER, _FINAL = "__stats__", "__worker__", "__final__"


def expand_sources(urls: str) -> list[list[str]]:
    """Split ``urls`` on ``::`` into sources and brace-expand each (``a/{000..009}.tar``)."""
    sources = [wds.shardlists.expand_urls(part) for part in urls.split("::") if part.strip()]
    if not sources or not all(sources):
        raise ValueError(f"no shards in urls={urls!r}")
    return sources


def source_weights(weights: str, n_sources: int) -> list[float]:
    """Parse ``3::1`` style weights (empty = equal); the length must match the sources."""
    if not weights:
        return [1.0] * n_sources
    values = [float(w) for w in weights.split("::")]
    if len(values) != n_sources or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"weights={weights!r} do not fit {n_sources} sources")
    return values


class _CountingReader:
    """File wrapper counting bytes read, to tell a complete tar from one cut at a member boundary."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, size=-1):
        data = self.f.read(size)
        self.n += len(data)
        return data

    def close(self):
        self.f.close()


def _key_ext(name: str) -> tuple[str, str]:
    # webdataset convention: the key is everything before the first dot of the file's base name
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def iter_tar_samples(urls: Iterator[str], stats: Counter, max_member_bytes: int = 0) -> Iterator[dict]:
    """Group tar members by key into raw samples ``{"__key__", "__url__", ext: bytes}``.

    A shard that fails to open, or breaks off (truncated), is warned about and counted as
    ``bad_shard``; samples completed before the break are kept, the broken one is dropped. A member
    over ``max_member_bytes`` (0 = no limit) is never read into memory (the stream skips its bytes);
    its sample is marked so :func:`~pipeline.data.sample_checks.check_sample` skips and counts it.
    """
    for url in urls:
        stats["shards"] += 1
        try:
            stream = _CountingReader(wds.gopen(url, "rb"))
        except Exception as e:  # missing file, failed pipe/HTTP open: skip the whole shard
            warnings.warn(f"skipping unreadable shard {url}: {type(e).__name__}: {e}", stacklevel=2)
            stats["bad_shard"] += 1
            continue
        current, end_of_last = None, 0
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    key, ext = _key_ext(info.name)
                    if current is not None and key != current["__key__"]:
                        yield current  # all members of the previous key have been read in full
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url, _OPEN: stats["shards"]}
                        stats["_last_raw_open"] = stats["shards"]
                    if max_member_bytes and info.size > max_member_bytes:
                        current[_DROPPED] = ext
                    else:
                        current[ext] = tar.extractfile(info).read()
                    end_of_last = info.offset_data + info.size
                compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
            # an intact tar ends with zero blocks; a cut at a member boundary ends without error
            if current is not None and not compressed and stream.n < end_of_last + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("archive ends without an end-of-archive marker (truncated)")
            if current is not None:
                yield current
        except Exception as e:  # truncated or corrupt tar, broken pipe, bad gzip
            warnings.warn(f"skipping rest of shard {url}: {type(e).__name__}: {e}", stacklevel=2)
            stats["bad_shard"] += 1
        finally:
            try:
                stream.close()
            except Exception as e:  # a pipe: URL reports its command's failure on close
                warnings.warn(f"error closing shard {url}: {e}", stacklevel=2)


def decode_samples(samples: Iterator[dict], stats: Counter, image_keys: tuple[str, ...], text_key: str,
                   preprocess: Callable | None, max_pixels: int = 0,
                   health: StreamHealth | None = None) -> Iterator[dict]:
    """Raw samples -> ``{"image", "caption", "key", "url", "meta"}``; bad ones skipped and counted.

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
    return {"image": image, "caption": caption, "key": s["__key__"], "url": s["__url__"], "meta": meta}


def _collate(samples: list[dict], tokenizer: Callable | None) -> dict:
    images = [s["image"] for s in samples]
    batch = {k: [s[k] for s in samples] for k in ("caption", "key", "url", "meta")}
    batch["image"] = torch.stack(images) if isinstance(images[0], torch.Tensor) else images  # [B, 3, H, W]
    if tokenizer is not None:
        batch["text"] = tokenizer(batch["caption"])  # [B, context_length] token ids
    return batch


class ShardStream(IterableDataset):
    """The per-worker webdataset pipeline; iterate it through :class:`ShardLoader`."""

    def __init__(self, cfg: ShardDataConfig, rank: int, world_size: int, preprocess=None, tokenizer=None):
        validate_shard_data(cfg, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, {world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.sources = expand_sources(cfg.urls)
        self.weights = source_weights(cfg.weights, len(self.sources))
        self.epoch = 0
        self.batches_per_rank = (math.ceil(cfg.epoch_samples / (cfg.batch_size * world_size))
                                 if cfg.resampled else None)

    def _rng(self, worker: int, what: str) -> random.Random:
        # str seeds hash deterministically, so every process derives the same stream for the same ids
        return random.Random(f"{what}-{self.cfg.seed}-{self.epoch}-{self.rank}-{worker}")

    def _shard_urls(self, worker: int, n_workers: int, health: StreamHealth | None) -> Iterator[str]:
        if health is None:
            flat = [u for src in self.sources for u in src]
            yield from flat[self.rank::self.world_size][worker::n_workers]
            return
        rng = self._rng(worker, "shards")
        while True:
            health.check_open()
            src = rng.choices(self.sources, weights=self.weights, k=1)[0]
            yield rng.choice(src)

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
        # a single pass ends by itself (ShardLoader checks it delivered something); an endless one needs a guard
        health = StreamHealth(health_limit(self.sources), self.cfg.urls, stats) if self.cfg.resampled else None
        stages = [lambda: self._shard_urls(worker, n_workers, health),
                  lambda src: iter_tar_samples(src, stats, self.cfg.max_member_bytes)]
        if self.cfg.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, self.cfg.shuffle_initial,
                                      rng=self._rng(worker, "samples")))
        keys = tuple(k.strip().lower() for k in self.cfg.image_keys.split(";") if k.strip())
        stages.append(lambda src: decode_samples(src, stats, keys, self.cfg.text_key, self.preprocess,
                                                 self.cfg.max_image_pixels, health))
        pipeline = wds.DataPipeline(*stages)
        for batch in self._batches(iter(pipeline), self._n_batches(worker, n_workers)):
            batch[_STATS], batch[_WORKER] = dict(stats), worker
            yield batch
        yield {_STATS: dict(stats), _WORKER: worker, _FINAL: True}


class ShardLoader:
    """Iterable of batch dicts ``{"image": [B,3,H,W], "text": [B,L] (with a tokenizer), "caption",
    "key", "url", "meta"}`` with skip counters gathered from all workers."""

    def __init__(self, cfg: ShardDataConfig, rank: int = 0, world_size: int = 1,
                 preprocess: Callable | None = None, tokenizer: Callable | None = None):
        self.cfg = cfg
        self.dataset = ShardStream(cfg, rank, world_size, preprocess, tokenizer)
        n_shards = sum(len(s) for s in self.dataset.sources)
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
                self._current[item.pop(_WORKER)] = _public(item.pop(_STATS))
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
                       preprocess: Callable | None = None, tokenizer: Callable | None = None) -> ShardLoader:
    """The batch stream of ``rank`` out of ``world_size`` for ``cfg`` (see the module docstring).

    ``preprocess`` maps a PIL RGB image to a tensor (e.g. ``Backbone.preprocess_train``);
    ``tokenizer`` maps a list of captions to token ids (adds ``"text"`` to each batch).
    """
    return ShardLoader(cfg, rank, world_size, preprocess, tokenizer)
