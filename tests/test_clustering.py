"""Cross-modal hierarchical clustering: planted structure is recovered; the CLI is array-job friendly."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline import cluster
from pipeline.backbone import register_tiny_archs
from pipeline.config import ConfigError, PromptConfig, load_config
from pipeline.data.clustering import (
    Hierarchy,
    clean_caption,
    fit_hierarchy,
    fit_name_to_tokens,
    name_token_budget,
    token_counter,
)
from pipeline.data.features import (
    ShardFeatures,
    finished_stems,
    read_assignments,
    read_features,
    write_features,
)
from pipeline.data.sample_checks import sample_digest
from pipeline.prompts import PromptedCLIP

# A web caption of 300 characters: a URL (removed), then long made-up words of many BPE tokens each.
LONG_CAPTION = ("https://cdn.example.com/img/0042.jpg Vintage " + " ".join(
    f"zanzibarkilimanjaro{i}expedition" for i in range(20)))[:300]


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
    assert fit_name_to_tokens("abcdefgh", len, budget=3) == "abc"  # one overlong word is cut too


def _assert_longest_fitting_prefix(name: str, words: str, count, budget: int) -> None:
    """``name`` is the leading words of ``words``, and one more word would exceed ``budget``."""
    n = len(name.split())
    assert words.split()[:n] == name.split()
    assert count(" ".join(words.split()[: n + 1])) > budget


def test_long_caption_name_fits_the_prompted_text_context(tiny_backbone_s):
    """A 300-character caption becomes a name whose prompted class text "X X X X <name>." tokenizes
    whole: every token of the name, then ".", then EOT, inside the context (nothing truncated)."""
    model = PromptedCLIP(tiny_backbone_s, PromptConfig(type="ivlp", depth_text=2, depth_vision=2))
    cfg = load_config(cluster.ClusterConfig, None, ["name_tokenizer=tiny-vit-s",
                                                    f"name_prompt_tokens={model.n_ctx_text}"])
    tokenizer, count = model.tokenizer, token_counter(model.tokenizer)
    budget = name_token_budget(model.context_length, model.n_ctx_text)
    assert len(LONG_CAPTION) == 300
    words = clean_caption(LONG_CAPTION, cfg.name_max_words)
    assert count(words) > model.context_length  # cut by words only, it would not fit at all
    name = cluster.name_fitter(cfg)(LONG_CAPTION)
    assert name and count(name) <= budget
    _assert_longest_fitting_prefix(name, words, count, budget)
    ids = model.class_tokens([name])[0][0].tolist()  # [L]
    eot = ids.index(tokenizer.eot_token_id)
    assert eot <= model.context_length - 1
    start = 1 + model.n_ctx_text  # after SOS and the placeholders
    assert ids[start:eot] == tokenizer.encode(name) + tokenizer.encode(".")
    # what the budget prevents: the words-only name loses its tail and the "." to truncation
    cut = model.tokenizer([f"{' '.join(['X'] * model.n_ctx_text)} {words}."])[0].tolist()
    assert tokenizer.encode(".")[0] not in cut


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


def test_cli_fits_names_to_the_token_budget_and_summarize_refits_them(tmp_path):
    image, text, captions, *_ = planted(seed=3, domains=2, concepts=2, per=20)
    feats = _write_shards(tmp_path, image, text, [f"{LONG_CAPTION} {i}" for i in range(len(captions))])
    out = tmp_path / "clusters"
    common = [f"features_dir={feats}", f"out_dir={out}", "n_domains=2", "concepts_per_domain=2",
              "name_tokenizer=tiny-vit-s"]
    register_tiny_archs()
    tokenizer = open_clip.get_tokenizer("tiny-vit-s")
    count = token_counter(tokenizer)
    for prompt_tokens, mode in ((4, "all"), (12, "summarize")):  # a longer prompt: only summarize again
        assert cluster.main([*common, f"name_prompt_tokens={prompt_tokens}", f"mode={mode}"]) == 0
        names = [c["name"] for c in json.loads((out / "concepts.json").read_text())]
        budget = name_token_budget(tokenizer.context_length, prompt_tokens)
        # hierarchy.npz keeps the cleaned medoid captions (words only); concepts.json the fitted names
        medoids = Hierarchy.load(out / "hierarchy.npz").names
        assert len(names) == len(medoids) == 4
        for name, medoid in zip(names, medoids):
            assert count(medoid) > budget >= count(name) > 0
            _assert_longest_fitting_prefix(name, medoid, count, budget)
    with pytest.raises(ConfigError, match="name_tokenizer='ViT-Nope'"):
        load_config(cluster.ClusterConfig, None, ["name_tokenizer=ViT-Nope"])
    with pytest.raises(ConfigError, match="name_prompt_tokens=30"):
        load_config(cluster.ClusterConfig, None, ["name_tokenizer=tiny-vit-s", "name_prompt_tokens=30"])


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="no finished feature files"):
        cluster.main([f"features_dir={tmp_path}"])
    image, text, captions, *_ = planted(per=2, domains=1, concepts=2)
    feats = _write_shards(tmp_path, image, text, captions, n_shards=1)
    with pytest.raises(Exception, match="n_domains=50"):
        cluster.main([f"features_dir={feats}", f"out_dir={tmp_path / 'o'}", "n_domains=50"])
    with pytest.raises(Exception, match="mode"):
        cluster.main([f"features_dir={feats}", "mode=everything"])
