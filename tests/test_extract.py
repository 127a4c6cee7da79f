"""Frozen-feature extraction: equals the backbone, idempotent, no partial output, array tasks."""

from __future__ import annotations

import dataclasses
import errno
import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import extract
from pipeline.config import BackboneConfig, ConfigError, load_config
from pipeline.data.features import finished_stems, read_features, read_marker, shard_state
from pipeline.data.shard_writer import Pair, write_shards

from .conftest import make_backbone
from .helpers.bad_shards import write_tar


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    bb = make_backbone("tiny-vit-s", seed=11)
    ckpt = root / "backbone.pt"
    torch.save(bb.model.state_dict(), ckpt)
    images = {f"{i:09d}": _png(i) for i in range(14)}
    write_shards((Pair(images[k], f"caption {i}") for i, k in enumerate(images)), root / "shards", 5,
                 image_format="keep")  # lossless PNG in the shard, so the reference sees the same pixels
    return root, bb, ckpt, images


def _cfg(root, ckpt, out="features", **kw):
    overrides = {"urls": str(root / "shards" / "{000000..000002}.tar"), "out_dir": str(root / out),
                 "batch_size": 4, "workers": 0, "cpu": True,
                 "backbone": BackboneConfig(arch="tiny-vit-s", pretrained=str(ckpt))}
    overrides.update(kw)
    return extract.ExtractConfig(**overrides)


def test_features_equal_the_backbone_and_rerun_skips(setup):
    root, bb, ckpt, images = setup
    cfg = _cfg(root, ckpt)
    report = extract.run(cfg)
    assert report["extracted"] == 3 and report["samples"] == 14
    assert finished_stems(cfg.out_dir) == ["000000", "000001", "000002"]
    f = read_features(root / "features" / "000001.npz")
    assert f.image.dtype == np.float16 and len(f) == 5
    pil = [Image.open(io.BytesIO(images[k])).convert("RGB") for k in f.keys]
    with torch.no_grad():
        ref_img = bb.model.encode_image(torch.stack([bb.preprocess_val(p) for p in pil]), normalize=True)
        ref_txt = bb.model.encode_text(bb.tokenizer(list(f.captions)), normalize=True)
    assert np.abs(f.image.astype(np.float32) - ref_img.numpy()).max() < 2e-3  # fp16 storage
    assert np.abs(f.text.astype(np.float32) - ref_txt.numpy()).max() < 2e-3
    assert [str(c) for c in f.captions] == [f"caption {int(k)}" for k in f.keys]
    again = extract.run(cfg)
    assert again["extracted"] == 0 and again["already_done"] == 3


def test_killed_task_leaves_no_partial_output(setup, monkeypatch):
    root, _, ckpt, _ = setup
    cfg = _cfg(root, ckpt, out="killed")
    real = extract.embed_shard
    calls = {"n": 0}

    def dies_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill mid-shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "embed_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg)
    out = root / "killed"
    assert finished_stems(out) == ["000000"]
    assert not (out / "000001.npz").exists() and not (out / "000001.done").exists()
    # a stale temp file from a SIGKILLed writer is ignored and cleaned up by the rerun
    (out / ".000001.999.tmp.npz").write_bytes(b"half a file")
    monkeypatch.setattr(extract, "embed_shard", real)
    report = extract.run(cfg)
    assert report["extracted"] == 2 and report["already_done"] == 1
    assert not list(out.glob(".*tmp*")) and finished_stems(out) == ["000000", "000001", "000002"]


