"""Checks of raw samples and streams shared by the shard reader and the stage-1 task streams.

What a skip is counted as (:data:`SKIP_REASONS`) and when a stream that can never deliver gives up
(:class:`StreamHealth`, :class:`NoUsableData`) are documented in :mod:`pipeline.data.shards`. The content
digest of a sample (:func:`sample_digest`), which binds feature and assignment files to the samples they
were computed from, is defined here too, because every reader computes it from a checked sample.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import Counter

from PIL import Image

SKIP_REASONS = ("bad_image", "oversized_image", "oversized_member", "missing_image", "missing_caption",
                "empty_caption", "bad_caption", "bad_shard")
"""Counters of skipped data (see the module docstring); ``bad_shard`` counts shards unreadable or
truncated (rest skipped), the others count samples."""
OPEN_FIELD = "__open__"
"""Raw-sample field set by the tar reader: the number of the shard opening the sample came from."""
DROPPED_FIELD = "__dropped__"
"""Raw-sample field set by the tar reader: a member left unread for its size (``max_member_bytes``)."""


class NoUsableData(RuntimeError):
    """The shards cannot deliver a single usable sample (wrong URLs, every shard or sample bad)."""


class OversizedImage(ValueError):
    """An image whose header declares more pixels than allowed; raised before any pixel is decoded."""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open ``data`` lazily (header only) and refuse images above ``max_pixels`` (0: no own limit).

    Raises :class:`OversizedImage` for too many pixels, including PIL's own decompression-bomb error
    (above twice ``PIL.Image.MAX_IMAGE_PIXELS``); any other exception means undecodable bytes. The
    caller decodes with ``.convert`` / ``.load`` and closes the image.
    """
    try:
        pil_limit = Image.MAX_IMAGE_PIXELS
        if max_pixels and pil_limit is not None and max_pixels <= pil_limit:
            # every image PIL would warn about is refused below: skip its warning, the count says it all
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
        else:
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise OversizedImage(str(e)) from None
    width, height = im.size
    if max_pixels and width * height > max_pixels:
        im.close()
        raise OversizedImage(f"{width}x{height} pixels > max_image_pixels={max_pixels}")
    return im


def checked_image(data: bytes, max_pixels: int, stats: Counter, header_only: bool = False) -> Image.Image | None:
    """The image of ``data`` decoded to RGB, or ``None`` with the reason counted in ``stats``
    (``oversized_image`` or ``bad_image``). ``header_only``: read the header alone (cheap; truncated
    pixel data shows only on a full decode) and return the closed, undecoded image."""
    try:
        with open_image(data, max_pixels) as im:
            return im if header_only else im.convert("RGB")  # convert forces a full decode
    except OversizedImage:
        stats["oversized_image"] += 1
    except Exception:  # PIL raises many types for data that is no image
        stats["bad_image"] += 1
    return None


def check_sample(s: dict, image_keys: tuple[str, ...], text_key: str, stats: Counter) -> tuple[str, str] | None:
    """``(image key, caption)`` of a raw sample, or ``None`` with the reason counted in ``stats``.

    Checks everything but the image bytes. Among several image members the first non-empty one in
    ``image_keys`` order wins, so a zero-byte ``.jpg`` next to a good ``.png`` does not lose the pair.
    """
    if DROPPED_FIELD in s:  # a member too large to read: the sample is incomplete by design
        stats["oversized_member"] += 1
        return None
    present = [k for k in image_keys if k in s]
    if not present:
        stats["missing_image"] += 1
        return None
    ext = next((k for k in present if s[k]), present[0])
    if text_key not in s:
        stats["missing_caption"] += 1
        return None
    try:
        caption = s[text_key].decode("utf-8-sig").strip()  # -sig: drop a byte-order mark, if any
    except UnicodeDecodeError:
        stats["bad_caption"] += 1
        return None
    if not caption:
        stats["empty_caption"] += 1
        return None
    return ext, caption


def sample_digest(caption: str, image_nbytes: int) -> int:
    """The content digest of one sample: 64 bits of BLAKE2b over its checked caption and the byte size of
    the image member it uses, as an unsigned integer.

    It binds feature files and cluster assignments to the samples they were computed from
    (docs/ARCHITECTURE.md section 4): an assignment is looked up by (shard file name, key), and the shard
    writer numbers keys from 0, so two shard sets collide on every key. Both readers compute it from what
    they read anyway (the caption as :func:`check_sample` returns it, the length of the image bytes), so
    no pixel is decoded and no image byte hashed; two different images with the same caption and the
    very same byte size are the one collision it accepts.
    """
    h = hashlib.blake2b(f"{int(image_nbytes)}\n{caption}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def raw_sample_digest(s: dict, image_keys: tuple[str, ...], text_key: str) -> int | None:
    """:func:`sample_digest` of a raw tar sample, or ``None`` when :func:`check_sample` would skip it.

    Picks the image member and caption exactly as the readers do; the image bytes are not opened.
    """
    checked = check_sample(s, image_keys, text_key, Counter())
    if checked is None:
        return None
    ext, caption = checked
    return sample_digest(caption, len(s[ext]))


class StreamHealth:
    """Stops an endless (resampled) stream that can never deliver, instead of letting it spin forever.

    Both signals count shard *openings*, so the limit scales with the data, not with sample counts:

    * :meth:`check_open` (before each opening): ``limit`` openings in a row gave no raw sample at all
      (missing, unreadable or empty shards);
    * :meth:`sample` (where samples are checked): the samples skipped since the last usable one came
      from more than ``limit`` different openings (every sample bad). Each raw sample carries the
      number of its opening and the check runs *after* the shuffle buffer. Comparing with the
      reader's own opening count instead would run a buffer's worth of shards ahead of the checks and
      stop a healthy stream of small shards before its first sample was checked.
    """

    def __init__(self, limit: int, urls: str, stats: Counter):
        self.limit, self.urls, self.stats = limit, urls, stats
        self._bad_opens: set[int] = set()

    def check_open(self) -> None:
        """Raise :class:`NoUsableData` after ``limit`` openings in a row without a raw sample."""
        dry = self.stats["shards"] - self.stats["_last_raw_open"]
        if dry >= self.limit:
            raise NoUsableData(f"no usable samples in the last {dry} shards opened: none could be read or "
                               f"held a sample; check data.urls={self.urls!r} (counts: {public_counts(self.stats)})")

    def sample(self, s: dict, usable: bool) -> None:
        """Record one checked sample; raise once the skipped ones span more than ``limit`` openings."""
        if usable:
            self._bad_opens.clear()
            return
        self._bad_opens.add(s.get(OPEN_FIELD, 0))
        if len(self._bad_opens) > self.limit:
            raise NoUsableData(f"no usable samples in the last {len(self._bad_opens)} shards opened: every "
                               f"sample was skipped; check data.urls={self.urls!r} (counts: {public_counts(self.stats)})")


def health_limit(sources: list[list[str]]) -> int:
    """Shard openings in a row without a usable sample after which a resampled stream gives up.

    Three times the number of shards (at least 20): a stream with any usable shard meets one long
    before that, while a hopeless one fails after a fraction of a second of opening bad shards.
    """
    return max(20, 3 * sum(len(s) for s in sources))


def public_counts(stats: dict) -> dict[str, int]:
    """``stats`` without the internal entries (names starting with ``_``) that streams keep beside the counters."""
    return {k: v for k, v in stats.items() if not k.startswith("_")}


