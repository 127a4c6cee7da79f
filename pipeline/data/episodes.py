"""N-way K-shot support/query tasks ("episodes") over the concept clustering (docs/ARCHITECTURE.md section 4).

Images come from the shard *stream*, not from random access: the sampler keeps a bounded buffer of
recent images per concept and emits an episode as soon as one can be formed. Why buffers and not keyed
access: shards may be remote (``pipe:``/``s3``/``http``), where seeking to one sample means reading the whole
tar; streaming reads each shard sequentially at full bandwidth, needs no per-sample index across millions
of keys, and works unchanged with the resampled, node- and worker-split reader. The price is that an
episode's images are drawn from what was recently streamed, which the shuffle buffer keeps well mixed.

Each sample's concept is looked up in the per-shard assignment file of the shard it came from
(``assign/<shard>.npz`` from ``pipeline cluster``), loaded lazily and kept in a small LRU, so memory does
not grow with the number of samples. The lookup also compares the sample's content digest with the one
recorded at extraction and raises on a mismatch (a clustering of another shard set with the same file
names and keys; see :mod:`pipeline.data.features`).

Randomness is seeded per (seed, rank, worker); the stream order is deterministic for a given seed, so the
same seed gives the same episodes. Whether an episode's query is cross-domain is drawn *before* waiting
for the buffers, so the cross-domain rate is exactly the configured probability in expectation (no
fallback that would bias it when one domain fills first).
"""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.config import ConfigError
from pipeline.data.features import ContentMismatch, read_assignments, shard_stem


@dataclass(frozen=True)
class EpisodeConfig:
    """Task sampling."""

    n_way: int = 5
    """Concepts per task."""
    k_shot: int = 4
    """Support images per concept."""
    q_query: int = 4
    """Query images per concept."""
    p_cross_domain: float = 0.3
    """Probability that the query comes from N concepts of another domain (union label space 2N)."""
    buffer_per_concept: int = 32
    """Most recent images kept per concept (bounds memory: concepts x this x image size)."""
    assignment_cache: int = 64
    """Per-shard assignment files kept in memory (LRU)."""

    def validate(self) -> None:
        for key in ("n_way", "k_shot", "q_query"):
            if getattr(self, key) < 1:
                raise ConfigError(f"episodes.{key}={getattr(self, key)} must be >= 1")
        if not 0.0 <= self.p_cross_domain <= 1.0:
            raise ConfigError(f"episodes.p_cross_domain={self.p_cross_domain} must be in [0, 1]")
        if self.buffer_per_concept < self.k_shot + self.q_query:
            raise ConfigError(
                f"episodes.buffer_per_concept={self.buffer_per_concept} must be >= k_shot + q_query "
                f"({self.k_shot + self.q_query})"
            )


@dataclass
class Episode:
    """One task. Labels index ``classnames``; the support uses ``classnames[:n_way]``.

    Same-domain query: ``classnames`` has N names and query labels are in ``0..N-1``.
    Cross-domain query: ``classnames`` = support names + the query concepts' names (2N), query labels in
    ``N..2N-1``; the outer loss is computed in this union label space.
    """

    support_images: Tensor  # [N*K, C, H, W]
    support_labels: Tensor  # [N*K] in 0..N-1
    query_images: Tensor  # [N*Q, C, H, W]
    query_labels: Tensor  # [N*Q]
    classnames: list[str]
    support_keys: list[str]
    query_keys: list[str]
    domains: tuple[int, int]  # (support domain, query domain)

    @property
    def n_way(self) -> int:
        return int(self.support_labels.max()) + 1

    @property
    def cross_domain(self) -> bool:
        return self.domains[0] != self.domains[1]


class ConceptTable:
    """Concept metadata (domain, name, size) and lazily loaded per-shard key -> concept lookups, bound to
    the content the clustering was computed from (docs/ARCHITECTURE.md section 4)."""

    def __init__(self, clusters_dir: str | Path, min_size: int, cache: int = 64):
        self.dir = Path(clusters_dir)
        concepts = json.loads((self.dir / "concepts.json").read_text())
        self.domain = {c["id"]: c["domain"] for c in concepts}
        self.name = {c["id"]: c["name"] for c in concepts}
        self.eligible = {c["id"] for c in concepts if c["size"] >= min_size}
        self.by_domain: dict[int, list[int]] = defaultdict(list)
        for c in sorted(self.eligible):
            self.by_domain[self.domain[c]].append(c)
        self._cache: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._cache_size = cache

    def concept_of(self, url: str, key: str, digest: int) -> int:
        """Concept id of sample ``key`` from shard ``url`` (-1 when the shard or the key has no assignment).

        ``digest`` is the sample's :func:`~pipeline.data.sample_checks.sample_digest`; it must equal the one
        extraction recorded for that key, or :class:`~pipeline.data.features.ContentMismatch` is raised
        naming the shard: the assignment was computed from another shard that shares its file name and
        keys, and every label taken from it would be wrong. The first sample of such a shard raises,
        before any of its labels is used.
        """
        stem = shard_stem(url)
        table = self._cache.get(stem)
        if table is None:
            table = assignment_table(self.dir / "assign" / f"{stem}.npz", url)
            self._cache[stem] = table
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(stem)
        entry = table.get(key)
        if entry is None:
            return -1
        if entry[1] != digest:
            raise ContentMismatch(mismatch_message(url, key, self.dir / "assign" / f"{stem}.npz"))
        return entry[0]

    def check(self, cfg: EpisodeConfig) -> None:
        """Fail before training when the clustering cannot provide the configured tasks."""
        check_task_widths({d: len(v) for d, v in self.by_domain.items()}, cfg, f"clusters in {self.dir}")


