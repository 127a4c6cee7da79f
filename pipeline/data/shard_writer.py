"""Write image-text pairs into webdataset tar shards in the img2dataset layout.

Output: ``<out>/000000.tar, 000001.tar, ...``; each sample is ``<key>.jpg`` (or the original image
format with ``image_format="keep"``), ``<key>.txt`` (caption) and ``<key>.json`` (key, caption, source
path, size, and label/classname for labelled folders). Next to the shards: ``shards.txt`` (the shard
file names, one a line), ``index.json`` (totals, the brace pattern ``{000000..N}.tar``, the inputs
skipped and why with the first few of each named, the images converted) and ``sizes.json`` (shard name ->
sample count, the file open_clip's trainer reads to size an epoch; written last, so its presence means
the run finished). Inputs are a CSV/JSONL list of ``path, caption`` or a labelled folder
``<root>/<class>/<image>``. Every file is written with :func:`pipeline.fileio.atomic_write` (temp file,
then rename), so a crash never leaves a half-written ``.tar`` or index that looks complete.

Policies (docs/RELIABILITY.md, "Shard writer"):

* Output folder: a non-empty ``--out`` is refused (:class:`OutputNotEmpty`), because shards of an earlier,
  larger run would stay behind and a later ``{000000..N}`` range or a directory listing would pick them
  up. ``--overwrite`` (``overwrite=True``) first removes what an earlier run of this writer left there
  (``NNNNNN.tar`` shards, ``sizes.json``, ``index.json``, ``shards.txt`` and their ``.*.tmp`` temp files),
  names what it removed, and keeps everything else. The CLI prints the brace URL of the new shards.
* Skipped inputs (never fatal, counted in ``WriteReport.skipped`` and ``index.json``, the first
  :data:`EXAMPLES_PER_REASON` of each named in ``skipped_examples``): ``missing_file`` (the image path does
  not exist; the path is named), ``bad_image`` (undecodable; path and error named), ``empty_caption``,
  ``long_caption`` (more than ``max_caption_chars`` characters, default :data:`MAX_CAPTION_CHARS`). If
  nothing at all was written the CLI says why on stderr and exits 1.
* Bad input files are errors before anything is written or removed (a ``ConfigError`` naming the file):
  a missing, empty or header-only CSV/JSONL, missing columns, a non-UTF-8 file, a malformed JSONL line,
  and a CSV field over :data:`CSV_FIELD_LIMIT` characters (an unbalanced quote that swallowed the rest of
  the file; the line is named). Longer CSV fields than Python's default 128 KiB limit are fine.
* Pixels: images are stored upright and 8-bit, because the readers decode with a plain
  ``convert("RGB")``. The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``) and 16-bit images
  (modes ``I;16*`` and ``I``, read as 0..65535) are scaled to 0..255 (``round(v * 255 / 65535)``; they would
  otherwise clip to white). ``image_format="jpg"`` copies JPEGs byte for byte only when neither applies
  and re-encodes everything else at quality 95. ``image_format="keep"`` stores the bytes as they are too,
  except for such images, which it re-encodes: JPEG as JPEG (quality 95), any other format as lossless
  PNG. Each conversion is counted in ``WriteReport.converted`` and listed in the sample's json.

CLI::

    python -m pipeline.data.shard_writer --captions pairs.csv --out shards/ --samples-per-shard 1000
    python -m pipeline.data.shard_writer --labelled-folder imgs/ --template "a photo of a {}." --out shards/
    python -m pipeline.data.shard_writer --captions pairs.csv --out shards/ --overwrite  # replace a run
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import re
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from pipeline.config import ConfigError
from pipeline.fileio import atomic_write, atomic_write_json, atomic_write_text

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

MAX_CAPTION_CHARS = 128 * 1024
"""Default caption cap (characters): longer captions are skipped and counted as ``long_caption``. The
same as Python csv's default field limit, so no caption that used to be written is skipped now."""
CSV_FIELD_LIMIT = 16 * 1024 * 1024
"""CSV fields up to this many characters are read (csv's own default, 128 KiB, aborted the whole write on
one long caption). A longer field is almost surely an unbalanced quote that swallowed the rest of the
file, so it is an error naming the line, not a skip."""
EXAMPLES_PER_REASON = 5
"""How many skipped inputs per reason are named in the report and ``index.json``."""
SHARD_LIST = "shards.txt"
"""The file listing the shards of the run, one file name a line."""

