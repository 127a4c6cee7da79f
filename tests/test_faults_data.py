"""Fault injection for bad data (docs/ARCHITECTURE.md section 9): broken images, captions and shards, fed to the real readers.

Every test plants known faults next to good samples and checks two things exactly: every good sample is
delivered (the set of keys read equals the set of good keys written), and every bad one is counted under
its own counter, once. Data that can never deliver must fail within seconds with
:class:`~pipeline.data.shards.NoUsableData`, in single-pass and resampled (endless) mode and in the stage-1
episode stream; ``pytest.mark.timeout`` turns a hang into a failure.

Readers covered: :func:`pipeline.data.shards.build_shard_loader` (0 and 2 workers) and the stage-1 task path
(:class:`pipeline.data.task_stream.SlotStream` / :func:`~pipeline.data.task_stream.slot_loader` over
:class:`pipeline.data.episodes.EpisodeSampler`).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pipeline.config import ConfigError
from pipeline.data.config import ShardDataConfig
from pipeline.data.episodes import EpisodeConfig
from pipeline.data.features import read_assignments, write_assignments
from pipeline.data.shards import NoUsableData, build_shard_loader
from pipeline.data.sources import iter_tar_samples
from pipeline.data.task_stream import COUNTERS, SlotStream, TaskDataConfig, slot_loader
from tests.helpers.bad_shards import (
    MAX_PIXELS,
    SAMPLE_FAULTS,
    SHARD_FAULTS,
    bad_sample,
    good,
    image_bytes,
    png_bomb,
    write_bad_shard,
    write_empty_tar,
    write_tar,
)
from tests.helpers.tasks import plant_assignments

FAST_S = 10.0  # "fails fast": every hopeless-data test must raise well within this many seconds


def _expect_no_usable(consume, match: str) -> str:
    """Run ``consume()``, which must raise :class:`NoUsableData` matching ``match`` within ``FAST_S``.

    Returns the message. The traceback is dropped at once: it holds the reader, and a reader with worker
    processes that is only freed by a later garbage collection waits seconds on those workers' exit.
    """
    t0 = time.monotonic()
    try:
        with warnings.catch_warnings(record=True):  # the expected "skipping shard" warnings
            consume()
    except NoUsableData as e:
        elapsed, message = time.monotonic() - t0, str(e)
        e.__traceback__ = None
    else:
        pytest.fail("the reader ended without raising NoUsableData")
    assert re.search(match, message), message
    assert elapsed < FAST_S, f"took {elapsed:.1f} s to give up"
    return message


def _shard_cfg(urls: str, workers: int = 0, **kw) -> ShardDataConfig:
    kw = {"resampled": False, "batch_size": 3, "shuffle_buffer": 0, "max_image_pixels": MAX_PIXELS, **kw}
    return ShardDataConfig(urls=urls, workers=workers, **kw)


def _read(loader) -> tuple[list[str], list[str]]:
    """(keys delivered, warning messages raised in this process) for one pass over ``loader``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in loader for k in batch["key"]]
    return keys, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------------------
# shard loader: one fault at a time


@pytest.mark.parametrize("fault", SAMPLE_FAULTS)
def test_bad_sample_is_skipped_and_counted(tmp_path, fault):
    # two copies of the fault between good samples: the count must be exactly 2, not just "some"
    bad = [bad_sample(fault, f"x{i}", 10 + i) for i in range(2)]
    counter = bad[0][1]
    write_tar(tmp_path / "000000.tar", [good("g0", 0), bad[0][0], good("g1", 1), bad[1][0], good("g2", 2)])
    expected = {"g0", "g1", "g2"} | ({"x0", "x1"} if counter is None else set())
    loader = build_shard_loader(_shard_cfg(str(tmp_path / "000000.tar")))
    keys, _ = _read(loader)
    assert sorted(keys) == sorted(expected)
    assert loader.skip_counts == ({counter: 2} if counter else {})
    assert loader.stats["samples"] == len(expected)


