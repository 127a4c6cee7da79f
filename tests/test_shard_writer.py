"""Shard writer: img2dataset layout, skip counting of bad inputs, CSV / JSONL / labelled-folder CLI, output
folder policy (refuse non-empty, --overwrite), long CSV fields, empty inputs, 16-bit and EXIF-rotated images."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, run_main
from pipeline.data import shard_writer
from pipeline.data.config import ShardDataConfig
from pipeline.data.shard_writer import (
    MAX_CAPTION_CHARS,
    OutputNotEmpty,
    Pair,
    main,
    pairs_from_captions,
    read_shard_index,
    write_shards,
)
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


# --- output folder: refuse a non-empty one, --overwrite removes only an earlier run's files ------------

def _pairs(n: int, tag: str = "") -> list[Pair]:
    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(buf, "PNG")
        return buf.getvalue()
    return [Pair(png(i), f"{tag}caption {i}") for i in range(n)]


def _entries(folder: Path) -> dict[str, bytes | None]:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir()}


def test_non_empty_output_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    write_shards(_pairs(6, "old "), out, samples_per_shard=2)
    (out / "notes.txt").write_text("mine")
    before = _entries(out)
    with pytest.raises(OutputNotEmpty, match=r"3 shards \(000000\.tar\.\.000002\.tar\).*notes\.txt.*--overwrite"):
        write_shards(_pairs(2, "new "), out, samples_per_shard=2)
    assert _entries(out) == before  # nothing written, nothing removed
    # the CLI: one line on stderr and exit status 2, not a traceback
    (tmp_path / "lab" / "cls").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "lab" / "cls" / "a.png")
    assert run_main(main, ["--labelled-folder", str(tmp_path / "lab"), "--out", str(out)]) == 2
    assert f"error: --out {out} is not empty" in capsys.readouterr().err
    assert _entries(out) == before
    write_shards(_pairs(2), tmp_path / "fresh" / "deeper")  # a new folder (parents too) is fine ...
    (tmp_path / "empty").mkdir()
    write_shards(_pairs(2), tmp_path / "empty")  # ... and so is an existing empty one


def test_overwrite_removes_only_the_earlier_runs_files_and_lists_the_new_shards(tmp_path, capsys):
    out = tmp_path / "out"
    write_shards(_pairs(8, "old "), out, samples_per_shard=2)  # 4 shards
    (out / "notes.txt").write_text("mine")
    (out / "000009.tar").mkdir()  # a folder the user named like a shard: not ours, kept
    (out / ".000004.tar.123.abcd.tmp").write_bytes(b"left by a killed writer")
    lab = tmp_path / "lab" / "cls"
    lab.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (4, 4), (i, i, i)).save(lab / f"{i}.png")
    rc = main(["--labelled-folder", str(tmp_path / "lab"), "--out", str(out), "--samples-per-shard", "2",
               "--overwrite"])
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["removed"] == 8  # 4 shards, sizes.json, index.json, shards.txt, the temp file
    assert "removed from" in captured.err and "4 shards (000000.tar..000003.tar)" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "000000.tar", "000001.tar", "000009.tar", "index.json", "notes.txt", "shards.txt", "sizes.json"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "000009.tar").is_dir()
    # the list of the new shards, and the URL to read them with
    assert (out / "shards.txt").read_text() == "000000.tar\n000001.tar\n"
    assert summary["urls"] == str(out / "{000000..000001}.tar")
    assert f"read them as {summary['urls']}" in captured.err
    assert json.loads((out / "index.json").read_text())["pattern"] == "{000000..000001}.tar"
    cfg = ShardDataConfig(urls=summary["urls"], resampled=False, batch_size=100, workers=0, shuffle_buffer=0)
    (batch,) = list(build_shard_loader(cfg))
    assert batch["caption"] == ["a photo of a cls."] * 3  # no sample of the earlier run


def test_overwrite_with_a_bad_input_file_keeps_the_earlier_run(tmp_path):
    out = tmp_path / "out"
    write_shards(_pairs(4), out, samples_per_shard=2)
    before = _entries(out)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        main(["--captions", str(tmp_path / "empty.csv"), "--out", str(out), "--overwrite"])
    assert _entries(out) == before  # the input is checked before anything is removed


# --- input files and images ------------------------------------------------------------------------------

def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_long_csv_field_is_counted_not_fatal(tmp_path, monkeypatch):
    names = _images(tmp_path / "imgs", 3)
    long = "word " * 40_000  # 200,000 characters: over csv's default 128 KiB field limit
    rows = [{"path": f"imgs/{names[0]}", "caption": "short one"},
            {"path": f"imgs/{names[1]}", "caption": long},
            {"path": f"imgs/{names[2]}", "caption": "short two"}]
    limit = csv.field_size_limit()
    report = write_shards(pairs_from_captions(_csv(tmp_path / "p.csv", rows)), tmp_path / "out")
    assert csv.field_size_limit() == limit  # the process-wide setting is restored
    assert report.total == 2 and report.skipped == {"long_caption": 1}
    assert report.examples["long_caption"] == [
        f"{tmp_path / 'imgs' / names[1]}: caption of 199999 characters > max_caption_chars={MAX_CAPTION_CHARS}"]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"] == {"long_caption": 1} and index["max_caption_chars"] == MAX_CAPTION_CHARS
    # no cap: the long caption is written whole
    report = write_shards(pairs_from_captions(tmp_path / "p.csv"), tmp_path / "out2", max_caption_chars=0)
    assert report.total == 3 and report.skipped == {}
    # a field beyond even the raised limit is an unbalanced quote, not a caption: an error naming the line
    monkeypatch.setattr(shard_writer, "CSV_FIELD_LIMIT", 1000)
    (tmp_path / "q.csv").write_text('path,caption\na.png,fine\nb.png,"oops\n' + "c.png,more\n" * 200)
    with pytest.raises(ConfigError, match=r"q\.csv: line \d+: .*field larger than field limit.*unbalanced quote"):
        pairs_from_captions(tmp_path / "q.csv")
    assert csv.field_size_limit() == limit


def test_missing_image_is_named_skipped_and_counted(tmp_path, capsys):
    names = _images(tmp_path / "imgs", 2)
    rows = [{"path": f"imgs/{names[0]}", "caption": "here"}, {"path": "imgs/gone.png", "caption": "gone"},
            {"path": "imgs", "caption": "a folder"}, {"path": f"imgs/{names[1]}", "caption": "here too"}]
    report = write_shards(pairs_from_captions(_csv(tmp_path / "p.csv", rows)), tmp_path / "out")
    gone, folder = tmp_path / "imgs" / "gone.png", tmp_path / "imgs"
    assert report.total == 2 and report.skipped == {"missing_file": 2}
    assert report.examples == {"missing_file": [f"{gone}: no such file", f"{folder}: not a file"]}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped_examples"] == report.examples
    # the CLI names the path; when nothing at all could be written it says so and exits 1
    _csv(tmp_path / "all_gone.csv", [{"path": "nope.png", "caption": "x"}])
    assert main(["--captions", str(tmp_path / "all_gone.csv"), "--out", str(tmp_path / "o2")]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped_examples"] == {"missing_file": [f"{tmp_path / 'nope.png'}: no such file"]}
    assert f"{tmp_path / 'nope.png'}: no such file" in captured.err
    assert "error: no sample written (is --image-root right?)" in captured.err


@pytest.mark.parametrize(("name", "text", "message"), [
    ("empty.csv", "", r"empty\.csv: the file is empty; expected a header row naming 'path' and 'caption'"),
    ("header.csv", "path,caption\n", r"header\.csv: a header row \(path, caption\) but no records"),
    ("header_crlf.csv", "\ufeffpath,caption\r\n", r"header_crlf\.csv: a header row \(path, caption\) but no records"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl: no records \(the file is empty\)"),
    ("wrong.csv", "image,text\n", r"wrong\.csv: records need keys 'path' and 'caption', got \['image', 'text'\]"),
    ("bad.jsonl", '{"path": "a.png", "caption": "x"}\n{oops\n', r"bad\.jsonl: line 2 is not JSON"),
    ("missing.csv", None, r"missing\.csv: no such file"),
], ids=["empty_csv", "header_only_csv", "header_only_bom_crlf", "blank_jsonl", "wrong_columns", "bad_jsonl_line",
        "missing_csv"])
def test_empty_or_header_only_captions_file_is_a_clear_error(tmp_path, capsys, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        pairs_from_captions(tmp_path / name)
    assert run_main(main, ["--captions", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # failed before the output folder was made


def _read_back(out: Path) -> list[np.ndarray]:
    """The images of ``out``'s shards as the shard reader delivers them."""
    cfg = ShardDataConfig(urls=str(out / "{000000..000000}.tar"), resampled=False, batch_size=100, workers=0,
                          shuffle_buffer=0)
    (batch,) = list(build_shard_loader(cfg))
    return [np.asarray(im) for im in batch["image"]]


