"""Cross-modal hierarchical clustering of frozen CLIP features into domains and concepts (GRAM tasks).

Level 1 (*domains*): spherical k-means on caption embeddings ``t``.
Level 2 (*concepts*): inside each domain, spherical k-means on the joint embedding
``normalize([u; t])`` (image and caption together), so a concept is a pseudo-class that looks alike
*and* is described alike.

Centroids are fitted on a sample (``fit_sample`` points); every sample is then assigned shard by shard
with exact nearest-centroid search, which is linear in the data and embarrassingly parallel (one array
task per shard). k-means is faiss's (k-means++ init, several restarts), never an O(n^2) method.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from pipeline.fileio import atomic_write


@dataclass(frozen=True)
class KMeansConfig:
    """k-means settings shared by both levels."""

    niter: int = 25
    """Lloyd iterations per run."""
    nredo: int = 2
    """Restarts; the run with the best objective is kept."""
    seed: int = 0
    """Seed of the k-means initialisation."""
    max_points_per_centroid: int = 512
    """faiss subsamples the training set to k * this many points (bounds fit time at scale)."""


def l2n(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def joint_embedding(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """``normalize([u; t])``: ``[n, d_u + d_t]`` float32."""
    return l2n(np.concatenate([l2n(image), l2n(text)], axis=1))


def kmeans_fit(x: np.ndarray, k: int, cfg: KMeansConfig) -> np.ndarray:
    """Spherical k-means centroids ``[k, d]`` of the rows of ``x`` (normalised internally)."""
    x = np.ascontiguousarray(l2n(x))
    if k < 1 or len(x) < k:
        raise ValueError(f"k-means needs 1 <= k <= n points (k={k}, n={len(x)})")
    if k == 1:
        return l2n(x.mean(axis=0, keepdims=True))
    km = faiss.Kmeans(
        x.shape[1], k, niter=cfg.niter, nredo=cfg.nredo, seed=cfg.seed, spherical=True, verbose=False,
        max_points_per_centroid=cfg.max_points_per_centroid, min_points_per_centroid=1,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def nearest(x: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Index ``[n]`` and cosine similarity ``[n]`` of each row's nearest centroid (batched, exact)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ids = np.empty(len(x), dtype=np.int64)
    sims = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), batch):
        d, i = index.search(np.ascontiguousarray(l2n(x[s : s + batch])), 1)
        ids[s : s + batch], sims[s : s + batch] = i[:, 0], d[:, 0]
    return ids, sims


@dataclass
class Hierarchy:
    """Fitted domains and concepts. Concept ids are global; ``concept_domain[c]`` is c's domain."""

    domain_centroids: np.ndarray  # [D, d_t]
    concept_centroids: np.ndarray  # [C, d_u + d_t]
    concept_domain: np.ndarray  # [C] int
    names: list[str]  # [C] concept names (cleaned medoid captions)

    @property
    def n_domains(self) -> int:
        return len(self.domain_centroids)

    @property
    def n_concepts(self) -> int:
        return len(self.concept_centroids)

    def assign(
        self, image: np.ndarray, text: np.ndarray, chunk: int = 131072
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Domain ``[n]``, concept ``[n]`` (global id, inside that domain) and joint similarity ``[n]``.

        Processed in chunks of ``chunk`` rows so temporaries stay bounded (a shard of any size fits).
        """
        n = len(text)
        domain = np.empty(n, dtype=np.int64)
        concept = np.full(n, -1, dtype=np.int64)
        sim = np.zeros(n, dtype=np.float32)
        indexes = self._concept_indexes()
        for s in range(0, n, chunk):
            part = slice(s, min(n, s + chunk))
            dom, _ = nearest(text[part], self.domain_centroids)
            joint = joint_embedding(image[part], text[part])  # [chunk, d_u + d_t]
            con = np.full(len(dom), -1, dtype=np.int64)
            sm = np.zeros(len(dom), dtype=np.float32)
            for d in np.unique(dom):  # one search per domain against its own concepts only
                rows = np.flatnonzero(dom == d)
                ids, index = indexes[int(d)]
                dist, local = index.search(np.ascontiguousarray(joint[rows]), 1)
                con[rows], sm[rows] = ids[local[:, 0]], dist[:, 0]
            domain[part], concept[part], sim[part] = dom, con, sm
        return domain, concept, sim

    def _concept_indexes(self) -> dict[int, tuple[np.ndarray, faiss.Index]]:
        """Per domain: its global concept ids and an exact inner-product index over their centroids."""
        out = {}
        for d in range(self.n_domains):
            ids = np.flatnonzero(self.concept_domain == d)
            if len(ids) == 0:
                continue
            index = faiss.IndexFlatIP(self.concept_centroids.shape[1])
            index.add(np.ascontiguousarray(self.concept_centroids[ids], dtype=np.float32))
            out[d] = (ids, index)
        return out

    def save(self, path: str | Path) -> None:
        """Write ``hierarchy.npz`` (arrays) atomically; names go in as a JSON string."""
        atomic_write(path, lambda f: np.savez(
            f, domain_centroids=self.domain_centroids, concept_centroids=self.concept_centroids,
            concept_domain=self.concept_domain, names=np.array(json.dumps(self.names)),
        ))

    @classmethod
    def load(cls, path: str | Path) -> Hierarchy:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["domain_centroids"], z["concept_centroids"], z["concept_domain"],
                       json.loads(str(z["names"])))


def fit_hierarchy(
    image: np.ndarray,
    text: np.ndarray,
    captions: list[str],
    n_domains: int,
    concepts_per_domain: int,
    cfg: KMeansConfig = KMeansConfig(),
    min_points_per_concept: int = 2,
    clean: Callable[[str], str] | None = None,
) -> Hierarchy:
    """Fit domains on ``text`` and, per domain, concepts on the joint embedding.

    A domain with ``n`` points gets ``min(concepts_per_domain, n // min_points_per_concept)`` concepts, so
    small domains are not shattered into singletons. Concept names are the cleaned caption of the sample
    point nearest each concept centroid (the medoid within the fitted sample).
    """
    if not (len(image) == len(text) == len(captions)):
        raise ValueError(f"length mismatch: {len(image)} images, {len(text)} texts, {len(captions)} captions")
    clean = clean or clean_caption
    domain_centroids = kmeans_fit(text, n_domains, cfg)
    domain, _ = nearest(text, domain_centroids)
    centroids, owners, names = [], [], []
    for d in range(n_domains):
        rows = np.flatnonzero(domain == d)
        if len(rows) == 0:
            continue  # an empty domain gets no concepts; no sample can be assigned to it by construction
        joint = joint_embedding(image[rows], text[rows])  # per domain: memory stays O(domain size)
        k = max(1, min(concepts_per_domain, len(rows) // max(1, min_points_per_concept)))
        c = kmeans_fit(joint, k, KMeansConfig(cfg.niter, cfg.nredo, cfg.seed + d, cfg.max_points_per_centroid))
        medoid = np.argmax(joint @ c.T, axis=0)  # [k]: best sample per centroid
        centroids.append(c)
        owners.extend([d] * k)
        names.extend(clean(captions[rows[m]]) for m in medoid)
    return Hierarchy(domain_centroids, np.concatenate(centroids), np.asarray(owners, dtype=np.int64), names)


_URL = re.compile(r"https?://\S+|www\.\S+")
_TAG = re.compile(r"<[^>]+>")
_NONPRINT = re.compile(r"[^\w\s'\-,&/]+", re.UNICODE)


def clean_caption(text: str, max_words: int = 12) -> str:
    """A concept name from a caption: no URLs/markup/odd symbols, collapsed spaces, at most ``max_words``."""
    text = _TAG.sub(" ", _URL.sub(" ", text))
    text = _NONPRINT.sub(" ", text).replace("_", " ")
    words = text.split()[:max_words]
    name = " ".join(words).strip(" ,-/&'").lower()
    return name or "thing"


TEXT_SPECIAL_TOKENS = 2
"""Tokens the tokenizer adds around every text: SOS and EOT."""
NAME_SUFFIX_TOKENS = 1
"""Tokens after the name in a prompted class text ``"X .. X <name>."``: the ``.``
(:meth:`pipeline.prompts.PromptedCLIP.class_tokens`). CLIP's BPE splits punctuation from words before
merging, so the ``.`` is one token of its own after a cleaned name (which ends in a word character)."""


def name_token_budget(context_length: int, n_ctx_text: int) -> int:
    """Tokens a concept name may have so its prompted class text fits the text context untruncated:
    ``context_length - SOS/EOT - n_ctx_text placeholders - "."``. Exact for CLIP's BPE, which tokenizes
    the space-separated placeholders, the name and the ``.`` independently."""
    return context_length - TEXT_SPECIAL_TOKENS - n_ctx_text - NAME_SUFFIX_TOKENS


def token_counter(tokenizer) -> Callable[[str], int]:
    """``text -> number of tokens`` (SOS/EOT excluded) of an open_clip tokenizer: its ``encode`` (CLIP's
    BPE), or the wrapped Hugging Face tokenizer without special tokens."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        return lambda text: len(encode(text))
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None:
        return lambda text: len(hf(text, add_special_tokens=False)["input_ids"])
    raise TypeError(f"cannot count the tokens of a {type(tokenizer).__name__}")


def fit_name_to_tokens(name: str, count_tokens: Callable[[str], int], budget: int) -> str:
    """Drop trailing words until ``count_tokens(name) <= budget``; a single word still too long is cut
    character by character (a name of one 300-character word must fit too)."""
    words = name.split()
    while len(words) > 1 and count_tokens(" ".join(words)) > budget:
        words.pop()
    name = " ".join(words)
    while len(name) > 1 and count_tokens(name) > budget:
        name = name[:-1].rstrip()
    return name