def test_fine_but_odd_samples_decode_to_the_right_content(tmp_path):
    # PNG bytes behind a .jpg name decode from their real format; a BOM is dropped from the caption
    png = bad_sample("png_named_jpg", "p", 5)[0]
    bom = bad_sample("utf8_bom_caption", "q", 6)[0]
    write_tar(tmp_path / "000000.tar", [png, bom])
    batch = next(iter(build_shard_loader(_shard_cfg(str(tmp_path / "000000.tar"), batch_size=2))))
    assert batch["key"] == ["p", "q"]
    with Image.open(io.BytesIO(png["jpg"])) as im:
        assert im.format == "PNG"
        assert np.array_equal(np.asarray(batch["image"][0]), np.asarray(im.convert("RGB")))
    assert batch["caption"][1] == "a caption with a byte-order mark"


@pytest.mark.parametrize("fault", SHARD_FAULTS)
def test_bad_shard_is_skipped_with_a_warning_and_counted(tmp_path, fault):
    first, last = [good(f"a{i}", i) for i in range(3)], [good(f"c{i}", 10 + i) for i in range(3)]
    write_tar(tmp_path / "000000.tar", first)
    kept, n_bad = write_bad_shard(fault, tmp_path / "000001.tar", "b")
    write_tar(tmp_path / "000002.tar", last)
    loader = build_shard_loader(_shard_cfg(str(tmp_path / "{000000..000002}.tar")))
    keys, messages = _read(loader)
    assert sorted(keys) == sorted({s["__key__"] for s in first + last} | kept)
    assert loader.skip_counts == ({"bad_shard": n_bad} if n_bad else {})
    assert loader.stats["shards"] == 3
    assert sum("skipping" in m and "000001.tar" in m for m in messages) == n_bad, messages


# ---------------------------------------------------------------------------------------------------------
# shard loader: everything at once, over workers


def _plant_everything(root: Path) -> tuple[str, set[str], dict[str, int], int]:
    """Every sample fault (spread over 3 shards, among good samples) and every shard fault.

    Returns (urls, good keys, expected non-zero skip counts, number of shards).
    """
    good_keys: set[str] = set()
    expected: Counter = Counter()
    shards: list[list[dict]] = [[], [], []]
    for i, fault in enumerate(SAMPLE_FAULTS):
        sample, counter = bad_sample(fault, f"f{i:02d}", 100 + i)
        shards[i % 3] += [good(f"g{i:02d}", i), sample]
        good_keys.add(f"g{i:02d}")
        if counter is None:
            good_keys.add(f"f{i:02d}")
        else:
            expected[counter] += 1
    for s, samples in enumerate(shards):
        write_tar(root / f"{s:06d}.tar", samples)
    for j, fault in enumerate(SHARD_FAULTS):
        kept, n_bad = write_bad_shard(fault, root / f"{3 + j:06d}.tar", f"t{j}-")
        good_keys |= kept
        expected["bad_shard"] += n_bad
    n = 3 + len(SHARD_FAULTS)
    return str(root / f"{{000000..{n - 1:06d}}}.tar"), good_keys, dict(expected), n


