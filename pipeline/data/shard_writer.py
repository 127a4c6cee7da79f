"""Write image-text pairs into webdataset tar shards in the img2dataset layout.

Output: ``<out>/000000.tar, 000001.tar, ...``; each sample is ``<key>.jpg`` (or the original image
format with ``image_format="keep"``), ``<key>.txt`` (caption) and ``<key>.json`` (key, caption, source
path, size, and label/classname for labelled folders). ``sizes.json`` maps shard name -> sample count
(the file open_clip's trainer reads to size an epoch) and ``index.json`` adds totals and the inputs
skipped and why. Inputs are a CSV/JSONL list of ``path, caption`` or a labelled folder
``<root>/<class>/<image>``. Every file is written with :func:`pipeline.fileio.atomic_write` (temp file,
then rename), so a crash never leaves a half-written ``.tar`` or index that looks complete.

CLI::

    python -m pipeline.data.shard_writer --captions pairs.csv --out shards/ --samples-per-shard 1000
    python -m pipeline.data.shard_writer --labelled-folder imgs/ --template "a photo of a {}." --out shards/
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from pipeline.fileio import atomic_write, atomic_write_json

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class Pair:
    """One input sample: an image (file path or encoded bytes) and its caption."""

    image: str | bytes
    """Path to an image file, or the encoded image bytes."""
    caption: str
    """The caption; empty captions are skipped and counted."""
    meta: dict = field(default_factory=dict)
    """Extra fields stored in ``<key>.json`` (e.g. ``label``, ``classname``)."""


@dataclass
class WriteReport:
    """What :func:`write_shards` produced."""

    shards: dict[str, int]
    """Shard file name -> number of samples in it."""
    skipped: dict[str, int]
    """Reason -> number of inputs skipped (``missing_file``, ``bad_image``, ``empty_caption``)."""

    @property
    def total(self) -> int:
        return sum(self.shards.values())


def _encode(image: str | bytes, image_format: str) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, size). JPEG inputs are copied byte for byte; others re-encoded if asked."""
    raw = Path(image).read_bytes() if isinstance(image, str) else image
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # decode fully now so a corrupt file is caught here, not by every reader later
        fmt, size = (im.format or "").lower(), im.size
        if image_format == "keep":
            return raw, {"jpeg": "jpg"}.get(fmt, fmt or "jpg"), size
        if fmt == "jpeg":
            return raw, "jpg", size
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg", size


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    pairs: Iterable[Pair],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    first_key: int = 0,
) -> WriteReport:
    """Write ``pairs`` into ``out_dir/{000000..}.tar`` plus ``sizes.json`` and ``index.json``.

    Unreadable images and empty captions are skipped and counted in the report (never fatal).
    ``image_format`` is ``jpg`` (re-encode non-JPEG inputs) or ``keep`` (store bytes as they are).
    Keys are 9-digit running numbers starting at ``first_key``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if image_format not in ("jpg", "keep"):
        raise ValueError(f"image_format={image_format!r}: expected 'jpg' or 'keep'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, int] = {}
    skipped: Counter[str] = Counter()
    mtime = int(time.time())  # a fractional mtime costs every member a PAX header, which readers parse in Python
    samples = _keyed_samples(pairs, image_format, skipped, first_key)
    for first in samples:  # each shard streams up to samples_per_shard samples straight into its temp file
        name = f"{len(shards):06d}.tar"
        batch = itertools.chain([first], itertools.islice(samples, samples_per_shard - 1))
        counted: list[int] = []
        # atomic: readers never see a partial shard
        atomic_write(out / name, lambda f, b=batch, c=counted: c.append(_write_tar(f, b, mtime)))
        shards[name] = counted[0]
    report = WriteReport(shards=shards, skipped=dict(skipped))
    atomic_write_json(out / "sizes.json", shards, indent=1)
    index = {"total": report.total, "shards": shards, "skipped": report.skipped,
             "samples_per_shard": samples_per_shard}
    atomic_write_json(out / "index.json", index, indent=1)
    return report


def _keyed_samples(pairs: Iterable[Pair], image_format: str, skipped: Counter[str],
                   first_key: int) -> Iterator[tuple[str, bytes, str, dict]]:
    """``(key, image bytes, extension, json meta)`` of every usable pair; the others counted in ``skipped``."""
    key = first_key
    for pair in pairs:
        caption = (pair.caption or "").strip()
        if not caption:
            skipped["empty_caption"] += 1
            continue
        if isinstance(pair.image, str) and not Path(pair.image).is_file():
            skipped["missing_file"] += 1
            continue
        try:
            data, ext, size = _encode(pair.image, image_format)
        except Exception:  # PIL raises several types for corrupt files; all mean "unusable image"
            skipped["bad_image"] += 1
            continue
        k = f"{key:09d}"
        meta = {"key": k, "caption": caption, "width": size[0], "height": size[1], **pair.meta}
        if isinstance(pair.image, str):
            meta["source"] = pair.image
        yield k, data, ext, meta
        key += 1


def _write_tar(f: BinaryIO, samples: Iterable[tuple[str, bytes, str, dict]], mtime: int) -> int:
    """Write ``samples`` as one tar into the open file ``f``; returns how many were written."""
    n = 0
    with tarfile.open(fileobj=f, mode="w") as tar:
        for k, data, ext, meta in samples:
            _add(tar, f"{k}.{ext}", data, mtime)
            _add(tar, f"{k}.txt", meta["caption"].encode("utf-8"), mtime)
            _add(tar, f"{k}.json", json.dumps(meta).encode("utf-8"), mtime)
            n += 1
    return n


def read_shard_index(shard_dir: str | Path) -> dict[str, int]:
    """Shard name -> sample count from ``sizes.json`` written by :func:`write_shards`."""
    return json.loads((Path(shard_dir) / "sizes.json").read_text())


def pairs_from_captions(path: str | Path, image_root: str | Path | None = None,
                        path_key: str = "path", caption_key: str = "caption") -> Iterator[Pair]:
    """Pairs from a CSV (with a header row) or JSONL file of ``path, caption`` records.

    Relative image paths are resolved against ``image_root`` (default: the file's directory).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    if rows and (path_key not in rows[0] or caption_key not in rows[0]):
        raise ValueError(f"{path}: records need keys {path_key!r} and {caption_key!r}, got {sorted(rows[0])}")
    for row in rows:
        yield Pair(image=str(root / row[path_key]), caption=row.get(caption_key) or "")


def pairs_from_labelled_folder(root: str | Path, template: str = "a photo of a {}.") -> Iterator[Pair]:
    """Pairs from ``root/<class>/<image>``: caption = ``template`` filled with the class name.

    Classes are sorted folder names; ``_`` becomes a space in the caption. Labels go to the json.
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class folders found")
    for label, cls in enumerate(classes):
        name = cls.replace("_", " ")
        for img in sorted((root / cls).iterdir()):
            if img.suffix.lower() in IMAGE_EXTS:
                yield Pair(image=str(img), caption=template.format(name),
                           meta={"label": label, "classname": name})


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.data.shard_writer", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="CSV (header row) or JSONL file of path,caption records")
    src.add_argument("--labelled-folder", help="folder of class sub-folders")
    ap.add_argument("--out", required=True, help="output directory for the shards")
    ap.add_argument("--image-root", help="base of relative image paths (default: the captions file's folder)")
    ap.add_argument("--path-key", default="path")
    ap.add_argument("--caption-key", default="caption")
    ap.add_argument("--template", default="a photo of a {}.", help="caption template for labelled folders")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--image-format", choices=("jpg", "keep"), default="jpg")
    args = ap.parse_args(argv)
    if args.captions:
        pairs = pairs_from_captions(args.captions, args.image_root, args.path_key, args.caption_key)
    else:
        pairs = pairs_from_labelled_folder(args.labelled_folder, args.template)
    report = write_shards(pairs, args.out, args.samples_per_shard, args.image_format)
    print(json.dumps({"out": str(args.out), "total": report.total, "shards": len(report.shards),
                      "skipped": report.skipped}))
    return 0 if report.total > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