_SHARD_RE = re.compile(r"\d{6}\.tar")
_OWN_FILES = ("sizes.json", "index.json", SHARD_LIST)
# temp files of pipeline.fileio.atomic_write: ".<name>.<pid>.<random>.tmp", left by a killed writer
_TEMP_RE = re.compile(r"\.(\d{6}\.tar|sizes\.json|index\.json|shards\.txt)\.\d+\..*\.tmp")
_ORIENTATION = 0x0112  # the EXIF orientation tag; 1 = upright, 2..8 = mirrored and/or rotated
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class OutputNotEmpty(ConfigError):
    """The output folder already holds files and ``overwrite`` was not asked for."""


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
    """Reason -> number of inputs skipped (``missing_file``, ``bad_image``, ``empty_caption``,
    ``long_caption``)."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> the first few skipped inputs, each named (``<path>: no such file``)."""
    converted: dict[str, int] = field(default_factory=dict)
    """Conversion -> number of images (``exif_orientation``: turned upright; ``16bit``: scaled to 8 bit)."""
    removed: list[str] = field(default_factory=list)
    """Files of an earlier run removed from the output folder (``overwrite=True`` only)."""
    out_dir: str = ""
    """The output folder."""

    @property
    def total(self) -> int:
        """Number of samples written."""
        return sum(self.shards.values())

    @property
    def pattern(self) -> str:
        """The shards as one brace pattern relative to the folder (``{000000..000002}.tar``), or ``""``."""
        return _pattern(list(self.shards))

    @property
    def urls(self) -> str:
        """The shard URL to read them with (``<out>/{000000..000002}.tar``), or ``""`` if none."""
        return str(Path(self.out_dir) / self.pattern) if self.shards else ""


def _pattern(names: list[str]) -> str:
    if not names:
        return ""
    if len(names) == 1:
        return names[0]
    return f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"  # names are consecutive: 000000.tar, 000001.tar, ...


