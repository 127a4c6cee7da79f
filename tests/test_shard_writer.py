"""Shard writer: img2dataset layout, skip counting of bad inputs, CSV / JSONL / labelled-folder CLI."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.config import ShardDataConfig
from pipeline.data.shard_writer import main, pairs_from_captions, read_shard_index, write_shards
from pipeline.data.shards import build_shard_loader


def _images(folder: Path, n: int, fmt: str = "PNG") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img_{i}.{fmt.lower()}"
        Image.fromarray(np.full((12, 10, 3), 20 * i, np.uint8)).save(folder / name, fmt)
        names.append(name)
    return names


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_csv_to_shards_layout_counts_and_skips(tmp_path):
    names = _images(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG truncated garbage")
    rows = [{"path": f"imgs/{n}", "caption": f"picture {i}"} for i, n in enumerate(names)]
    rows += [{"path": "imgs/broken.png", "caption": "bad image"}, {"path": "imgs/nope.png", "caption": "gone"},
             {"path": f"imgs/{names[0]}", "caption": "  "}]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    report = write_shards(pairs_from_captions(tmp_path / "pairs.csv"), tmp_path / "out", samples_per_shard=3)
    assert report.shards == {"000000.tar": 3, "000001.tar": 3, "000002.tar": 1}
    assert report.skipped == {"bad_image": 1, "missing_file": 1, "empty_caption": 1}
    assert read_shard_index(tmp_path / "out") == report.shards
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total"] == 7 and index["skipped"] == report.skipped
    assert _members(tmp_path / "out" / "000000.tar") == [
        f"{k:09d}.{e}" for k in range(3) for e in ("jpg", "txt", "json")]
    with tarfile.open(tmp_path / "out" / "000001.tar") as tar:
        jpg = tar.extractfile("000000003.jpg").read()
        meta = json.loads(tar.extractfile("000000003.json").read())
        assert tar.extractfile("000000003.txt").read() == b"picture 3"
        assert not any(m.pax_headers for m in tar.getmembers())  # plain headers: cheaper for every reader
    assert jpg[:2] == b"\xff\xd8"  # PNG input re-encoded to JPEG
    assert meta["caption"] == "picture 3" and (meta["width"], meta["height"]) == (10, 12)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_roundtrip_through_the_reader(tmp_path):
    names = _images(tmp_path / "imgs", 10, fmt="JPEG")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i, n in enumerate(names):
            f.write(json.dumps({"file": n, "text": f"photo number {i}"}) + "\n")
    rc = main(["--captions", str(tmp_path / "pairs.jsonl"), "--image-root", str(tmp_path / "imgs"),
               "--path-key", "file", "--caption-key", "text", "--out", str(tmp_path / "out"),
               "--samples-per-shard", "4"])
    assert rc == 0
    assert read_shard_index(tmp_path / "out") == {"000000.tar": 4, "000001.tar": 4, "000002.tar": 2}
    cfg = ShardDataConfig(urls=str(tmp_path / "out" / "{000000..000002}.tar"), resampled=False,
                          batch_size=100, workers=0, shuffle_buffer=0)
    (batch,) = list(build_shard_loader(cfg))
    assert batch["caption"] == [f"photo number {i}" for i in range(10)]
    assert [m["source"] for m in batch["meta"]] == [str(tmp_path / "imgs" / n) for n in names]
    original = np.asarray(Image.open(tmp_path / "imgs" / names[3]))
    assert np.array_equal(np.asarray(batch["image"][3]), original)  # JPEG bytes copied as they were


def test_labelled_folder_cli(tmp_path, capsys):
    for cls in ("golden_retriever", "tabby"):
        _images(tmp_path / "lab" / cls, 3)
    rc = main(["--labelled-folder", str(tmp_path / "lab"), "--template", "a photo of a {}, a pet.",
               "--out", str(tmp_path / "out"), "--image-format", "keep"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["total"] == 6
    with tarfile.open(tmp_path / "out" / "000000.tar") as tar:
        assert tar.extractfile("000000000.txt").read() == b"a photo of a golden retriever, a pet."
        meta = json.loads(tar.extractfile("000000004.json").read())
        assert "000000004.png" in tar.getnames()  # --image-format keep stores the PNG as is
    assert (meta["label"], meta["classname"]) == (1, "tabby")


def test_bad_inputs_fail_clearly(tmp_path):
    (tmp_path / "p.csv").write_text("image,text\na.jpg,hi\n")
    with pytest.raises(ValueError, match="'path'"):
        list(pairs_from_captions(tmp_path / "p.csv"))
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards([], tmp_path / "o", samples_per_shard=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        main(["--labelled-folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
