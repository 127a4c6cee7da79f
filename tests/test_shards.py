"""Streaming shard reader: exact single pass over ranks x workers, epoch sizes, bad data, sources."""

from __future__ import annotations

import io
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data.config import ShardDataConfig
from pipeline.data.shard_writer import Pair, write_shards
from pipeline.data.shards import build_shard_loader


def _jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(out: Path, n: int, per_shard: int, tag: str = "") -> list[str]:
    report = write_shards((Pair(_jpeg(i), f"{tag}caption number {i}") for i in range(n)), out, per_shard)
    assert report.total == n
    return [f"{i:09d}" for i in range(n)]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> tuple[str, list[str]]:
    out = tmp_path_factory.mktemp("shards")
    keys = _write(out, 45, 5)  # 9 shards: not a multiple of 2 ranks x 2 workers on purpose
    return str(out / "{000000..000008}.tar"), keys


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_single_pass_reads_every_sample_exactly_once_over_2_ranks_x_2_workers(shard_set):
    urls, keys = shard_set
    cfg = ShardDataConfig(urls=urls, resampled=False, batch_size=4, workers=2, shuffle_buffer=0)
    per_rank = []
    for rank in range(2):
        loader = build_shard_loader(cfg, rank=rank, world_size=2)
        per_rank.append(_keys(loader))
        assert loader.stats["samples"] == len(per_rank[-1])
        assert loader.stats["shards"] == (5 if rank == 0 else 4)
    seen = Counter(per_rank[0] + per_rank[1])
    assert sorted(seen) == keys
    assert set(seen.values()) == {1}
    assert not set(per_rank[0]) & set(per_rank[1])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("workers", [2, 3])
def test_resampled_every_rank_yields_the_configured_number_of_full_batches(shard_set, workers):
    urls, _ = shard_set
    cfg = ShardDataConfig(urls=urls, resampled=True, epoch_samples=50, batch_size=4, workers=workers,
                          shuffle_buffer=8, shuffle_initial=4)
    for rank in range(2):
        loader = build_shard_loader(cfg, rank=rank, world_size=2)
        sizes = [len(b["key"]) for b in loader]
        assert len(loader) == 7  # ceil(50 / (4 * 2))
        assert sizes == [4] * 7


def test_resampling_is_seeded_by_epoch_and_rank(shard_set):
    urls, _ = shard_set
    cfg = ShardDataConfig(urls=urls, resampled=True, epoch_samples=24, batch_size=4, workers=0, shuffle_buffer=6)
    a, b = build_shard_loader(cfg, 0, 2), build_shard_loader(cfg, 0, 2)
    assert _keys(a) == _keys(b)
    first = _keys(a)
    a.set_epoch(1)
    assert _keys(a) != first
    assert _keys(build_shard_loader(cfg, 1, 2)) != first


def test_weighted_sources(tmp_path):
    _write(tmp_path / "a", 8, 2, tag="A ")
    _write(tmp_path / "b", 8, 2, tag="B ")
    urls = f"{tmp_path}/a/{{000000..000003}}.tar::{tmp_path}/b/{{000000..000003}}.tar"
    cfg = ShardDataConfig(urls=urls, weights="3::1", resampled=True, epoch_samples=600, batch_size=10,
                          workers=0, shuffle_buffer=0)
    captions = [c for b in build_shard_loader(cfg) for c in b["caption"]]
    frac_a = sum(c.startswith("A ") for c in captions) / len(captions)
    assert len(captions) == 600
    assert 0.65 < frac_a < 0.85  # 300 shard draws at p=0.75: +-0.1 is > 3 standard deviations


def test_pipe_urls_and_preprocessing_with_tokenizer(shard_set):
    from pipeline.backbone import load_backbone
    from pipeline.config import BackboneConfig

    urls, keys = shard_set
    bb = load_backbone(BackboneConfig(arch="tiny-vit", pretrained=""))
    cfg = ShardDataConfig(urls=f"pipe:cat {urls}", resampled=False, batch_size=8, workers=0, shuffle_buffer=0)
    batches = list(build_shard_loader(cfg, preprocess=bb.preprocess_val, tokenizer=bb.tokenizer))
    assert [k for b in batches for k in b["key"]] == keys
    assert batches[0]["image"].shape == (8, 3, 32, 32)
    assert batches[0]["text"].shape == (8, 32)
    assert batches[-1]["image"].shape[0] == 45 - 5 * 8  # the last partial batch is kept


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _raw_tar(path: Path, samples: list[dict[str, bytes]]) -> list[tuple[str, int]]:
    """Write samples ({"__key__", ext: bytes}); return (key, header offset of its first member)."""
    starts = []
    with tarfile.open(path, "w") as tar:
        for s in samples:
            starts.append((s["__key__"], tar.offset))
            for ext, data in s.items():
                if ext != "__key__":
                    _add(tar, f"{s['__key__']}.{ext}", data)
    return starts


def _good(key: str, seed: int) -> dict[str, bytes]:
    return {"__key__": key, "jpg": _jpeg(seed), "txt": f"a good caption {key}".encode()}


def _truncated(path: Path, prefix: str, cut_in: str) -> set[str]:
    """A 6-sample tar cut inside sample 3's image data (``mid``) or right after sample 3 (``boundary``).

    Returns the keys a correct reader delivers: those whose successor's header lies before the cut.
    """
    samples = [_good(f"{prefix}{i}", 100 + i) for i in range(6)]
    starts = _raw_tar(path, samples)
    data = path.read_bytes()
    cut = starts[3][1] + 512 + 100 if cut_in == "mid" else starts[4][1]
    path.write_bytes(data[:cut])
    return {key for (key, _), (_, nxt) in zip(starts, starts[1:]) if nxt + 512 <= cut}


