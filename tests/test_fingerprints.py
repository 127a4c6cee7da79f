"""Content binding of feature and assignment files (docs/ARCHITECTURE.md sections 4 and 9).

Assignments are looked up by (shard file name, key) and the shard writer numbers keys from 0, so every
freshly written shard set collides with every other one. These tests apply a clustering to another shard
set with the same names and keys and check it is refused, naming the shard: at start-up, and in the
stream for a shard the start-up spot check did not read, before any of its labels is used. Files written
before fingerprints are refused with a message saying what to re-run.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import cluster, extract, pretrain
from pipeline.config import BackboneConfig
from pipeline.data import task_checks
from pipeline.data.episodes import ConceptTable, EpisodeConfig
from pipeline.data.features import (
    ContentMismatch,
    ShardFeatures,
    read_assignments,
    read_features,
    read_marker,
    write_features,
)
from pipeline.data.shard_writer import Pair, write_shards
from pipeline.data.task_checks import check_task_data
from pipeline.data.task_stream import TaskDataConfig, slot_loader

from .helpers.tasks import content_digests, make_task_data, pretrain_overrides

EPISODES = EpisodeConfig(n_way=2, k_shot=2, q_query=2, p_cross_domain=0.5, buffer_per_concept=8)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """Minimal preprocess (module level so worker processes can pickle it)."""
    return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)


def other_shard_set(root: Path, like: dict) -> str:
    """Shards with the same file names and keys as ``like``'s (the writer numbers both from 0), other content."""
    rng = np.random.default_rng(1)
    pairs = []
    for i in range(like["n_samples"]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
        pairs.append(Pair(buf.getvalue(), f"an unrelated photo {i}"))
    report = write_shards(pairs, root / "shards", 12, image_format="keep")
    return str(root / "shards" / f"{{000000..{len(report.shards) - 1:06d}}}.tar")


@pytest.fixture()
def two_sets(tmp_path):
    a = make_task_data(tmp_path / "a")
    return a, other_shard_set(tmp_path / "b", a)


def test_start_up_check_refuses_a_clustering_of_another_shard_set(two_sets, tmp_path):
    a, b_urls = two_sets
    check_task_data(TaskDataConfig(urls=a["urls"], clusters_dir=a["clusters_dir"]), EPISODES)  # its own: fine
    foreign = TaskDataConfig(urls=b_urls, clusters_dir=a["clusters_dir"])
    with pytest.raises(ContentMismatch, match=r"shard .*/b/shards/000000\.tar: sample '000000000' is not the sample "
                                              r".*/a/clusters/assign/000000\.npz was computed from"):
        check_task_data(foreign, EPISODES)
    run = tmp_path / "run"  # through the command line: refused in preflight, before the run folder exists
    with pytest.raises(ContentMismatch, match=r"b/shards/000000\.tar"):
        pretrain.main(pretrain_overrides({**a, "urls": b_urls}, run))
    assert not run.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_refuses_a_foreign_shard_before_using_its_labels(two_sets, monkeypatch, workers):
    """Shard 3 replaced by the other set's shard 3 (same name, same keys 36..47). The spot check reads shard
    0 only here, so it passes; the stream raises at the first sample of shard 3, naming it, and no
    episode ever held one of its samples."""
    a, b_urls = two_sets
    shutil.copy(Path(b_urls).parent / "000003.tar", Path(a["urls"]).parent / "000003.tar")
    monkeypatch.setattr(task_checks, "SPOT_CHECK_SHARDS", 1)
    data = TaskDataConfig(urls=a["urls"], clusters_dir=a["clusters_dir"], workers=workers, shuffle_buffer=16,
                          shuffle_initial=4)
    check_task_data(data, EPISODES)
    episodes = 0
    with pytest.raises(ContentMismatch, match=r"a/shards/000003\.tar: sample '0000000(3[6-9]|4[0-7])'"):
        for episode, _ in slot_loader(data, EPISODES, to_tensor, seed=0, epoch=0, slot=0):
            assert all(int(k) < 36 for k in episode.support_keys + episode.query_keys)
            episodes += 1
    print(f"{episodes} episodes from the matching shards before the foreign one was read")


def test_assignment_files_without_fingerprints_are_refused(tmp_path):
    data = make_task_data(tmp_path)
    assign = Path(data["clusters_dir"]) / "assign"
    for path in assign.glob("*.npz"):  # the layout before fingerprints
        a = read_assignments(path)
        np.savez(path, keys=a.keys.astype(str), concept=a.concept)
    with pytest.raises(ContentMismatch, match=r"4 of the 4 assignment files .* were written before content "
                                              r"fingerprints \(000000.npz, 000001.npz, .*re-run `pipeline extract`"):
        check_task_data(TaskDataConfig(urls=data["urls"], clusters_dir=data["clusters_dir"]), EPISODES)
    url = str(Path(data["urls"]).parent / "000000.tar")
    with pytest.raises(ContentMismatch, match=r"000000\.tar: its assignment file .* before content fingerprints"):
        ConceptTable(data["clusters_dir"], 4).concept_of(url, "000000000", 0)


def test_an_altered_assignment_file_is_refused(tmp_path):
    data = make_task_data(tmp_path)
    path = Path(data["clusters_dir"]) / "assign" / "000001.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["digest"] = arrays["digest"][::-1].copy()  # digests moved between samples, fingerprint kept
    np.savez(path, **arrays)
    with pytest.raises(ContentMismatch, match=r"000001\.npz: its sample digests do not match its stored fingerprint"):
        check_task_data(TaskDataConfig(urls=data["urls"], clusters_dir=data["clusters_dir"]), EPISODES)


def test_cluster_refuses_feature_files_without_fingerprints(tmp_path):
    feats, out = tmp_path / "features", tmp_path / "clusters"
    vec = np.eye(8, dtype=np.float16)
    for s in range(2):  # written as before fingerprints: no digests
        write_features(feats, f"{s:06d}", ShardFeatures(np.array([f"{s}-{i}" for i in range(8)], dtype=object),
                                                        np.array([f"c {i}" for i in range(8)], dtype=object), vec, vec))
    args = [f"features_dir={feats}", f"out_dir={out}", "n_domains=1", "concepts_per_domain=2",
            "min_points_per_concept=2"]
    with pytest.raises(ContentMismatch, match=r"2 of the 2 feature files to assign .* \(000000, 000001\).*re-run "
                                              r"`pipeline extract` with the same urls and out_dir"):
        cluster.main(args)
    assert not (out / "hierarchy.npz").exists()  # refused before the fit
    assert cluster.main([*args, "mode=fit"]) == 0  # fitting binds nothing


def test_extract_cluster_pretrain_chain_binds_and_checks_content(two_sets, tmp_path):
    """The real chain: extraction records the digests the stream computes, clustering carries them into the
    assignments, the stream forms tasks from its own shards, and the other set is refused."""
    a, b_urls = two_sets
    feats, clusters = tmp_path / "features", tmp_path / "clusters"
    report = extract.run(extract.ExtractConfig(urls=a["urls"], out_dir=str(feats), batch_size=16, workers=0,
                                               cpu=True, backbone=BackboneConfig(arch="tiny-vit-s", pretrained="")))
    assert report["extracted"] == 4
    for s in range(4):
        f = read_features(feats / f"{s:06d}.npz")
        # extraction (decoded batches) and the raw reader agree on every sample's digest
        assert dict(zip(f.keys.tolist(), f.digest.tolist())) == content_digests(Path(a["urls"]).parent / f"{s:06d}.tar")
        assert read_marker(feats, f"{s:06d}")["fingerprint"] == f.fingerprint
    assert cluster.main([f"features_dir={feats}", f"out_dir={clusters}", "n_domains=1", "concepts_per_domain=3",
                         "min_points_per_concept=4"]) == 0
    for s in range(4):
        assert read_assignments(clusters / "assign" / f"{s:06d}.npz").fingerprint == \
            read_features(feats / f"{s:06d}.npz").fingerprint
    episodes = EpisodeConfig(n_way=2, k_shot=1, q_query=1, p_cross_domain=0.0, buffer_per_concept=4)
    data = TaskDataConfig(urls=a["urls"], clusters_dir=str(clusters), workers=0, shuffle_buffer=8, shuffle_initial=2)
    check_task_data(data, episodes)
    episode, counts = next(slot_loader(data, episodes, to_tensor, seed=0, epoch=0, slot=0))
    assert len(episode.support_keys) == 2 and counts["unassigned"] == 0
    with pytest.raises(ContentMismatch, match=r"b/shards/000000\.tar"):
        check_task_data(TaskDataConfig(urls=b_urls, clusters_dir=str(clusters)), episodes)