@pytest.mark.parametrize(("workers", "shuffle"), [(0, 0), (2, 0), (2, 5)])
def test_every_fault_at_once_loses_no_good_sample(tmp_path, workers, shuffle):
    urls, good_keys, expected, n_shards = _plant_everything(tmp_path)
    loader = build_shard_loader(_shard_cfg(urls, workers=workers, shuffle_buffer=shuffle, shuffle_initial=2))
    keys, _ = _read(loader)
    assert len(keys) == len(set(keys))  # nothing delivered twice
    assert set(keys) == good_keys
    assert loader.skip_counts == expected
    assert loader.stats["samples"] == len(good_keys)
    assert loader.stats["shards"] == n_shards


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_stream_counts_the_faults_of_every_opening(tmp_path, workers):
    # one shard: each sample fault once between two good samples. Every opening adds the same counts, so
    # the totals are exact multiples of the openings; the epoch (10 shards' worth of good samples) ends on
    # a shard's last sample, so each opening was read in full
    samples, good_keys, per_open = [good("g0", 0)], {"g0", "g1"}, Counter(samples=2)
    for i, fault in enumerate(SAMPLE_FAULTS):
        sample, counter = bad_sample(fault, f"f{i:02d}", 100 + i)
        samples.append(sample)
        per_open[counter or "samples"] += 1
        good_keys |= {sample["__key__"]} if counter is None else set()
    samples.append(good("g1", 1))
    write_tar(tmp_path / "000000.tar", samples)
    n_good = per_open["samples"]
    cfg = _shard_cfg(str(tmp_path / "000000.tar"), workers=workers, resampled=True, epoch_samples=10 * n_good,
                     batch_size=n_good)
    loader = build_shard_loader(cfg)
    keys, _ = _read(loader)
    assert Counter(keys) == dict.fromkeys(good_keys, 10)
    assert loader.stats["shards"] == 10
    assert {k: loader.stats[k] for k in per_open} == {k: 10 * v for k, v in per_open.items()}


# ---------------------------------------------------------------------------------------------------------
# decompression bombs and the pixel limit


def test_bomb_is_refused_from_its_header_even_with_pils_own_guard_off(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as if a user had switched PIL's check off
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    write_tar(tmp_path / "000000.tar", [
        good("g0", 0), bad_sample("png_bomb_header", "bomb", 1)[0], good("g1", 2),
        bad_sample("above_max_pixels", "big", 3)[0],
    ])
    loader = build_shard_loader(_shard_cfg(str(tmp_path / "000000.tar")))
    keys, _ = _read(loader)
    assert sorted(keys) == ["g0", "g1"]
    assert loader.skip_counts == {"oversized_image": 2}
    assert set(decoded) == {(16, 16)}  # only the good images' pixels were ever decoded


def test_default_limit_refuses_what_pil_would_only_warn_about(tmp_path):
    # 9500 x 9500 is above PIL's warning threshold but below its hard error (2x): PIL alone would try to
    # decode 90 MB of pixels; 50000 x 50000 is refused by PIL itself. Both count as oversized_image.
    write_tar(tmp_path / "000000.tar", [
        good("g0", 0), {"__key__": "warn", "png": png_bomb(9500, 9500), "txt": b"big"},
        {"__key__": "error", "png": png_bomb(), "txt": b"bigger"}, good("g1", 1),
    ])
    loader = build_shard_loader(ShardDataConfig(urls=str(tmp_path / "000000.tar"), resampled=False, workers=0,
                                                shuffle_buffer=0))
    keys, messages = _read(loader)
    assert sorted(keys) == ["g0", "g1"]
    assert loader.skip_counts == {"oversized_image": 2}
    assert not any("DecompressionBomb" in m or "exceeds limit" in m for m in messages), messages


def test_no_pixel_limit_of_our_own_still_counts_pils_bomb_error(tmp_path):
    write_tar(tmp_path / "000000.tar", [good("g0", 0), {"__key__": "bomb", "png": png_bomb(), "txt": b"x"}])
    loader = build_shard_loader(_shard_cfg(str(tmp_path / "000000.tar"), max_image_pixels=0))
    keys, _ = _read(loader)
    assert keys == ["g0"]
    assert loader.skip_counts == {"oversized_image": 1}


def test_negative_pixel_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="data.max_image_pixels"):
        build_shard_loader(ShardDataConfig(urls="a.tar", resampled=False, max_image_pixels=-1))
    with pytest.raises(ConfigError, match="data.max_image_pixels"):
        TaskDataConfig(urls="a.tar", max_image_pixels=-1).validate()


# ---------------------------------------------------------------------------------------------------------
# hopeless data: fail fast with a clear error, never hang or end silently empty


