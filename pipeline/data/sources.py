"""Shard sources: which shards a stream reads, in what order, and their raw samples.

The part that the image-text reader (:mod:`pipeline.data.shards`) and the stage-1 task streams
(:mod:`pipeline.data.task_stream`) share, kept here once:

* URL handling: ``::``-separated sources with brace expansion (:func:`expand_sources`), their
  sampling weights (:func:`source_weights`) and the start-up check that local shards exist
  (:func:`check_shard_urls`);
* warnings about bad shards, aggregated (:class:`ShardWarnings`, :func:`some_names`): a thousand missing
  shards give a few named lines and a count, not a thousand lines;
* the seeds of a stream: every random draw comes from a :class:`StreamSeed` ``(seed, epoch, stream id,
  worker)``, so the same ids give the same draws in every process;
* :class:`ShardSource`: the shard order (a rank/worker split of the shard list for a single pass, or
  weighted resampling for an endless stream), the tar reader (:func:`iter_tar_samples`) and the
  optional sample shuffle buffer, plus the :class:`~pipeline.data.sample_checks.StreamHealth` guard of
  an endless stream.

What each stream does with the raw samples (decoding into batches, or buffering into episodes) stays
in its own module.
"""

from __future__ import annotations

import os
import random
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from pipeline.config import ConfigError
from pipeline.data.sample_checks import (
    DROPPED_FIELD,
    OPEN_FIELD,
    StreamHealth,
    health_limit,
    raw_sample_digest,
)

NAMED = 5
"""How many shards a warning or error names before it only counts the rest (:func:`some_names`); also
the default number of bad shards a stream warns about by name (:class:`ShardWarnings`)."""


def some_names(items: list[str], limit: int = NAMED) -> str:
    """``a, b, c`` or, past ``limit`` items, ``a, b, c, d, e and 994 more``: one bounded line."""
    head = ", ".join(str(i) for i in items[:limit])
    return head if len(items) <= limit else f"{head} and {len(items) - limit} more"


class ShardWarnings:
    """Warns about the first ``limit`` bad shards of one stream by name, then once that further ones are
    only counted (under ``bad_shard``); ``limit=0`` warns about none.

    Why: a reader skips bad shards by design, and a resampled stream reopens them, so one line per event
    turns 999 missing shards into thousands of lines; the counters keep the exact numbers. A shard
    already named is not named again when it is reopened.
    """

    def __init__(self, limit: int = NAMED):
        self.limit = limit
        self.named: set[str] = set()
        self.silenced = False

    def warn(self, url: str, message: str) -> None:
        """Warn ``message`` about shard ``url`` unless it was named already or ``limit`` others were."""
        if url in self.named:
            return
        if len(self.named) < self.limit:
            self.named.add(url)
            warnings.warn(message, stacklevel=3)
        elif self.limit and not self.silenced:
            self.silenced = True
            warnings.warn(f"more than {self.limit} bad shards in this stream (the next one: {url}): further ones "
                          "are skipped without a warning and counted under bad_shard", stacklevel=3)


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


def is_local(url: str) -> bool:
    """True for a plain file path (``pipe:``, ``http://``, ``s3://``... are opened by webdataset)."""
    return not url.startswith("pipe:") and "://" not in url


def check_shard_urls(urls: str, key: str) -> list[str]:
    """Expand ``urls`` (brace ranges, ``::`` sources) and check local shards exist; returns every URL.

    A source whose local shards all are missing is an error naming it (a typo in a path or a range
    would otherwise make a resampling reader wait forever or write empty outputs); some missing
    shards only warn, because readers skip unreadable shards by design. Remote URLs are not probed.
    Existence is read from one listing per folder, not one ``stat`` per shard, so every rank of a large
    job can afford it on a parallel file system.
    """
    try:
        sources = expand_sources(urls)
    except ValueError as e:
        raise ConfigError(f"{key}={urls!r}: {e}") from None
    listings: dict[str, set[str]] = {}
    out, missing, n_local = [], [], 0
    for source in sources:
        local = [u for u in source if is_local(u)]
        gone = [u for u in local if Path(u).name not in _listing(str(Path(u).parent), listings)]
        if local and len(gone) == len(local):
            raise ConfigError(f"{key}={urls!r}: none of the {len(local)} shard files exists (first: {local[0]}); "
                              "check the folder and the {first..last} range")
        missing += gone
        n_local += len(local)
        out.extend(source)
    if missing:  # one line over every source, naming a few: 999 missing shards are one warning, not 999
        warnings.warn(f"{key}: {len(missing)} of {n_local} shard files do not exist ({some_names(missing)}); "
                      "they will be skipped", stacklevel=2)
    return out


