"""Per-shard files of extraction and clustering, bound to the content of their shard.

``<out>/<shard-stem>.npz`` + ``<shard-stem>.done`` (``pipeline extract``): for one shard, the sample keys,
captions, L2-normalised frozen image (center crop) and caption embeddings in fp16, and one content digest
per sample. ``clusters/assign/<shard-stem>.npz`` (``pipeline cluster``): keys, captions, domain, concept,
similarity and the same digests. Every file is written with :func:`pipeline.fileio.atomic_write`; the done
marker is written last, so a killed job never leaves a file that looks finished.

**Content binding** (docs/ARCHITECTURE.md section 4). Files are found by shard *file name* and samples by
*key*, and the shard writer numbers keys from 0, so a clustering applied to another shard set with the same
names would label every sample wrongly without noticing. Each sample therefore carries
:func:`~pipeline.data.sample_checks.sample_digest` (caption + image byte size) from extraction into its
assignment, and the file carries the shard's :func:`shard_fingerprint` over every (key, digest) pair. The
stage-1 stream compares each sample's digest with its assignment's before the label is used, and refuses
files written before fingerprints existed.

**Strings** are stored as one UTF-8 byte buffer plus ``n + 1`` offsets (``<name>_utf8`` and
``<name>_offsets``), so a file grows with the total text: numpy's fixed-width string arrays sized every
entry by the longest one (one 1 MB caption made a 20-sample file 84 MB). Files of the older layout
(``keys`` / ``captions`` string arrays, no digests) still load; their fingerprint is ``None``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.fileio import atomic_write, atomic_write_text

FORMAT = 2
"""Layout version written into feature and assignment files (1: string arrays, no digests)."""


class ContentMismatch(ConfigError):
    """A feature or assignment file does not belong to the shard content it is used with, or predates
    content fingerprints (docs/ARCHITECTURE.md section 4); the message names the shard and the file."""


@dataclass
class ShardFeatures:
    """Features of one shard."""

    keys: np.ndarray  # [n] str (object array: no fixed width)
    captions: np.ndarray  # [n] str (object array)
    image: np.ndarray  # [n, d] float16, normalised
    text: np.ndarray  # [n, d] float16, normalised
    digest: np.ndarray | None = None  # [n] uint64 sample_digest; None: written before fingerprints

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def fingerprint(self) -> str | None:
        """:func:`shard_fingerprint` of the samples, ``None`` without digests."""
        return None if self.digest is None else shard_fingerprint(self.keys, self.digest)


@dataclass
class Assignments:
    """The cluster assignment of one shard's samples (``clusters/assign/<stem>.npz``)."""

    keys: np.ndarray  # [n] str (object array)
    captions: np.ndarray  # [n] str (object array)
    domain: np.ndarray  # [n] int64
    concept: np.ndarray  # [n] int64, global concept id
    sim: np.ndarray  # [n] float32, similarity to the concept centroid
    digest: np.ndarray | None = None  # [n] uint64, carried from the feature file; None: older layout

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def fingerprint(self) -> str | None:
        """:func:`shard_fingerprint` of the samples, ``None`` without digests."""
        return None if self.digest is None else shard_fingerprint(self.keys, self.digest)


def shard_fingerprint(keys: Sequence[str], digests: Sequence[int]) -> str:
    """``sha256:<hex>`` over the sorted ``(key, digest)`` pairs of a shard's samples (order-free)."""
    h = hashlib.sha256()
    for key, digest in sorted(zip((str(k) for k in keys), (int(d) for d in digests))):
        h.update(f"{key}\t{digest:016x}\n".encode("utf-8", "surrogatepass"))
    return f"sha256:{h.hexdigest()}"


def pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 UTF-8 buffer, int64 offsets [n + 1])``: a string array whose size is its total text."""
    encoded = [str(s).encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.array([len(b) for b in encoded], dtype=np.int64), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def unpack_strings(buffer: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_strings`: an object array of ``str``."""
    raw = np.asarray(buffer, dtype=np.uint8).tobytes()
    bounds = np.asarray(offsets, dtype=np.int64).tolist()
    out = np.empty(len(bounds) - 1, dtype=object)
    out[:] = [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def _strings(z, name: str) -> np.ndarray:
    """String field ``name`` of an open npz in either layout."""
    if f"{name}_utf8" in z.files:
        return unpack_strings(z[f"{name}_utf8"], z[f"{name}_offsets"])
    return np.asarray(z[name]).astype(object)  # layout 1: fixed-width numpy strings


def _string_fields(**fields: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for name, values in fields.items():
        out[f"{name}_utf8"], out[f"{name}_offsets"] = pack_strings(values)
    return out


def _digest_fields(keys, digest) -> dict[str, np.ndarray]:
    if digest is None:
        return {}
    digest = np.asarray(digest, dtype=np.uint64)
    if len(digest) != len(keys):
        raise ValueError(f"{len(digest)} digests for {len(keys)} samples")
    return {"digest": digest, "fingerprint": np.array(shard_fingerprint(keys, digest))}


def _checked_digest(z, path: Path, keys: np.ndarray) -> np.ndarray | None:
    """The digests of an open npz, after checking they hash to the fingerprint stored beside them."""
    if "digest" not in z.files:
        return None
    digest = np.asarray(z["digest"], dtype=np.uint64)
    stored = str(z["fingerprint"]) if "fingerprint" in z.files else ""
    if len(digest) != len(keys) or shard_fingerprint(keys, digest) != stored:
        raise ContentMismatch(f"{path}: its sample digests do not match its stored fingerprint {stored!r} (the "
                              "file was altered or damaged); re-run the stage that wrote it")
    return digest


def stored_fingerprint(path: str | Path) -> str | None:
    """The fingerprint recorded in a feature or assignment file (``None``: older layout), read without
    loading the arrays."""
    with np.load(path, allow_pickle=False) as z:
        return str(z["fingerprint"]) if "fingerprint" in z.files else None


def shard_stem(url: str) -> str:
    """Feature-file stem of a shard URL: its file name without ``.tar`` (``000123.tar`` -> ``000123``)."""
    name = url.rstrip("/").split("/")[-1].split("?")[0]
    return name[: -len(".tar")] if name.endswith(".tar") else name


def feature_path(out_dir: str | Path, stem: str) -> Path:
    return Path(out_dir) / f"{stem}.npz"


def done_path(out_dir: str | Path, stem: str) -> Path:
    return Path(out_dir) / f"{stem}.done"


def is_done(out_dir: str | Path, stem: str) -> bool:
    """True when the shard's features were completely written (marker present and file present)."""
    return done_path(out_dir, stem).exists() and feature_path(out_dir, stem).exists()


def read_marker(out_dir: str | Path, stem: str) -> dict[str, str] | None:
    """The done marker's fields (``samples`` from its first line, then its ``key=value`` lines), or ``None``
    when there is no marker."""
    try:
        lines = done_path(out_dir, stem).read_text().splitlines()
    except FileNotFoundError:
        return None
    fields = {"samples": lines[0].strip()} if lines else {}
    fields.update(line.split("=", 1) for line in lines[1:] if "=" in line)
    return fields


def shard_state(out_dir: str | Path, stem: str) -> str:
    """Where extraction stands for one shard:

    * ``missing``: no done marker or no feature file;
    * ``stale``: the marker has no content fingerprint (written before fingerprints): the features cannot
      be bound to the shard, so a rerun re-embeds it;
    * ``incomplete``: the marker records ``bad_shard`` > 0 (the shard broke off or could not be read in
      full, e.g. a truncated download): features of the samples read are there, a rerun retries it;
    * ``done``.
    """
    marker = read_marker(out_dir, stem)
    if marker is None or not feature_path(out_dir, stem).exists():
        return "missing"
    if "fingerprint" not in marker:
        return "stale"
    return "incomplete" if int(marker.get("bad_shard", "0") or 0) > 0 else "done"


def write_features(out_dir: str | Path, stem: str, feats: ShardFeatures, meta: dict | None = None) -> Path:
    """Atomically write a shard's features, then its done marker.

    The marker records the sample count, ``complete=1`` (``0`` when ``meta`` counts a ``bad_shard``), the
    content fingerprint (when ``feats`` has digests) and every entry of ``meta`` (the reader's skip
    counters). An older marker is removed first and the feature file again when the marker cannot be
    written (a full disk), so no state leaves a feature file that disagrees with its marker.
    """
    out_dir = Path(out_dir)
    marker = done_path(out_dir, stem)
    marker.unlink(missing_ok=True)  # from here on the shard reads as not done until the new marker lands
    arrays = {
        **_string_fields(keys=feats.keys, captions=feats.captions),
        "image": np.asarray(feats.image, dtype=np.float16),
        "text": np.asarray(feats.text, dtype=np.float16),
        **_digest_fields(feats.keys, feats.digest),
        "format": np.array(FORMAT),
    }
    final = atomic_write(feature_path(out_dir, stem), lambda f: np.savez(f, **arrays))
    meta = dict(meta or {})
    lines = [str(len(feats)), f"complete={0 if int(meta.get('bad_shard', 0) or 0) else 1}"]
    if "fingerprint" in arrays:
        lines.append(f"fingerprint={arrays['fingerprint']}")
    lines += [f"{k}={v}" for k, v in meta.items()]
    try:
        # The marker goes last: it is only there once the data file is completely in place.
        atomic_write_text(marker, "\n".join(lines) + "\n")
    except BaseException:
        final.unlink(missing_ok=True)  # a feature file without its marker would only be redone anyway
        raise
    return final


def read_features(path: str | Path) -> ShardFeatures:
    """Load one feature file of either layout (no pickles); digests are checked against the fingerprint."""
    with np.load(path, allow_pickle=False) as z:
        keys = _strings(z, "keys")
        return ShardFeatures(keys, _strings(z, "captions"), z["image"], z["text"], _checked_digest(z, Path(path), keys))


def feature_count(path: str | Path) -> int:
    """Samples in a feature file, read from its offsets (or keys, older layout) without the embeddings."""
    with np.load(path, allow_pickle=False) as z:
        return len(z["keys_offsets"]) - 1 if "keys_offsets" in z.files else len(z["keys"])


def finished_stems(out_dir: str | Path) -> list[str]:
    """Sorted stems of every shard whose features are completely written."""
    out_dir = Path(out_dir)
    return sorted(p.stem for p in out_dir.glob("*.done") if feature_path(out_dir, p.stem).exists())


def write_assignments(path: str | Path, a: Assignments) -> Path:
    """Atomically write one shard's assignment file (digests and fingerprint included when ``a`` has them)."""
    arrays = {
        **_string_fields(keys=a.keys, captions=a.captions),
        "domain": np.asarray(a.domain, dtype=np.int64),
        "concept": np.asarray(a.concept, dtype=np.int64),
        "sim": np.asarray(a.sim, dtype=np.float32),
        **_digest_fields(a.keys, a.digest),
        "format": np.array(FORMAT),
    }
    # np.savez on a file object writes exactly there (it appends ".npz" only to a path that lacks it).
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def read_assignments(path: str | Path) -> Assignments:
    """Load one assignment file of either layout; digests are checked against the stored fingerprint.

    Fields a hand-made file lacks (``captions``, ``domain``, ``sim``) come back empty-valued.
    """
    with np.load(path, allow_pickle=False) as z:
        keys = _strings(z, "keys")
        n = len(keys)
        captions = _strings(z, "captions") if ("captions_utf8" in z.files or "captions" in z.files) \
            else np.full(n, "", dtype=object)
        domain = z["domain"] if "domain" in z.files else np.full(n, -1, dtype=np.int64)
        sim = z["sim"] if "sim" in z.files else np.zeros(n, dtype=np.float32)
        return Assignments(keys, captions, domain, z["concept"], sim, _checked_digest(z, Path(path), keys))
