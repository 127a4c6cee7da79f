"""Episode sampler over the concept clustering: disjoint support/query, labels, K/Q, seeds, rates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.episodes import ConceptTable, EpisodeConfig, EpisodeSampler
from pipeline.data.features import Assignments, write_assignments
from pipeline.data.sample_checks import sample_digest


def _digest(key: str) -> int:
    """The content digest the fake samples carry (caption = key, no image bytes)."""
    return sample_digest(key, 0)


def fake_clusters(tmp_path, domains=3, concepts=6, per=30, shards=4, small=()):
    """concepts.json + assign/<shard>.npz for domains x concepts, `per` samples each (fewer for `small`)."""
    rows, concepts_json = [], []
    for d in range(domains):
        for c in range(concepts):
            cid = d * concepts + c
            size = 3 if cid in small else per
            concepts_json.append({"id": cid, "domain": d, "name": f"concept {cid}", "size": size, "examples": []})
            rows += [(f"k{cid}-{i}", cid) for i in range(size)]
    (tmp_path / "assign").mkdir(parents=True)
    (tmp_path / "concepts.json").write_text(json.dumps(concepts_json))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    for s, part in enumerate(np.array_split(order, shards)):
        keys = np.array([rows[i][0] for i in part], dtype=object)
        concept = np.array([rows[i][1] for i in part])
        write_assignments(tmp_path / "assign" / f"{s:06d}.npz", Assignments(
            keys, keys, concept // concepts, concept, np.ones(len(keys), np.float32),
            np.array([_digest(k) for k in keys], dtype=np.uint64)))
    stream = [{"key": rows[i][0], "url": f"/data/{s:06d}.tar", "concept": rows[i][1], "digest": _digest(rows[i][0])}
              for s, part in enumerate(np.array_split(order, shards)) for i in part]
    return stream


def samples(stream, repeats=1, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        for i in rng.permutation(len(stream)):
            item = dict(stream[i])
            # the image encodes its concept so tests can check labels against pixels
            item["image"] = torch.full((3, 4, 4), float(item["concept"]))
            yield item


def run(tmp_path, cfg, seed, repeats=2, **kw):
    stream = fake_clusters(tmp_path, **kw)
    table = ConceptTable(tmp_path, min_size=cfg.k_shot + cfg.q_query)
    return list(EpisodeSampler(table, cfg, seed)(samples(stream, repeats, seed=seed))), table


def test_episode_structure(tmp_path):
    cfg = EpisodeConfig(n_way=3, k_shot=2, q_query=3, p_cross_domain=0.5)
    episodes, table = run(tmp_path, cfg, seed=1)
    assert len(episodes) > 20
    name_to_id = {v: k for k, v in table.name.items()}
    for ep in episodes:
        n = cfg.n_way
        assert ep.support_images.shape == (n * cfg.k_shot, 3, 4, 4) and ep.query_images.shape[0] == n * cfg.q_query
        assert torch.equal(torch.bincount(ep.support_labels, minlength=n), torch.full((n,), cfg.k_shot))
        assert set(ep.support_keys).isdisjoint(ep.query_keys)
        assert len(set(ep.support_keys)) == len(ep.support_keys) and len(set(ep.query_keys)) == len(ep.query_keys)
        expected_classes = 2 * n if ep.cross_domain else n
        assert len(ep.classnames) == expected_classes == len(set(ep.classnames))
        lo = n if ep.cross_domain else 0
        assert torch.equal(torch.bincount(ep.query_labels - lo, minlength=n), torch.full((n,), cfg.q_query))
        # labels agree with the class texts: each image's concept is the concept named by its label
        for imgs, labels in ((ep.support_images, ep.support_labels), (ep.query_images, ep.query_labels)):
            for img, lab in zip(imgs, labels):
                assert int(img[0, 0, 0]) == name_to_id[ep.classnames[lab]]
        # support concepts share one domain; a cross-domain query comes from another one
        domains = {table.domain[name_to_id[c]] for c in ep.classnames[:n]}
        assert domains == {ep.domains[0]}
        if ep.cross_domain:
            assert {table.domain[name_to_id[c]] for c in ep.classnames[n:]} == {ep.domains[1]} != domains


def test_same_seed_same_episodes(tmp_path):
    cfg = EpisodeConfig(n_way=2, k_shot=2, q_query=2)
    a, _ = run(tmp_path / "a", cfg, seed=3)
    b, _ = run(tmp_path / "b", cfg, seed=3)
    c, _ = run(tmp_path / "c", cfg, seed=4)
    assert [e.support_keys + e.query_keys for e in a] == [e.support_keys + e.query_keys for e in b]
    assert [e.support_keys for e in a] != [e.support_keys for e in c]


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_cross_domain_rate(tmp_path, p):
    cfg = EpisodeConfig(n_way=2, k_shot=1, q_query=1, p_cross_domain=p)
    episodes, _ = run(tmp_path, cfg, seed=0, repeats=6, per=20)
    rate = np.mean([e.cross_domain for e in episodes])
    tol = 4 * np.sqrt(max(p * (1 - p), 1e-9) / len(episodes)) + 1e-9
    print(f"p={p}: {len(episodes)} episodes, cross-domain rate {rate:.3f} (tolerance {tol:.3f})")
    assert abs(rate - p) <= tol


def test_small_concepts_are_excluded_and_counted(tmp_path):
    cfg = EpisodeConfig(n_way=2, k_shot=2, q_query=2, p_cross_domain=0.0)
    episodes, table = run(tmp_path, cfg, seed=0, small=(0, 1))
    assert 0 not in table.eligible and 1 not in table.eligible
    assert not any({"concept 0", "concept 1"} & set(e.classnames) for e in episodes)


def test_impossible_tasks_fail_before_sampling(tmp_path):
    fake_clusters(tmp_path, domains=2, concepts=3)
    table = ConceptTable(tmp_path, min_size=4)
    with pytest.raises(ConfigError, match="n_way=5"):
        EpisodeSampler(table, EpisodeConfig(n_way=5, k_shot=2, q_query=2), seed=0)
    single = tmp_path / "single"
    fake_clusters(single, domains=1, concepts=4)
    with pytest.raises(ConfigError, match="p_cross_domain"):
        EpisodeSampler(ConceptTable(single, 4), EpisodeConfig(n_way=2, k_shot=2, q_query=2, p_cross_domain=0.2), 0)
    with pytest.raises(ConfigError, match="buffer_per_concept"):
        EpisodeConfig(k_shot=20, q_query=20).validate()


class _CountingRng:
    """Wraps the sampler's generator and records the ``size`` of every ``choice`` draw."""

    def __init__(self, rng):
        self.rng, self.sizes = rng, []

    def random(self):
        return self.rng.random()

    def choice(self, a, size=None, replace=True):
        self.sizes.append(size)
        return self.rng.choice(a, size=size, replace=replace)


def test_same_domain_tasks_use_every_draw(tmp_path):
    """A same-domain task draws its domain, its concepts, and one K + Q pick per concept: nothing else
    (a K and a Q pick per concept, drawn and then discarded, used to shift the stream)."""
    cfg = EpisodeConfig(n_way=3, k_shot=2, q_query=2, p_cross_domain=0.0)
    stream = fake_clusters(tmp_path)
    sampler = EpisodeSampler(ConceptTable(tmp_path, min_size=cfg.k_shot + cfg.q_query), cfg, seed=0)
    sampler.rng = counting = _CountingRng(sampler.rng)
    episodes = list(sampler(samples(stream, repeats=2)))
    assert len(episodes) > 20
    per_task = [None, cfg.n_way] + [cfg.k_shot + cfg.q_query] * cfg.n_way  # domain, concepts, picks
    assert counting.sizes == per_task * len(episodes)