def _listing(folder: str, cache: dict[str, set[str]]) -> set[str]:
    if folder not in cache:
        try:
            cache[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
        except OSError:  # missing or unreadable folder: nothing in it can be read either
            cache[folder] = set()
    return cache[folder]


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


def iter_tar_samples(urls: Iterator[str], stats: Counter, max_member_bytes: int = 0,
                     warn: ShardWarnings | None = None) -> Iterator[dict]:
    """Group tar members by key into raw samples ``{"__key__", "__url__", ext: bytes}``.

    A shard that fails to open, or breaks off (truncated), is counted as ``bad_shard`` and warned about
    through ``warn`` (default: a fresh :class:`ShardWarnings`, which names the first few and then only
    counts); samples completed before the break are kept, the broken one is dropped. A member over
    ``max_member_bytes`` (0 = no limit) is never read into memory (the stream skips its bytes); its
    sample is marked so :func:`~pipeline.data.sample_checks.check_sample` skips and counts it.
    """
    warn = warn if warn is not None else ShardWarnings()
    for url in urls:
        stats["shards"] += 1
        try:
            stream = _CountingReader(wds.gopen(url, "rb"))
        except Exception as e:  # missing file, failed pipe/HTTP open: skip the whole shard
            warn.warn(url, f"skipping unreadable shard {url}: {type(e).__name__}: {e}")
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
                        current = {"__key__": key, "__url__": url, OPEN_FIELD: stats["shards"]}
                        stats["_last_raw_open"] = stats["shards"]
                    if max_member_bytes and info.size > max_member_bytes:
                        current[DROPPED_FIELD] = ext
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
            warn.warn(url, f"skipping rest of shard {url}: {type(e).__name__}: {e}")
            stats["bad_shard"] += 1
        finally:
            try:
                stream.close()
            except Exception as e:  # a pipe: URL reports its command's failure on close
                warn.warn(f"{url} (close)", f"error closing shard {url}: {e}")


def read_sample_digests(url: str, image_keys: tuple[str, ...], text_key: str = "txt",
                        max_samples: int | None = None, max_member_bytes: int = 0) -> dict[str, int]:
    """Key -> :func:`~pipeline.data.sample_checks.sample_digest` of the samples of one shard that pass
    the readers' sample checks (images are not opened), from the first ``max_samples`` raw samples
    (``None``: all). An unreadable shard gives what was read before the break, without a warning;
    members over ``max_member_bytes`` (0 = no limit) are not read, as in the readers.

    Used by the start-up check of stage 1 and to plant assignment files in tests (docs/ARCHITECTURE.md
    section 4); reading a whole shard costs one pass over its bytes.
    """
    out: dict[str, int] = {}
    samples = iter_tar_samples(iter([url]), Counter(), max_member_bytes, ShardWarnings(0))
    try:
        for i, s in enumerate(samples):
            if max_samples is not None and i >= max_samples:
                break
            digest = raw_sample_digest(s, image_keys, text_key)
            if digest is not None:
                out[s["__key__"]] = digest
    finally:
        samples.close()  # closes the tar at once when stopping early
    return out


@dataclass(frozen=True)
class StreamSeed:
    """The ids one worker's stream is seeded by; ``stream`` is the rank (image-text reader) or the task
    slot (stage-1 tasks)."""

    seed: int
    epoch: int
    stream: int
    worker: int

    def rng(self, what: str) -> random.Random:
        """A generator for one use (``"shards"``, ``"samples"``, ...) of this stream."""
        # str seeds hash deterministically, so every process derives the same stream for the same ids
        return random.Random(f"{what}-{self.seed}-{self.epoch}-{self.stream}-{self.worker}")


class ShardSource:
    """The shards of one config and how a stream reads them into raw samples (see the module docstring).

    ``urls``/``weights`` as in the data configs; ``image_keys`` is the ``;``-separated extension list
    (parsed into :attr:`image_keys`); ``shuffle_buffer`` 0 disables the sample shuffle;
    ``shard_warnings`` is how many bad shards each stream names in a warning (:class:`ShardWarnings`).
    """

    def __init__(self, urls: str, weights: str = "", image_keys: str = "", shuffle_buffer: int = 0,
                 shuffle_initial: int = 0, max_member_bytes: int = 0, shard_warnings: int = NAMED):
        self.urls = urls
        self.sources = expand_sources(urls)
        self.weights = source_weights(weights, len(self.sources))
        self.image_keys = tuple(k.strip().lower() for k in image_keys.split(";") if k.strip())
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.max_member_bytes = max_member_bytes
        self.shard_warnings = shard_warnings

    @property
    def n_shards(self) -> int:
        """Shards over all sources (a shard listed in two sources counts twice)."""
        return sum(len(s) for s in self.sources)

    def health(self, stats: Counter) -> StreamHealth:
        """The guard of an endless stream counting into ``stats`` (limit: :func:`health_limit`)."""
        return StreamHealth(health_limit(self.sources), self.urls, stats)

    def split(self, rank: int, world_size: int, worker: int, n_workers: int) -> list[str]:
        """The shards one worker of one rank reads in a single pass: every shard once over all of them."""
        flat = [u for src in self.sources for u in src]
        return flat[rank::world_size][worker::n_workers]

    def resampled(self, seed: StreamSeed, health: StreamHealth,
                  before_open: Callable[[], None] | None = None) -> Iterator[str]:
        """Endless shard URLs: a source by weight, then a shard uniformly inside it.

        ``health`` checks before every opening; ``before_open`` (if given) runs right after it, for a
        stream's own give-up rule.
        """
        rng = seed.rng("shards")
        while True:
            health.check_open()
            if before_open is not None:
                before_open()
            src = rng.choices(self.sources, weights=self.weights, k=1)[0]
            yield rng.choice(src)

    def samples(self, urls: Iterable[str], stats: Counter, seed: StreamSeed) -> Iterator[dict]:
        """Raw samples of the shards in ``urls``: tar reading, then the shuffle buffer (if any).

        ``urls`` is :meth:`split` or :meth:`resampled`, read lazily. Counts go to ``stats`` (``shards``,
        ``bad_shard``); the samples are not checked yet.
        """
        warn = ShardWarnings(self.shard_warnings)  # one budget per stream (per worker and pass)
        stages = [lambda: iter(urls), lambda src: iter_tar_samples(src, stats, self.max_member_bytes, warn)]
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_initial, rng=seed.rng("samples")))
        return iter(wds.DataPipeline(*stages))