@pytest.mark.parametrize("image_format", ["jpg", "keep"])
def test_16bit_png_is_scaled_to_8bit_not_white(tmp_path, image_format):
    levels = [0, 16384, 32768, 49152, 65535]
    grey16 = np.repeat(np.array(levels, np.uint16), 16)[None, :].repeat(16, axis=0)  # 16 x 80, 5 blocks
    path = tmp_path / "deep.png"
    Image.fromarray(grey16).save(path)
    assert Image.open(path).mode == "I;16"
    report = write_shards([Pair(str(path), "a deep png")], tmp_path / "out", image_format=image_format)
    (pixels,) = _read_back(tmp_path / "out")
    got = pixels[8, 8::16, 0].astype(int)  # the middle of each block
    expected = [round(v * 255 / 65535) for v in levels]  # 0, 64, 128, 191, 255 (was: all 255 but the first)
    tolerance = 0 if image_format == "keep" else 3  # keep: lossless PNG; jpg: quality 95
    assert np.abs(got - expected).max() <= tolerance, (got, expected)
    assert report.converted == {"16bit": 1}
    with tarfile.open(tmp_path / "out" / "000000.tar") as tar:
        assert tar.getnames()[0] == f"000000000.{'jpg' if image_format == 'jpg' else 'png'}"
        assert json.loads(tar.extractfile("000000000.json").read())["converted"] == ["16bit"]


