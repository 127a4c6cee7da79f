"""Frozen-feature extraction: equals the backbone, idempotent, no partial output, array tasks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import extract
from pipeline.config import BackboneConfig, ConfigError
from pipeline.data.features import finished_stems, read_features
from pipeline.data.shard_writer import Pair, write_shards

from .conftest import make_backbone


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