def _all_bad(root: Path, kind: str, n: int = 4) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        path = root / f"{s:06d}.tar"
        if kind == "corrupt_tars":
            path.write_bytes(b"\x00garbage" * (s + 1) if s % 2 else b"")  # 0-byte and non-tar shards
        elif kind == "empty_tars":
            write_empty_tar(path)
        elif kind == "bad_samples_only":
            write_tar(path, [bad_sample(f, f"s{s}-{i}", i)[0] for i, f in enumerate(SAMPLE_FAULTS)
                             if bad_sample(f, "k", 0)[1] is not None])
        elif kind != "missing":
            raise ValueError(kind)
    return str(root / f"{{000000..{n - 1:06d}}}.tar")


HOPELESS = ("missing", "corrupt_tars", "empty_tars", "bad_samples_only")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled", [False, True], ids=["single_pass", "resampled"])
@pytest.mark.parametrize("kind", HOPELESS)
def test_every_shard_bad_raises_a_clear_error_fast(tmp_path, kind, resampled):
    urls = _all_bad(tmp_path, kind)
    cfg = _shard_cfg(urls, resampled=resampled, epoch_samples=8, shuffle_buffer=8, shuffle_initial=4)
    message = _expect_no_usable(lambda: list(build_shard_loader(cfg)), "no usable samples in")
    assert urls in message  # names what to check


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled", [False, True], ids=["single_pass", "resampled"])
def test_every_shard_bad_raises_through_worker_processes(tmp_path, resampled):
    urls = _all_bad(tmp_path / "a", "bad_samples_only")
    cfg = _shard_cfg(urls, workers=2, resampled=resampled, epoch_samples=8)
    _expect_no_usable(lambda: list(build_shard_loader(cfg)), "no usable samples in")


def test_single_pass_may_be_allowed_to_end_empty(tmp_path):
    loader = build_shard_loader(_shard_cfg(_all_bad(tmp_path, "empty_tars"), allow_empty=True))
    assert _read(loader)[0] == []
    assert loader.stats["shards"] == 4 and loader.stats["samples"] == 0


def test_small_shards_behind_a_large_shuffle_buffer_do_not_trip_the_guard(tmp_path):
    # 10 one-sample shards and shuffle_initial=100: the reader opens ~100 shards before the first sample is
    # checked. Counting openings at the reader (the old guard) called this healthy stream hopeless.
    for i in range(10):
        write_tar(tmp_path / f"{i:06d}.tar", [good(f"k{i}", i)])
    cfg = _shard_cfg(str(tmp_path / "{000000..000009}.tar"), resampled=True, epoch_samples=40, batch_size=4,
                     shuffle_buffer=200, shuffle_initial=100)
    keys, _ = _read(build_shard_loader(cfg))
    assert len(keys) == 40


# ---------------------------------------------------------------------------------------------------------
# stage-1 episode stream


def to_tensor(im: Image.Image) -> torch.Tensor:
    """Minimal preprocess (module level so worker processes can pickle it): [3, 16, 16] floats."""
    return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)


N_CONCEPTS, DOMAIN_OF = 4, (0, 0, 1, 1)
EPISODES = EpisodeConfig(n_way=2, k_shot=1, q_query=1, p_cross_domain=0.5, buffer_per_concept=4)