def test_array_task_selection(setup, monkeypatch):
    root, _, ckpt, _ = setup
    urls = [s.split("/")[-1] for s in extract.select_shards(_cfg(root, ckpt, shard=1), 0, 1)]
    assert urls == ["000001.tar"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert [s.split("/")[-1] for s in extract.select_shards(_cfg(root, ckpt), 0, 1)] == ["000002.tar"]
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    both = [extract.select_shards(_cfg(root, ckpt), r, 2) for r in range(2)]
    assert sorted(both[0] + both[1]) == sorted(extract.select_shards(_cfg(root, ckpt), 0, 1))
    assert not set(both[0]) & set(both[1])
    with pytest.raises(ConfigError, match="past the 3 shards"):
        extract.select_shards(_cfg(root, ckpt, shard=3), 0, 1)


# ---------------------------------------------------------------------------------------------------------
# faults: truncated, unreadable and non-tar shards, full disks, huge captions, old files, worker counts


def _copy_shards(setup, tmp_path) -> Path:
    root = setup[0]
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    return shards


def test_truncated_shard_is_marked_incomplete_and_retried(setup, tmp_path):
    """The done marker records what was skipped; a rerun retries a shard read only up to a break."""
    _, _, ckpt, _ = setup
    shards = _copy_shards(setup, tmp_path)
    whole = (shards / "000001.tar").read_bytes()
    (shards / "000001.tar").write_bytes(whole[: len(whole) // 2])  # a download cut short
    out = tmp_path / "features"
    cfg = _cfg(tmp_path, ckpt, out=str(out), urls=str(shards / "{000000..000002}.tar"))
    with pytest.warns(UserWarning, match=r"000001.tar: read only up to a break"):
        report = extract.run(cfg)
    assert report["extracted"] == 3 and report["incomplete"] == 1 and report["bad_shard"] == 1
    marker = read_marker(out, "000001")
    assert marker["bad_shard"] == "1" and marker["complete"] == "0" and 0 < int(marker["samples"]) < 5
    assert read_marker(out, "000000")["complete"] == "1" and shard_state(out, "000001") == "incomplete"
    # asked to keep partial results: nothing is redone
    kept = extract.run(dataclasses.replace(cfg, retry_incomplete=False))
    assert kept["extracted"] == 0 and kept["already_done"] == 3
    # the shard was downloaded again: a plain rerun retries exactly that one, and it is complete now
    (shards / "000001.tar").write_bytes(whole)
    with pytest.warns(UserWarning, match=r"1 shards were read only in part last time.*000001.tar"):
        again = extract.run(cfg)
    assert again["extracted"] == 1 and again["already_done"] == 2 and again["incomplete"] == 0
    assert read_marker(out, "000001")["complete"] == "1" and len(read_features(out / "000001.npz")) == 5
    assert shard_state(out, "000001") == "done"


def test_a_huge_caption_does_not_inflate_feature_or_assignment_files(setup, tmp_path):
    """One 1 MB caption made a 14-sample feature file ~60 MB (fixed-width strings); now the size follows the text."""
    _, _, ckpt, images = setup
    huge = "a very long caption " * 52_429  # 1 MiB of text
    captions = [huge if i == 3 else f"caption {i}" for i in range(len(images))]
    write_tar(tmp_path / "000000.tar", [{"__key__": k, "png": images[k], "txt": c.encode()}
                                        for k, c in zip(images, captions)])
    out = tmp_path / "features"
    report = extract.run(_cfg(tmp_path, ckpt, out=str(out), urls=str(tmp_path / "000000.tar")))
    assert report["samples"] == len(images)
    path = out / "000000.npz"
    assert path.stat().st_size < len(huge) + 200_000, path.stat().st_size
    f = read_features(path)
    assert f.captions.tolist() == [c.strip() for c in captions] and f.keys.tolist() == list(images)
    from pipeline.data.features import Assignments, read_assignments, write_assignments

    n = len(f)
    assign = write_assignments(tmp_path / "assign.npz", Assignments(f.keys, f.captions, np.zeros(n, int),
                                                                    np.zeros(n, int), np.ones(n), f.digest))
    assert assign.stat().st_size < len(huge) + 100_000
    assert read_assignments(assign).captions.tolist() == f.captions.tolist()


def test_feature_files_of_the_older_layout_still_load_and_are_redone(setup, tmp_path):
    """Files written before fingerprints (fixed-width strings, no digests) load; extraction re-embeds them so
    the clustering can be bound to the content."""
    _, _, ckpt, _ = setup
    shards = _copy_shards(setup, tmp_path)
    out = tmp_path / "features"
    out.mkdir()
    vec = np.eye(5, 8, dtype=np.float16)
    keys, caps = np.array([f"{i:09d}" for i in range(5)]), np.array([f"caption {i}" for i in range(5)])
    np.savez(out / "000000.npz", keys=keys, captions=caps, image=vec, text=vec)  # the layout before
    (out / "000000.done").write_text("5\nsamples=5\nshards=1\nbad_shard=0\nseconds=0.1\n")
    old = read_features(out / "000000.npz")
    assert old.keys.tolist() == keys.tolist() and old.captions.tolist() == caps.tolist() and old.fingerprint is None
    assert shard_state(out, "000000") == "stale"
    cfg = _cfg(tmp_path, ckpt, out=str(out), urls=str(shards / "000000.tar"))
    with pytest.warns(UserWarning, match="written before content fingerprints"):
        report = extract.run(cfg)
    assert report["extracted"] == 1
    new = read_features(out / "000000.npz")
    assert new.fingerprint is not None and read_marker(out, "000000")["fingerprint"] == new.fingerprint


@pytest.mark.parametrize("where", ["features", "marker"])
def test_a_full_disk_leaves_nothing_behind(setup, tmp_path, monkeypatch, where):
    """ENOSPC while writing a shard's features or its done marker: the run stops naming the shard, and
    neither a temp file nor a feature file without its marker is left (a rerun redoes the shard)."""
    _, _, ckpt, _ = setup
    import pipeline.data.features as features

    def full(*args, **kwargs):
        if where == "features":  # some bytes reach the temp file first, as on a real disk
            args[0].write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "features":
        monkeypatch.setattr(features.np, "savez", full)
    else:
        monkeypatch.setattr(features, "atomic_write_text", full)
    out = tmp_path / "features"
    cfg = _cfg(tmp_path, ckpt, out=str(out), urls=str(_copy_shards(setup, tmp_path) / "000000.tar"))
    with pytest.raises(OSError) as e:
        extract.run(cfg)
    assert e.value.errno == errno.ENOSPC and "000000.tar" in "".join(getattr(e.value, "__notes__", []))
    assert sorted(p.name for p in out.iterdir()) == []
    monkeypatch.undo()
    assert extract.run(cfg)["extracted"] == 1  # the rerun continues from that shard


def test_unreadable_and_non_tar_shards_count_as_bad_shard_with_few_warnings(setup, tmp_path):
    """A file that is not a tar is a bad_shard (it was only counted as failed); eight of them give the first
    few warnings by name and one count, not a line each (and none from the reader)."""
    _, _, ckpt, _ = setup
    shards = _copy_shards(setup, tmp_path)
    for i in range(3, 11):
        (shards / f"{i:06d}.tar").write_bytes(b"this is not a tar file" * 40)
    cfg = _cfg(tmp_path, ckpt, out=str(tmp_path / "features"), urls=str(shards / "{000000..000010}.tar"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = extract.run(cfg)
    assert report["failed"] == 8 and report["bad_shard"] == 8 and report["extracted"] == 3
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    named = [m for m in messages if "unreadable: no features written" in m]
    assert len(named) == 5 and len(messages) == 6, messages
    assert "8 shards were unreadable or read only in part" in messages[-1] and "and 3 more" in messages[-1]
    assert not list((tmp_path / "features").glob("000003.*"))  # no features and no marker: a rerun retries


def test_more_workers_than_extraction_can_use_are_refused(tmp_path):
    """workers=4 was silently capped to 1; now it is a ConfigError naming the key (0 and 1 are fine)."""
    with pytest.raises(ConfigError, match=r"workers=4: extraction embeds one shard at a time"):
        load_config(extract.ExtractConfig, None, ["urls=a.tar", "workers=4"])
    for ok in ("0", "1"):
        assert load_config(extract.ExtractConfig, None, ["urls=a.tar", f"workers={ok}"]).workers == int(ok)