@dataclass
class _Tally:
    """Counts and examples gathered while the samples stream (the generator cannot return them)."""

    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    converted: Counter = field(default_factory=Counter)

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(example)


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit grey image (0..65535) as 8-bit ``L`` (0..255), rounded; ``convert`` would clip to white."""
    values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def _encode(image: str | bytes, image_format: str) -> tuple[bytes, str, tuple[int, int], list[str]]:
    """(bytes, extension, upright size, conversions done). Bytes are copied when the readers' plain
    ``convert("RGB")`` decodes them right; EXIF-rotated and 16-bit images are re-encoded upright, 8-bit."""
    raw = Path(image).read_bytes() if isinstance(image, str) else image
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # decode fully now so a corrupt file is caught here, not by every reader later
        fmt = (im.format or "").lower()
        conversions = []
        if im.getexif().get(_ORIENTATION, 1) in range(2, 9):
            conversions.append("exif_orientation")
        if im.mode in _16BIT_MODES:
            conversions.append("16bit")
        if not conversions:
            if image_format == "keep":
                return raw, {"jpeg": "jpg"}.get(fmt, fmt or "jpg"), im.size, []
            if fmt == "jpeg":
                return raw, "jpg", im.size, []
        fixed = ImageOps.exif_transpose(im) if "exif_orientation" in conversions else im
        if "16bit" in conversions:
            fixed = _to_8bit(fixed)
        buf = io.BytesIO()
        if image_format == "keep" and fmt != "jpeg":
            fixed.save(buf, format="PNG")  # lossless; the original format may have no PIL writer
            return buf.getvalue(), "png", fixed.size, conversions
        if fixed.mode not in ("RGB", "L", "CMYK") or image_format == "jpg":
            fixed = fixed.convert("RGB")
        fixed.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg", fixed.size, conversions


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    tar.addfile(info, io.BytesIO(data))


def _describe(names: list[str]) -> str:
    """``3 shards (000000.tar..000002.tar), sizes.json, index.json``: short even for 10,000 shards."""
    shards = sorted(n for n in names if _SHARD_RE.fullmatch(n))
    others = sorted(n for n in names if not _SHARD_RE.fullmatch(n))
    parts = [f"{len(shards)} shards ({shards[0]}..{shards[-1]})"] if len(shards) > 1 else shards
    shown = others[:8] + ([f"... {len(others) - 8} more"] if len(others) > 8 else [])
    return ", ".join(parts + shown)


def _earlier_output(out: Path) -> list[Path]:
    """The files in ``out`` that an earlier run of this writer made (by name), markers first."""
    own = [out / n for n in _OWN_FILES]
    own += sorted(p for p in out.iterdir() if _SHARD_RE.fullmatch(p.name) or _TEMP_RE.fullmatch(p.name))
    return [p for p in own if p.is_file() or p.is_symlink()]  # never a folder the user named like a shard


def _prepare_output(out: Path, overwrite: bool) -> list[str]:
    """Create ``out``, or check it is empty, or (``overwrite``) clear an earlier run; returns what was removed."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return []
    earlier = _earlier_output(out)
    ours = {p.name for p in earlier}
    others = [n for n in entries if n not in ours]
    if not overwrite:
        what = [f"from an earlier run: {_describe(sorted(ours))}"] if ours else []
        what += [f"other: {_describe(others)}"] if others else []
        raise OutputNotEmpty(
            f"--out {out} is not empty ({'; '.join(what)}); shards left from an earlier run would be read "
            f"together with the new ones. Choose an empty folder, or pass --overwrite (overwrite=True) to "
            f"remove the earlier run's shards, sizes.json, index.json and {SHARD_LIST} (other files are kept)")
    # the markers go first, so a crash midway never leaves a folder that looks like a finished run
    for p in earlier:
        p.unlink(missing_ok=True)
    return [p.name for p in earlier]