def assignment_table(path: Path, url: str) -> dict[str, tuple[int, int]]:
    """Key -> (concept, content digest) of one shard's assignment file; ``{}`` when there is none.

    Refuses (:class:`~pipeline.data.features.ContentMismatch`, naming the shard) a file written before
    content fingerprints: its labels cannot be checked against the shard, so they are not used.
    """
    if not path.exists():
        return {}
    try:
        a = read_assignments(path)
    except ContentMismatch:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{url}: {path} is not an assignment file of `pipeline cluster` ({e})") from None
    if a.digest is None:
        raise ContentMismatch(f"{url}: its assignment file {path} was written before content fingerprints, so "
                              "its labels cannot be checked against this shard; re-run `pipeline extract` (it "
                              "redoes such feature files) and `pipeline cluster`")
    return dict(zip(a.keys.tolist(), zip(a.concept.tolist(), a.digest.tolist())))


def mismatch_message(url: str, key: str, path: Path) -> str:
    """The error for a sample whose content differs from the one its assignment was computed from."""
    return (f"shard {url}: sample {key!r} is not the sample {path} was computed from (its caption or image "
            "size differs from the content fingerprint recorded at extraction), so the clustering belongs to "
            "another shard with the same file name and keys and its labels would be wrong; point "
            "data.clusters_dir at the clustering of these shards, or run `pipeline extract` and "
            "`pipeline cluster` on them")


def check_task_widths(widths: Mapping[int, int], cfg: EpisodeConfig, where: str) -> None:
    """Refuse ``cfg`` when no domain has ``n_way`` usable concepts (``widths``: domain -> how many), or
    when cross-domain queries need a second such domain; ``where`` says what was counted."""
    need = cfg.k_shot + cfg.q_query
    widest = max(widths.values(), default=0)
    if widest < cfg.n_way:
        raise ConfigError(
            f"episodes.n_way={cfg.n_way} but the clustering has at most {widest} usable concepts in one domain "
            f"(with >= k_shot + q_query = {need} samples; {where}); lower episodes.n_way, episodes.k_shot or "
            "episodes.q_query, or cluster into more concepts")
    ready = sum(n >= cfg.n_way for n in widths.values())
    if cfg.p_cross_domain > 0 and ready < 2:
        raise ConfigError(
            f"episodes.p_cross_domain={cfg.p_cross_domain} needs 2 domains with n_way={cfg.n_way} usable concepts "
            f"but the clustering has {ready} ({where}); set episodes.p_cross_domain=0 or lower episodes.n_way")


