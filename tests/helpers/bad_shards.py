"""Builders of broken webdataset data for fault-injection tests: bad images, captions and tars.

Every builder is deterministic (seeded), tiny (16x16 images) and writes plain files; nothing here reads
the shards back, so the tests check the real readers against what was planted.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

Sample = dict[str, bytes | str]
"""A raw sample to write: ``{"__key__": key, ext: bytes, ...}`` (one tar member per extension)."""


def image_bytes(seed: int, size: int = 16, fmt: str = "JPEG") -> bytes:
    """A random ``size`` x ``size`` RGB image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG *header* claiming ``width`` x ``height`` grey pixels, with almost no pixel data.

    Only the header is needed: a reader that decodes before checking the size allocates
    width x height bytes (2.5 GB for the default) before it notices the data is missing.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def good(key: str, seed: int) -> Sample:
    """A sample every reader must deliver: a decodable JPEG and a non-empty UTF-8 caption."""
    return {"__key__": key, "jpg": image_bytes(seed), "txt": f"a good caption {key}".encode()}


def bad_sample(kind: str, key: str, seed: int) -> tuple[Sample, str | None]:
    """One sample with fault ``kind`` (see :data:`SAMPLE_FAULTS`) and the counter that must count it.

    ``None`` as counter means the sample is fine despite its looks and must be delivered.
    """
    caption = f"caption of {key}".encode()
    jpeg = image_bytes(seed)
    samples: dict[str, tuple[Sample, str | None]] = {
        "corrupt_jpeg": ({"jpg": np.random.default_rng(seed).bytes(600), "txt": caption}, "bad_image"),
        "truncated_jpeg": ({"jpg": jpeg[: len(jpeg) // 2], "txt": caption}, "bad_image"),
        "png_named_jpg": ({"jpg": image_bytes(seed, fmt="PNG"), "txt": caption}, None),
        "text_named_png": ({"png": b"this is a caption, not an image\n" * 4, "txt": caption}, "bad_image"),
        "zero_byte_image": ({"jpg": b"", "txt": caption}, "bad_image"),
        # a zero-byte jpg next to a good png: the png is used, the pair is not lost
        "zero_byte_jpg_good_png": ({"jpg": b"", "png": image_bytes(seed, fmt="PNG"), "txt": caption}, None),
        "png_bomb_header": ({"png": png_bomb(), "txt": caption}, "oversized_image"),
        "above_max_pixels": ({"png": image_bytes(seed, size=64, fmt="PNG"), "txt": caption}, "oversized_image"),
        "zero_byte_caption": ({"jpg": jpeg, "txt": b""}, "empty_caption"),
        "blank_caption": ({"jpg": jpeg, "txt": b" \n\t "}, "empty_caption"),
        "non_utf8_caption": ({"jpg": jpeg, "txt": b"caf\xe9 cr\xe8me \xff\xfe"}, "bad_caption"),
        "utf8_bom_caption": ({"jpg": jpeg, "txt": b"\xef\xbb\xbfa caption with a byte-order mark"}, None),
        "no_caption": ({"jpg": jpeg, "json": b"{}"}, "missing_caption"),
        "no_image": ({"txt": caption}, "missing_image"),
        "non_utf8_json": ({"jpg": jpeg, "txt": caption, "json": b"{\"a\": \"\xff\"}"}, None),
    }
    sample, counter = samples[kind]
    return {"__key__": key, **sample}, counter


SAMPLE_FAULTS = ("corrupt_jpeg", "truncated_jpeg", "png_named_jpg", "text_named_png", "zero_byte_image",
                 "zero_byte_jpg_good_png", "png_bomb_header", "above_max_pixels", "zero_byte_caption",
                 "blank_caption", "non_utf8_caption", "utf8_bom_caption", "no_caption", "no_image",
                 "non_utf8_json")
"""Every fault :func:`bad_sample` plants."""

MAX_PIXELS = 32 * 32
"""``max_image_pixels`` the tests use: 16x16 images pass, the 64x64 ``above_max_pixels`` image does not."""


def write_tar(path: Path, samples: list[Sample]) -> list[tuple[str, int]]:
    """Write ``samples`` as one tar; returns (key, offset of its first member's header) per sample."""
    starts = []
    with tarfile.open(path, "w") as tar:
        for s in samples:
            starts.append((str(s["__key__"]), tar.offset))
            for ext, data in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return starts


def write_truncated(path: Path, prefix: str, n: int = 6, cut_sample: int = 3) -> set[str]:
    """A tar of ``n`` good samples cut 100 bytes into the image data of sample ``cut_sample``.

    Returns the keys a correct reader still delivers: the samples before the cut one.
    """
    samples = [good(f"{prefix}{i}", 1000 + i) for i in range(n)]
    starts = write_tar(path, samples)
    path.write_bytes(path.read_bytes()[: starts[cut_sample][1] + 512 + 100])  # 512: the member's header
    return {f"{prefix}{i}" for i in range(cut_sample)}


def write_empty_tar(path: Path) -> None:
    """A valid tar archive without a single member (just the end-of-archive blocks)."""
    with tarfile.open(path, "w"):
        pass


SHARD_FAULTS = ("truncated_mid_member", "zero_byte_tar", "empty_tar", "missing_shard", "not_a_tar")
"""Every fault :func:`write_bad_shard` plants."""


def write_bad_shard(kind: str, path: Path, prefix: str) -> tuple[set[str], int]:
    """Shard fault ``kind`` at ``path``; returns (keys still deliverable, ``bad_shard`` count it adds)."""
    if kind == "truncated_mid_member":
        return write_truncated(path, prefix), 1
    if kind == "zero_byte_tar":
        path.write_bytes(b"")
        return set(), 1
    if kind == "empty_tar":
        write_empty_tar(path)
        return set(), 0  # valid, merely empty: nothing is skipped
    if kind == "missing_shard":
        path.unlink(missing_ok=True)
        return set(), 1
    if kind == "not_a_tar":
        path.write_bytes(b"garbage, not a tar archive " * 40)
        return set(), 1
    raise ValueError(f"unknown shard fault {kind!r}")
