"""Cross-modal hierarchical clustering: planted structure is recovered; the CLI is array-job friendly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline import cluster
from pipeline.data.clustering import Hierarchy, clean_caption, fit_hierarchy, fit_name_to_tokens
from pipeline.data.features import (
    ShardFeatures,
    finished_stems,
    read_assignments,
    read_features,
    write_features,
)
from pipeline.data.sample_checks import sample_digest


def planted(seed=0, domains=4, concepts=5, per=40, d=32):
    """Blobs: domains separate in caption space; concepts separate in the joint space inside a domain.

    Concepts of one domain share the domain's caption centre (plus a small offset), so domains are only
    recoverable from captions and concepts need the image half of the joint embedding.
    """
    rng = np.random.default_rng(seed)
    dom_centre = rng.normal(size=(domains, d)) * 3
    img_centre = rng.normal(size=(domains, concepts, d)) * 3
    image, text, yd, yc = [], [], [], []
    for a in range(domains):
        for b in range(concepts):
            text.append(dom_centre[a] + rng.normal(size=(per, d)) * 0.4)
            image.append(img_centre[a, b] + rng.normal(size=(per, d)) * 0.6)
            yd += [a] * per
            yc += [a * concepts + b] * per
    captions = [f"domain {a} concept {c} photo number {i}" for i, (a, c) in enumerate(zip(yd, yc))]
    return np.concatenate(image), np.concatenate(text), captions, np.array(yd), np.array(yc)


def test_planted_structure_is_recovered():
    image, text, captions, yd, yc = planted()
    h = fit_hierarchy(image, text, captions, n_domains=4, concepts_per_domain=5)
    domain, concept, sim = h.assign(image, text)
    ari_d, ari_c = adjusted_rand_score(yd, domain), adjusted_rand_score(yc, concept)
    print(f"ARI domains {ari_d:.3f} concepts {ari_c:.3f}")
    assert ari_d >= 0.9 and ari_c >= 0.9
    # concepts live inside their domain; names are medoid captions of that concept
    assert np.all(h.concept_domain[concept] == domain)
    for c, name in enumerate(h.names):
        members = yc[concept == c]
        assert name.startswith(f"domain {yd[concept == c][0]} concept {np.bincount(members).argmax()} ")


def test_caption_only_clustering_cannot_split_concepts():
    """Sanity check of the planted data: the joint embedding is what separates concepts."""
    image, text, captions, yd, yc = planted(seed=1)
    h = fit_hierarchy(np.zeros_like(image) + 1.0, text, captions, 4, 5)
    _, concept, _ = h.assign(np.zeros_like(image) + 1.0, text)
    assert adjusted_rand_score(yc, concept) < 0.6


def test_small_domains_get_fewer_concepts():
    image, text, captions, *_ = planted(per=6, concepts=2)
    h = fit_hierarchy(image, text, captions, 4, concepts_per_domain=10, min_points_per_concept=4)
    assert all(np.sum(h.concept_domain == d) <= 12 // 4 for d in range(4))


def test_names():
    assert clean_caption("Check <b>THIS</b> out: https://x.y/z.jpg   a Red Car!!! #1") == "check this out a red car 1"
    assert clean_caption("☺☺☺") == "thing"
    assert clean_caption(" ".join(["w"] * 30), max_words=5) == "w w w w w"
    assert fit_name_to_tokens("a b c d e f", lambda s: len(s.split()) * 2, budget=6) == "a b c"


def _write_shards(tmp_path, image, text, captions, n_shards=3, digests=True):
    """Feature files as ``pipeline extract`` writes them (``digests=False``: as before content fingerprints)."""
    feats = tmp_path / "features"
    for s, rows in enumerate(np.array_split(np.arange(len(image)), n_shards)):
        caps = np.array([captions[i] for i in rows], dtype=object)
        digest = np.array([sample_digest(c, 1000 + i) for c, i in zip(caps, rows)], dtype=np.uint64)
        write_features(feats, f"{s:06d}", ShardFeatures(
            np.array([f"{s}-{i}" for i in rows], dtype=object), caps,
            image[rows].astype(np.float16), text[rows].astype(np.float16), digest if digests else None))
    return feats


def test_cli_all_and_array_modes_agree(tmp_path):
    image, text, captions, yd, yc = planted(seed=2)
    feats = _write_shards(tmp_path, image, text, captions)
    (feats / "000009.npz").write_bytes(b"partial")  # no done marker: ignored
    assert finished_stems(feats) == ["000000", "000001", "000002"]
    common = [f"features_dir={feats}", "n_domains=4", "concepts_per_domain=5", "min_points_per_concept=4"]
    assert cluster.main([*common, f"out_dir={tmp_path / 'a'}"]) == 0
    out = tmp_path / "a"
    concepts = json.loads((out / "concepts.json").read_text())
    assert sum(c["size"] for c in concepts) == len(image) and len(concepts) == 20
    assert (out / "concept_sizes.png").stat().st_size > 0 and "| concept |" in (out / "summary.md").read_text()
    # array style: fit once, one assign task per shard, then summarise
    b = tmp_path / "b"
    assert cluster.main([*common, f"out_dir={b}", "mode=fit"]) == 0
    for i in range(3):
        assert cluster.main([*common, f"out_dir={b}", "mode=assign", f"shard={i}"]) == 0
    assert cluster.main([*common, f"out_dir={b}", "mode=summarize"]) == 0
    for s in range(3):
        za, zb = read_assignments(out / "assign" / f"{s:06d}.npz"), read_assignments(b / "assign" / f"{s:06d}.npz")
        assert np.array_equal(za.concept, zb.concept) and np.array_equal(za.keys, zb.keys)
        # the assignments carry the content binding of the feature file they were computed from
        assert za.fingerprint == read_features(feats / f"{s:06d}.npz").fingerprint is not None
    h = Hierarchy.load(b / "hierarchy.npz")
    assert h.n_domains == 4 and len(h.names) == h.n_concepts


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="no finished feature files"):
        cluster.main([f"features_dir={tmp_path}"])
    image, text, captions, *_ = planted(per=2, domains=1, concepts=2)
    feats = _write_shards(tmp_path, image, text, captions, n_shards=1)
    with pytest.raises(Exception, match="n_domains=50"):
        cluster.main([f"features_dir={feats}", f"out_dir={tmp_path / 'o'}", "n_domains=50"])
    with pytest.raises(Exception, match="mode"):
        cluster.main([f"features_dir={feats}", "mode=everything"])