@pytest.fixture
def bad_shards(tmp_path) -> tuple[str, set[str], dict[str, int]]:
    good: set[str] = set()
    s0 = [_good(f"a{i}", i) for i in range(5)]
    _raw_tar(tmp_path / "000000.tar", s0)
    good |= {s["__key__"] for s in s0}
    s1 = [
        _good("b0", 10),
        {"__key__": "b1", "jpg": b"\xff\xd8 this is not a jpeg", "txt": b"undecodable image"},
        {"__key__": "b2", "jpg": _jpeg(12), "txt": b"   \n"},  # empty caption
        {"__key__": "b3", "jpg": _jpeg(13), "json": b"{}"},  # no caption at all
        {"__key__": "b4", "txt": b"a caption without an image"},
        _good("b5", 15),
    ]
    _raw_tar(tmp_path / "000001.tar", s1)
    good |= {"b0", "b5"}
    good |= _truncated(tmp_path / "000002.tar", "c", "mid")
    good |= _truncated(tmp_path / "000003.tar", "d", "boundary")
    (tmp_path / "000004.tar").write_bytes(b"garbage, not a tar archive" * 40)
    # 000005.tar does not exist at all
    planted = {"bad_image": 1, "empty_caption": 1, "missing_caption": 1, "missing_image": 1, "bad_shard": 4}
    return str(tmp_path / "{000000..000005}.tar"), good, planted


def test_truncation_fixture_keeps_what_it_should(tmp_path):
    assert _truncated(tmp_path / "m.tar", "m", "mid") == {"m0", "m1", "m2"}
    assert _truncated(tmp_path / "b.tar", "b", "boundary") == {"b0", "b1", "b2"}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_data_is_skipped_and_counted(bad_shards, workers):
    urls, good, planted = bad_shards
    cfg = ShardDataConfig(urls=urls, resampled=False, batch_size=3, workers=workers, shuffle_buffer=0)
    loader = build_shard_loader(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = _keys(loader)
    assert sorted(keys) == sorted(good)
    assert loader.skip_counts == planted
    assert loader.stats["samples"] == len(good)
    assert loader.stats["shards"] == 6
    if workers == 0:  # warnings raised inside worker processes stay there
        messages = [str(w.message) for w in caught]
        assert sum("skipping" in m for m in messages) == 4, messages


def test_resampled_gives_up_when_no_shard_is_usable(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"not a tar")
    cfg = ShardDataConfig(urls=str(tmp_path / "000000.tar"), resampled=True, epoch_samples=8, batch_size=4,
                          workers=0, shuffle_buffer=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no usable sample"):
            list(build_shard_loader(cfg))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"urls": ""}, "data.urls"),
        ({"urls": "a.tar", "epoch_samples": 0}, "data.epoch_samples"),
        ({"urls": "a.tar::b.tar", "weights": "1", "epoch_samples": 4}, "data.weights"),
        ({"urls": "a.tar", "batch_size": 0, "epoch_samples": 4}, "data.batch_size"),
    ],
)
def test_invalid_configs_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        build_shard_loader(ShardDataConfig(**kwargs))


def test_rank_out_of_range(shard_set):
    with pytest.raises(ValueError, match="rank"):
        build_shard_loader(ShardDataConfig(urls=shard_set[0], resampled=False), rank=2, world_size=2)


def _warnings_of(call) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


@pytest.mark.parametrize("resampled", [False, True], ids=["single_pass", "resampled"])
def test_many_missing_shards_give_a_few_warning_lines_and_exact_counts(tmp_path, resampled):
    """40 of 41 shards missing: the reader names the first 5 and says once that it only counts the rest
    (it printed a line per shard, and per reopening when resampled); bad_shard stays exact."""
    _write(tmp_path, 4, 4)  # 000000.tar; 000001..000040 do not exist
    urls = str(tmp_path / "{000000..000040}.tar")
    cfg = ShardDataConfig(urls=urls, resampled=resampled, epoch_samples=8, batch_size=4, workers=0, shuffle_buffer=0)
    loader = build_shard_loader(cfg)
    keys, messages = _warnings_of(lambda: _keys(loader))
    named = [m for m in messages if m.startswith("skipping unreadable shard")]
    assert len(named) == 5 and len(messages) == 6, messages
    assert "further ones are skipped without a warning and counted under bad_shard" in messages[-1]
    if resampled:  # every opening of a missing shard is counted, named or not
        assert len(keys) == 8 and loader.stats["bad_shard"] > 5
    else:
        assert sorted(keys) == [f"{i:09d}" for i in range(4)] and loader.stats["bad_shard"] == 40


def test_start_up_url_check_gives_one_line_over_every_source(tmp_path):
    """Missing shards in two sources: one warning naming the first 5 and counting the rest (was: one line per
    source, each naming only the first)."""
    from pipeline.data.sources import check_shard_urls

    for folder in ("a", "b"):
        _write(tmp_path / folder, 2, 1)  # 000000.tar and 000001.tar exist; up to 000499 do not
    urls = f"{tmp_path / 'a'}/{{000000..000499}}.tar::{tmp_path / 'b'}/{{000000..000499}}.tar"
    out, messages = _warnings_of(lambda: check_shard_urls(urls, "data.urls"))
    assert len(out) == 1000 and len(messages) == 1, messages
    assert messages[0].startswith("data.urls: 996 of 1000 shard files do not exist (")
    assert messages[0].count(".tar") == 5 and "and 991 more); they will be skipped" in messages[0]
    assert len(messages[0]) < 600