def _task_data(root: Path, faults: tuple[str, ...] = (), n_shards: int = 4, per_concept: int = 2,
               domains_by_shard: bool = False) -> dict:
    """Shards whose samples all belong to concepts, with the faults *first* in every shard, plus clusters.

    ``domains_by_shard``: shard ``s`` holds only concepts of domain ``s % 2``. Returns
    ``{"urls", "clusters_dir", "good", "bad", "per_open"}`` where ``per_open`` is what each opening of any
    shard adds to the counters.
    """
    shards, clusters = root / "shards", root / "clusters"
    shards.mkdir(parents=True)
    (clusters / "assign").mkdir(parents=True)
    good_keys, bad_keys, sizes = set(), set(), Counter()
    per_open: Counter = Counter()
    for s in range(n_shards):
        samples, concept_of = [], {}
        # counted faults lead, so a shard's are all read before any of its samples can complete a task
        for i, fault in sorted(enumerate(faults), key=lambda f: bad_sample(f[1], "k", 0)[1] is None):
            sample, counter = bad_sample(fault, f"s{s}-bad{i}", 1000 * s + i)
            samples.append(sample)
            concept_of[sample["__key__"]] = i % N_CONCEPTS  # assigned: only the reader's checks keep them out
            (good_keys if counter is None else bad_keys).add(sample["__key__"])
            if s == 0:
                per_open[counter or "samples"] += 1
        concepts = [c for c in range(N_CONCEPTS) if not domains_by_shard or DOMAIN_OF[c] == s % 2]
        for c in concepts:
            for j in range(per_concept):
                key = f"s{s}-c{c}-{j}"
                samples.append({"__key__": key, "png": image_bytes(100 * s + 10 * c + j, fmt="PNG"),
                                "txt": f"thing {c}".encode()})
                concept_of[key], good_keys = c, good_keys | {key}
        if s == 0:
            per_open["samples"] += len(concepts) * per_concept
        for c in concept_of.values():
            sizes[c] += 1
        write_tar(shards / f"{s:06d}.tar", samples)
        plant_assignments(shards / f"{s:06d}.tar", clusters / "assign" / f"{s:06d}.npz", concept_of)
    concepts_json = [{"id": c, "domain": DOMAIN_OF[c], "name": f"thing {c}", "size": sizes[c], "examples": []}
                     for c in range(N_CONCEPTS)]
    (clusters / "concepts.json").write_text(json.dumps(concepts_json))
    return {"urls": str(shards / f"{{000000..{n_shards - 1:06d}}}.tar"), "clusters_dir": str(clusters),
            "good": good_keys, "bad": bad_keys, "per_open": per_open}


def _task_cfg(data: dict, workers: int = 0, **kw) -> TaskDataConfig:
    kw = {"shuffle_buffer": 0, "max_image_pixels": MAX_PIXELS, **kw}
    return TaskDataConfig(urls=data["urls"], clusters_dir=data["clusters_dir"], workers=workers, **kw)


# the faults the reader catches when it reads a sample (truncated pixels only show when decoded for a task)
READ_TIME_FAULTS = tuple(f for f in SAMPLE_FAULTS if f != "truncated_jpeg")


def test_task_reader_delivers_every_good_sample_and_counts_every_bad_one(tmp_path):
    data = _task_data(tmp_path, READ_TIME_FAULTS)
    stream = SlotStream(_task_cfg(data), EPISODES, to_tensor, seed=0, epoch=0, slot=0)
    stats: Counter = Counter()
    urls = [f"{data['urls'].rsplit('/', 1)[0]}/{s:06d}.tar" for s in range(4)]

    class NoGuard:  # one pass over the list, the health checks are tested elsewhere
        def sample(self, s, usable):
            pass

    keys = [s["key"] for s in stream._raw(iter_tar_samples(iter(urls), stats), stats, NoGuard())]
    assert sorted(keys) == sorted(data["good"])
    expected = {k: 4 * v for k, v in data["per_open"].items()}
    assert {k: v for k, v in stats.items() if not k.startswith("_") and k != "shards"} == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_episodes_never_hold_a_bad_sample_and_counters_are_exact(tmp_path, workers):
    data = _task_data(tmp_path, READ_TIME_FAULTS)
    it = slot_loader(_task_cfg(data, workers), EPISODES, to_tensor, seed=0, epoch=0, slot=0)
    per_open = data["per_open"]
    seen = set()
    for episode, counts in itertools.islice(it, 12):
        keys = set(episode.support_keys + episode.query_keys)
        assert keys <= data["good"], keys - data["good"]
        seen |= keys
        assert set(counts) == {*COUNTERS, "worker"}
        opened = counts["shards"]
        # faults lead every shard, so each opening's faults were all read before this task was formed
        assert {k: counts[k] for k in per_open if k != "samples"} == {
            k: v * opened for k, v in per_open.items() if k != "samples"}
        assert per_open["samples"] * (opened - 1) < counts["samples"] <= per_open["samples"] * opened
        assert counts["bad_shard"] == counts["unassigned"] == 0
    # the odd-but-fine samples (png named jpg, BOM caption, empty jpg next to a png) do reach tasks
    assert seen & (data["good"] - {k for k in data["good"] if "-c" in k})