class EpisodeSampler:
    """Turns a stream of samples ``{"key", "url", "image", "digest"}`` into :class:`Episode` s (``digest``:
    the sample's content digest, checked against its assignment by :meth:`ConceptTable.concept_of`)."""

    def __init__(self, table: ConceptTable, cfg: EpisodeConfig, seed: int, decode: Callable | None = None):
        table.check(cfg)
        self.table, self.cfg = table, cfg
        self.rng = np.random.default_rng(seed)
        self.decode = decode  # raw buffered item -> image tensor (None: items are tensors already)
        self.buffers: dict[int, deque] = defaultdict(lambda: deque(maxlen=cfg.buffer_per_concept))
        self.unassigned = 0  # samples whose key has no (eligible) concept
        self.bad_images = 0  # buffered images that failed to decode when a task needed them
        self._pending_cross = False  # whether the task being waited for has a cross-domain query

    def __call__(self, samples: Iterable[dict]) -> Iterator[Episode]:
        self._pending_cross = pending_cross = self._draw_cross()
        for sample in samples:
            concept = self.table.concept_of(sample["url"], sample["key"], sample["digest"])
            if concept not in self.table.eligible:
                self.unassigned += 1
                continue
            buf = self.buffers[concept]
            if any(key == sample["key"] for key, _ in buf):
                continue  # resampling streams the same image again: a duplicate could land in S and Q
            buf.append((sample["key"], sample["image"]))  # "image": raw bytes or an already decoded tensor
            if len(buf) < self.cfg.q_query:
                continue  # this insert cannot have completed a task: skip the scan over concepts
            episode = self._try_emit(pending_cross)
            if episode is not None:
                yield episode
                self._pending_cross = pending_cross = self._draw_cross()

    def readiness(self) -> str:
        """What the sampler is waiting for, in words (for errors about a stream that forms no task)."""
        cfg = self.cfg
        need, cross = cfg.k_shot + cfg.q_query, self._pending_cross
        full = {d: len(self._ready(d, need)) for d in sorted(self.table.by_domain)}
        text = (f"concepts with >= k_shot + q_query = {need} buffered images per domain: {full}, a task needs "
                f"n_way={cfg.n_way} in one domain")
        if cross:
            query = {d: len(self._ready(d, cfg.q_query)) for d in sorted(self.table.by_domain)}
            text += (f"; the pending task has a cross-domain query, which needs n_way concepts with >= "
                     f"q_query={cfg.q_query} images in another domain: {query}")
        return text

    def _draw_cross(self) -> bool:
        return bool(self.rng.random() < self.cfg.p_cross_domain)

    def _ready(self, domain: int, need: int) -> list[int]:
        """Eligible concepts of ``domain`` with at least ``need`` buffered images, distinct names."""
        seen, out = set(), []
        for c in self.table.by_domain[domain]:
            if len(self.buffers.get(c, ())) >= need and self.table.name[c] not in seen:
                seen.add(self.table.name[c])
                out.append(c)
        return out

    def _try_emit(self, cross: bool) -> Episode | None:
        cfg = self.cfg
        n, k, q = cfg.n_way, cfg.k_shot, cfg.q_query
        need = k if cross else k + q
        support_domains = [d for d in self.table.by_domain if len(self._ready(d, need)) >= n]
        if not support_domains:
            return None
        d_s = int(self.rng.choice(sorted(support_domains)))
        s_concepts = [int(c) for c in self.rng.choice(self._ready(d_s, need), size=n, replace=False)]
        names = [self.table.name[c] for c in s_concepts]
        if cross:
            # query concepts from another domain, with names distinct from the support's (union label space)
            candidates = {
                d: [c for c in self._ready(d, q) if self.table.name[c] not in names]
                for d in self.table.by_domain if d != d_s
            }
            query_domains = sorted(d for d, cs in candidates.items() if len(cs) >= n)
            if not query_domains:
                return None
            d_q = int(self.rng.choice(query_domains))
            q_concepts = [int(c) for c in self.rng.choice(candidates[d_q], size=n, replace=False)]
            q_labels = list(range(n, 2 * n))
            names = names + [self.table.name[c] for c in q_concepts]
        else:
            d_q, q_concepts, q_labels = d_s, s_concepts, list(range(n))
        # pick first, decode, and only then pop: an undecodable image is dropped and the task retried.
        # One draw per concept, each used: K then Q positions from distinct concepts (cross-domain), or
        # K + Q at once split into support and query (same concepts: the two must be disjoint).
        if cross:
            s_picks = [(c, self._pick(c, k)) for c in s_concepts]
            q_picks = [(c, self._pick(c, q)) for c in q_concepts]
            picks = s_picks + q_picks
        else:
            picks = [(c, self._pick(c, k + q)) for c in s_concepts]
            s_picks = [(c, idx[:k]) for c, idx in picks]
            q_picks = [(c, idx[k:]) for c, idx in picks]
        decoded = self._decode(picks)
        if decoded is None:
            return None
        self._pop(picks)
        support = [(lab, [decoded[(c, i)] for i in idx]) for lab, (c, idx) in enumerate(s_picks)]
        query = [(lab, [decoded[(c, i)] for i in idx]) for lab, (c, idx) in zip(q_labels, q_picks)]
        return _episode(support, query, names, (d_s, d_q))

    def _pick(self, concept: int, count: int) -> list[int]:
        """``count`` distinct random buffer positions of ``concept``."""
        return self.rng.choice(len(self.buffers[concept]), size=count, replace=False).tolist()

    def _decode(self, picks) -> dict | None:
        """(concept, position) -> (key, image tensor); None (after dropping the bad items) on a failure."""
        out, bad = {}, []
        for c, idx in picks:
            for i in idx:
                key, raw = self.buffers[c][i]
                try:
                    out[(c, i)] = (key, raw if self.decode is None else self.decode(raw))
                except Exception:  # PIL raises many types for corrupt data
                    bad.append((c, i))
        if not bad:
            return out
        self.bad_images += len(bad)
        self._pop([(c, [i]) for c, i in bad])
        return None

    def _pop(self, picks) -> None:
        """Remove the picked buffer positions (used images are not reused by later tasks)."""
        drop = defaultdict(set)
        for c, idx in picks:
            drop[c].update(idx)
        for c, positions in drop.items():
            kept = [item for i, item in enumerate(self.buffers[c]) if i not in positions]
            self.buffers[c].clear()
            self.buffers[c].extend(kept)


def _episode(support, query, names, domains) -> Episode:
    def stack(groups):
        keys = [key for _, items in groups for key, _ in items]
        images = torch.stack([img for _, items in groups for _, img in items])  # [N*count, C, H, W]
        labels = torch.tensor([lab for lab, items in groups for _ in items], dtype=torch.long)
        return images, labels, keys

    s_img, s_lab, s_keys = stack(support)
    q_img, q_lab, q_keys = stack(query)
    return Episode(s_img, s_lab, q_img, q_lab, names, s_keys, q_keys, domains)
