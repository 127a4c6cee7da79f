"""Per-shard feature files: ``<out>/<shard-stem>.npz`` + ``<shard-stem>.done`` marker.

Each file holds, for one shard, the sample keys, captions, and L2-normalised frozen image (center crop)
and caption embeddings in fp16. Both files are written with :func:`pipeline.fileio.atomic_write` and the
done marker is written last, so a killed job never leaves a file that looks finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.fileio import atomic_write, atomic_write_text


@dataclass
class ShardFeatures:
    """Features of one shard."""

    keys: np.ndarray  # [n] str
    captions: np.ndarray  # [n] str
    image: np.ndarray  # [n, d] float16, normalised
    text: np.ndarray  # [n, d] float16, normalised

    def __len__(self) -> int:
        return len(self.keys)


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


def write_features(out_dir: str | Path, stem: str, feats: ShardFeatures, meta: dict | None = None) -> Path:
    """Atomically write a shard's features, then its done marker (which records the sample count)."""
    out_dir = Path(out_dir)
    final = atomic_write(feature_path(out_dir, stem), lambda f: np.savez(
        f,
        keys=np.asarray(feats.keys, dtype=str),
        captions=np.asarray(feats.captions, dtype=str),
        image=np.asarray(feats.image, dtype=np.float16),
        text=np.asarray(feats.text, dtype=np.float16),
    ))
    # The marker goes last: it is only there once the data file is completely in place.
    atomic_write_text(done_path(out_dir, stem),
                      f"{len(feats)}\n" + "".join(f"{k}={v}\n" for k, v in (meta or {}).items()))
    return final


def read_features(path: str | Path) -> ShardFeatures:
    """Load one feature file (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return ShardFeatures(z["keys"], z["captions"], z["image"], z["text"])


def finished_stems(out_dir: str | Path) -> list[str]:
    """Sorted stems of every shard whose features are completely written."""
    out_dir = Path(out_dir)
    return sorted(p.stem for p in out_dir.glob("*.done") if feature_path(out_dir, p.stem).exists())