def write_shards(
    pairs: Iterable[Pair],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    first_key: int = 0,
    *,
    overwrite: bool = False,
    max_caption_chars: int = MAX_CAPTION_CHARS,
) -> WriteReport:
    """Write ``pairs`` into ``out_dir/{000000..}.tar`` plus ``shards.txt``, ``index.json`` and ``sizes.json``.

    ``out_dir`` must be missing or empty (else :class:`OutputNotEmpty`); ``overwrite=True`` removes the
    files of an earlier run first (listed in ``WriteReport.removed``) and keeps any other file.
    Missing or unreadable images, empty captions and captions over ``max_caption_chars`` characters
    (0 = no cap) are skipped and counted in the report, the first few of each named (never fatal).
    ``image_format`` is ``jpg`` (re-encode non-JPEG inputs) or ``keep`` (store bytes as they are); either
    way images are stored upright (EXIF orientation applied) and 8-bit (see the module docstring).
    Keys are 9-digit running numbers starting at ``first_key``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if image_format not in ("jpg", "keep"):
        raise ValueError(f"image_format={image_format!r}: expected 'jpg' or 'keep'")
    if max_caption_chars < 0:
        raise ValueError(f"max_caption_chars={max_caption_chars} must be >= 0 (0 = no cap)")
    out = Path(out_dir)
    removed = _prepare_output(out, overwrite)
    shards: dict[str, int] = {}
    tally = _Tally()
    mtime = int(time.time())  # a fractional mtime costs every member a PAX header, which readers parse in Python
    samples = _keyed_samples(pairs, image_format, tally, first_key, max_caption_chars)
    for first in samples:  # each shard streams up to samples_per_shard samples straight into its temp file
        name = f"{len(shards):06d}.tar"
        batch = itertools.chain([first], itertools.islice(samples, samples_per_shard - 1))
        counted: list[int] = []
        # atomic: readers never see a partial shard
        atomic_write(out / name, lambda f, b=batch, c=counted: c.append(_write_tar(f, b, mtime)))
        shards[name] = counted[0]
    report = WriteReport(shards=shards, skipped=dict(tally.skipped), examples=tally.examples,
                         converted=dict(tally.converted), removed=removed, out_dir=str(out))
    atomic_write_text(out / SHARD_LIST, "".join(f"{n}\n" for n in shards))
    index = {"total": report.total, "shards": shards, "pattern": report.pattern, "skipped": report.skipped,
             "skipped_examples": report.examples, "converted": report.converted,
             "samples_per_shard": samples_per_shard, "image_format": image_format,
             "max_caption_chars": max_caption_chars}
    atomic_write_json(out / "index.json", index, indent=1)
    # last: callers (the digits demo) take sizes.json as the sign that a run finished
    atomic_write_json(out / "sizes.json", shards, indent=1)
    return report


def _keyed_samples(pairs: Iterable[Pair], image_format: str, tally: _Tally, first_key: int,
                   max_caption_chars: int) -> Iterator[tuple[str, bytes, str, dict]]:
    """``(key, image bytes, extension, json meta)`` of every usable pair; the others counted in ``tally``."""
    key = first_key
    for i, pair in enumerate(pairs):
        name = pair.image if isinstance(pair.image, str) else f"input #{i} ({len(pair.image)} bytes)"
        caption = (pair.caption or "").strip()
        if not caption:
            tally.skip("empty_caption", name)
            continue
        if max_caption_chars and len(caption) > max_caption_chars:
            tally.skip("long_caption", f"{name}: caption of {len(caption)} characters > "
                                       f"max_caption_chars={max_caption_chars}")
            continue
        if isinstance(pair.image, str) and not Path(pair.image).is_file():
            why = "not a file" if Path(pair.image).exists() else "no such file"
            tally.skip("missing_file", f"{name}: {why}")
            continue
        try:
            data, ext, size, conversions = _encode(pair.image, image_format)
        except Exception as e:  # PIL raises several types for corrupt files; all mean "unusable image"
            tally.skip("bad_image", f"{name}: {type(e).__name__}: {e}")
            continue
        tally.converted.update(conversions)
        k = f"{key:09d}"
        meta = {"key": k, "caption": caption, "width": size[0], "height": size[1], **pair.meta}
        if isinstance(pair.image, str):
            meta["source"] = pair.image
        if conversions:
            meta["converted"] = conversions
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


def _read_records(path: Path, path_key: str, caption_key: str) -> list[dict]:
    """The records of a CSV or JSONL captions file; a ``ConfigError`` naming the file if it has none."""
    needs = f"records with keys {path_key!r} and {caption_key!r}"
    if not path.is_file():
        raise ConfigError(f"--captions {path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") must not become part of the first column name
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() in (".jsonl", ".json"):
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ConfigError(
                                f"{path}: line {n} is not JSON ({e}); expected one record a line") from None
                        if not isinstance(rows[-1], dict):
                            raise ConfigError(f"{path}: line {n} is not a JSON object; expected {needs}")
                if not rows:
                    raise ConfigError(f"{path}: no records (the file is empty); expected one JSON object a "
                                      f"line with keys {path_key!r} and {caption_key!r}")
                header = sorted(set().union(*rows))
            else:
                reader = csv.DictReader(f)
                limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide setting: restored below
                try:
                    rows = list(reader)
                except csv.Error as e:
                    raise ConfigError(f"{path}: line {reader.line_num}: {e} (limit {CSV_FIELD_LIMIT} characters: "
                                      f"an unbalanced quote?)") from None
                finally:
                    csv.field_size_limit(limit)
                if reader.fieldnames is None:
                    raise ConfigError(f"{path}: the file is empty; expected a header row naming {path_key!r} "
                                      f"and {caption_key!r}, then one record a line")
                header = list(reader.fieldnames)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if path_key not in header or caption_key not in header:
        raise ConfigError(f"{path}: records need keys {path_key!r} and {caption_key!r}, got {sorted(header)}")
    if not rows:
        raise ConfigError(f"{path}: a header row ({', '.join(header)}) but no records")
    return rows


def pairs_from_captions(path: str | Path, image_root: str | Path | None = None,
                        path_key: str = "path", caption_key: str = "caption") -> Iterator[Pair]:
    """Pairs from a CSV (with a header row) or JSONL file of ``path, caption`` records.

    Relative image paths are resolved against ``image_root`` (default: the file's directory). The file
    is read and checked at once (a ``ConfigError`` naming it when it is missing, empty, header-only or
    lacks a column), so a bad file fails before any output is written or removed.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = _read_records(path, path_key, caption_key)
    # a short CSV row or a JSONL record without the key: an empty path, counted as missing_file
    return (Pair(image=str(root / str(row.get(path_key) or "")), caption=str(row.get(caption_key) or ""))
            for row in rows)


def pairs_from_labelled_folder(root: str | Path, template: str = "a photo of a {}.") -> Iterator[Pair]:
    """Pairs from ``root/<class>/<image>``: caption = ``template`` filled with the class name.

    Classes are sorted folder names; ``_`` becomes a space in the caption. Labels go to the json.
    The class folders are listed at once, so a folder without any fails before output is touched.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--labelled-folder {root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{root}: no class folders found")

    def pairs() -> Iterator[Pair]:
        for label, cls in enumerate(classes):
            name = cls.replace("_", " ")
            for img in sorted((root / cls).iterdir()):
                if img.suffix.lower() in IMAGE_EXTS:
                    yield Pair(image=str(img), caption=template.format(name),
                               meta={"label": label, "classname": name})

    return pairs()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when no sample could be written)."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.data.shard_writer", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="CSV (header row) or JSONL file of path,caption records")
    src.add_argument("--labelled-folder", help="folder of class sub-folders")
    ap.add_argument("--out", required=True, help="output directory for the shards (must be empty or new)")
    ap.add_argument("--overwrite", action="store_true",
                    help=f"remove an earlier run's shards, sizes.json, index.json and {SHARD_LIST} from --out "
                         "first (other files are kept)")
    ap.add_argument("--image-root", help="base of relative image paths (default: the captions file's folder)")
    ap.add_argument("--path-key", default="path")
    ap.add_argument("--caption-key", default="caption")
    ap.add_argument("--template", default="a photo of a {}.", help="caption template for labelled folders")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--image-format", choices=("jpg", "keep"), default="jpg")
    ap.add_argument("--max-caption-chars", type=int, default=MAX_CAPTION_CHARS,
                    help="skip (and count) longer captions; 0 = no cap")
    args = ap.parse_args(argv)
    if args.captions:
        pairs = pairs_from_captions(args.captions, args.image_root, args.path_key, args.caption_key)
    else:
        pairs = pairs_from_labelled_folder(args.labelled_folder, args.template)
    report = write_shards(pairs, args.out, args.samples_per_shard, args.image_format,
                          overwrite=args.overwrite, max_caption_chars=args.max_caption_chars)
    print(json.dumps({"out": str(args.out), "total": report.total, "shards": len(report.shards),
                      "urls": report.urls, "skipped": report.skipped, "skipped_examples": report.examples,
                      "converted": report.converted, "removed": len(report.removed)}))
    # the human-readable part goes to stderr, so stdout stays one JSON line for scripts
    if report.removed:
        print(f"removed from {args.out} (earlier run): {_describe(report.removed)}", file=sys.stderr)
    for reason, n in sorted(report.skipped.items()):
        print(f"skipped {n} input(s), {reason}; e.g. {'; '.join(report.examples.get(reason, []))}",
              file=sys.stderr)
    if report.total == 0:
        hint = " (is --image-root right?)" if report.skipped.get("missing_file") else ""
        print(f"error: no sample written{hint}", file=sys.stderr)
        return 1
    print(f"wrote {report.total} samples in {len(report.shards)} shard(s); read them as {report.urls} "
          f"(list: {Path(args.out) / SHARD_LIST})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