@pytest.mark.parametrize("source", ["JPEG", "PNG"])
@pytest.mark.parametrize("image_format", ["jpg", "keep"])
def test_exif_orientation_is_applied(tmp_path, source, image_format):
    upright = np.zeros((20, 10, 3), np.uint8)  # 10 wide, 20 tall: red top half, blue bottom half
    upright[:10, :, 0] = 255
    upright[10:, :, 2] = 255
    # stored sideways with orientation 6 ("rotate 90 degrees clockwise to display"), as cameras do
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo.{source.lower()}"
    stored.save(path, source, exif=exif, **({"quality": 95} if source == "JPEG" else {}))
    assert Image.open(path).size == (20, 10)
    report = write_shards([Pair(str(path), "a sideways photo")], tmp_path / "out", image_format=image_format)
    (pixels,) = _read_back(tmp_path / "out")
    assert pixels.shape == (20, 10, 3)  # upright, as a viewer shows it (was: 10 tall, 20 wide)
    assert report.converted == {"exif_orientation": 1}
    with tarfile.open(tmp_path / "out" / "000000.tar") as tar:
        ext = "png" if (image_format, source) == ("keep", "PNG") else "jpg"  # keep: same format, lossless PNG
        assert tar.getnames()[0] == f"000000000.{ext}"
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert (meta["width"], meta["height"]) == (10, 20) and meta["converted"] == ["exif_orientation"]
    if ext == "png":
        assert np.array_equal(pixels, upright)
    else:  # JPEG blurs colour across the red/blue edge: compare the halves away from it
        for rows in (slice(0, 6), slice(14, 20)):
            assert np.abs(pixels[rows].astype(int) - upright[rows]).max() <= 12