@pytest.mark.timeout(60)
def test_undecodable_pixels_are_dropped_when_a_task_needs_them(tmp_path):
    data = _task_data(tmp_path, ("truncated_jpeg",) * 8)
    it = slot_loader(_task_cfg(data), EPISODES, to_tensor, seed=0, epoch=0, slot=0)
    last = {}
    for episode, counts in itertools.islice(it, 30):
        assert set(episode.support_keys + episode.query_keys) <= data["good"]
        last = counts
    # header-valid, so read as samples; each one used by a task failed to decode and was counted once
    assert 0 < last["bad_image"] <= 8 * last["shards"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "none could be read"),
        ("corrupt_images", "every sample was skipped"),
        ("truncated_images", "no task could be formed"),
        ("clusters_of_other_shards", "were the clusters made from these shards"),
        ("cross_domain_unreachable", "cross-domain query"),
    ],
)
def test_hopeless_task_stream_raises_instead_of_waiting_forever(tmp_path, case, message, workers):
    if case == "missing":
        data = _task_data(tmp_path, ())
        for path in Path(data["urls"]).parent.glob("*.tar"):
            path.unlink()
    elif case in ("corrupt_images", "truncated_images"):
        fault = "corrupt_jpeg" if case == "corrupt_images" else "truncated_jpeg"
        data = _task_data(tmp_path, (fault,) * 8, per_concept=0)  # only bad images
    elif case == "clusters_of_other_shards":
        data = _task_data(tmp_path, ())
        for path in Path(data["clusters_dir"], "assign").glob("*.npz"):  # same shard names, other keys
            a = read_assignments(path)
            a.keys = np.array([f"other-{k}" for k in a.keys], dtype=object)
            write_assignments(path, a)
    else:  # domain 1 lives in shards 1 and 3, which are gone: a cross-domain query can never be formed
        data = _task_data(tmp_path, (), domains_by_shard=True)
        for s in (1, 3):
            (Path(data["urls"]).parent / f"{s:06d}.tar").unlink()
    cfg = _task_cfg(data, workers)
    text = _expect_no_usable(lambda: list(slot_loader(cfg, EPISODES, to_tensor, seed=0, epoch=0, slot=0)), message)
    assert "data.urls" in text


def test_huge_tar_member_is_skipped_unread_and_counted(tmp_path, monkeypatch):
    """A member over ``max_member_bytes`` (here 1 MiB of a 3 MiB "image") is never extracted: the stream
    skips its bytes, and its sample is counted once as ``oversized_member``; its neighbours arrive."""
    import tarfile

    big = {"__key__": "huge", "jpg": np.random.default_rng(0).bytes(3 * 2**20), "txt": b"a huge one"}
    write_tar(tmp_path / "000000.tar", [good("g0", 0), big, good("g1", 1)])
    extracted: list[int] = []
    real = tarfile.TarFile.extractfile

    def spy(self, member):
        extracted.append(member.size)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    loader = build_shard_loader(_shard_cfg(str(tmp_path / "000000.tar"), max_member_bytes=2**20))
    keys, _ = _read(loader)
    assert sorted(keys) == ["g0", "g1"] and loader.skip_counts == {"oversized_member": 1}
    assert extracted and max(extracted) < 2**20  # the 3 MiB member was never read
    with pytest.raises(ConfigError, match="data.max_member_bytes"):
        build_shard_loader(ShardDataConfig(urls="a.tar", resampled=False, max_member_bytes=-1))
    with pytest.raises(ConfigError, match="data.max_member_bytes"):
        TaskDataConfig(urls="a.tar", max_member_bytes=-1).validate()
