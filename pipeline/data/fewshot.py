"""Downstream few-shot datasets under the base-to-new protocol (docs/ARCHITECTURE.md section 6).

Readers turn each on-disk format into ``{"train", "val", "test"}`` lists of :class:`Datum`:
CoOp split files (``split_zhou_*.json``), FGVCAircraft's official text splits, the ImageNet family
(``classnames.txt`` + wnid folders) and a generic labelled folder. :func:`build_fewshot` then

1. samples K shots per class from train (and min(K, 4) from val) with the seed, *before* any class
   split, and caches the chosen indices in a JSON file so every method trains on the same images;
2. keeps the ``base`` classes (first ceil(n/2) labels), the ``new`` ones (the rest) or ``all``, and
   relabels them to ``0..len-1`` so each subset is evaluated in its own label space.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.config import FewShotConfig, validate_fewshot
from pipeline.data.datasets_meta import CALTECH_IGNORED, DatasetInfo, clean_classname, get_info
from pipeline.data.shard_writer import IMAGE_EXTS
from pipeline.fileio import atomic_write_json

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Datum:
    """One labelled image."""

    path: str
    """Image file path."""
    label: int
    """Class index in the dataset's (or subset's) label space."""
    classname: str
    """Readable class name."""


@dataclass
class FewShotSplits:
    """A dataset after shot sampling and class subsampling."""

    name: str
    """Dataset name."""
    train: list[Datum]
    """K-shot training images (labels in the subset's space)."""
    val: list[Datum]
    """min(K, 4)-shot validation images."""
    test: list[Datum]
    """All test images of the subset's classes."""
    classnames: list[str]
    """Class names indexed by (subset) label."""
    template: str
    """Prompt template with ``{}`` for the class name."""
    subsample: str
    """``all``, ``base`` or ``new``."""


Splits = dict[str, list[Datum]]


def read_split_file(path: str | Path, image_root: str | Path, info: DatasetInfo | None = None) -> Splits:
    """Read a CoOp ``{"train"|"val"|"test": [[relpath, label, classname], ...]}`` file."""
    data = json.loads(Path(path).read_text())
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise ValueError(f"{path}: split file lacks {missing}")
    return {s: [Datum(os.path.join(image_root, rel), int(y), clean_classname(c, info)) for rel, y, c in data[s]]
            for s in SPLITS}


def write_split_file(path: str | Path, splits: Splits, image_root: str | Path) -> None:
    """Atomically write ``splits`` in the CoOp split-file format with paths relative to ``image_root``."""
    data = {s: [[os.path.relpath(d.path, image_root), d.label, d.classname] for d in splits[s]] for s in SPLITS}
    atomic_write_json(path, data, indent=None)


def read_fgvc_aircraft(dataset_dir: str | Path) -> Splits:
    """FGVCAircraft's official split: ``variants.txt`` + ``images_variant_{train,val,test}.txt``."""
    d = Path(dataset_dir)
    names = [line.strip() for line in (d / "variants.txt").read_text().splitlines() if line.strip()]
    label = {n: i for i, n in enumerate(names)}
    out: Splits = {}
    for s in SPLITS:
        items = []
        for line in (d / f"images_variant_{s}.txt").read_text().splitlines():
            if line.strip():
                image_id, variant = line.strip().split(" ", 1)  # variant names contain spaces
                items.append(Datum(str(d / "images" / f"{image_id}.jpg"), label[variant], variant))
        out[s] = items
    return out


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def _imagenet_names(dataset_dir: Path, root: Path) -> dict[str, str]:
    for cand in (dataset_dir / "classnames.txt", root / "imagenet" / "classnames.txt"):
        if cand.is_file():
            pairs = (line.strip().split(" ", 1) for line in cand.read_text().splitlines() if line.strip())
            return {wnid: name for wnid, name in pairs}
    raise FileNotFoundError(f"classnames.txt ('<wnid> <name>' per line) not found in {dataset_dir}")


def read_imagenet(dataset_dir: str | Path, image_dir: str = "images", root: str | Path = "") -> Splits:
    """ImageNet: ``images/{train,val}/<wnid>/*``; val doubles as test (as in the protocol)."""
    d = Path(dataset_dir)
    names = _imagenet_names(d, Path(root))
    out: Splits = {}
    for s in ("train", "val"):
        out[s] = [Datum(str(p), y, names[w]) for y, w in enumerate(names)
                  if (d / image_dir / s / w).is_dir() for p in _images_in(d / image_dir / s / w)]
    out["test"] = out["val"]
    return out


def read_imagenet_variant(dataset_dir: str | Path, image_dir: str, root: str | Path = "") -> Splits:
    """ImageNetV2 (folders ``0..999``) or -Sketch/-A/-R (wnid folders; A and R have 200 classes, each
    labelled by its position among the folders present). Test only."""
    d, names = Path(dataset_dir), _imagenet_names(Path(dataset_dir), Path(root))
    wnids = list(names)
    folders = sorted(p.name for p in (d / image_dir).iterdir() if p.is_dir())
    if folders and all(f.isdigit() for f in folders):
        pairs = [(f, int(f), names[wnids[int(f)]]) for f in folders]
    else:
        pairs = [(f, i, names[f]) for i, f in enumerate(sorted(f for f in folders if f in names))]
    test = [Datum(str(p), y, n) for f, y, n in pairs for p in _images_in(d / image_dir / f)]
    return {"train": [], "val": [], "test": test}


def read_labelled_folder(root: str | Path, p_train: float = 0.5, p_val: float = 0.2, seed: int = 1) -> Splits:
    """``root/{train,val,test}/<class>/*`` if those folders exist, else ``root/<class>/*`` split per
    class with fractions ``p_train``/``p_val`` (rest test), deterministically from ``seed``."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        return {s: [Datum(str(p), y, clean_classname(c)) for y, c in enumerate(classes)
                    if (root / s / c).is_dir() for p in _images_in(root / s / c)] for s in SPLITS}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class folders")
    rng, out = random.Random(f"split-{seed}"), {s: [] for s in SPLITS}
    for y, c in enumerate(classes):
        imgs = _images_in(root / c)
        rng.shuffle(imgs)
        n_tr, n_va = round(p_train * len(imgs)), round(p_val * len(imgs))
        for s, part in zip(SPLITS, (imgs[:n_tr], imgs[n_tr:n_tr + n_va], imgs[n_tr + n_va:])):
            out[s] += [Datum(str(p), y, clean_classname(c)) for p in part]
    return out


def load_splits(name: str, root: str | Path, split_file: str = "") -> tuple[Splits, str]:
    """All classes of dataset ``name`` (or ``folder``) under ``root``: (splits, image root)."""
    root = Path(root)
    if name == "folder":
        if split_file:
            return read_split_file(split_file, root), str(root)
        return read_labelled_folder(root), str(root)
    info = get_info(name)
    d = root / info.dataset_dir
    image_root = d / info.image_dir if info.image_dir else d
    if split_file or info.kind == "coop_split":
        splits = read_split_file(split_file or d / info.split_file, image_root, info)
        if name == "Caltech101":
            bad = {clean_classname(c, info) for c in CALTECH_IGNORED}
            if any(x.classname in bad for s in splits.values() for x in s):
                raise ValueError(f"{name}: split lists ignored classes {CALTECH_IGNORED}")
        return splits, str(image_root)
    if info.kind == "fgvc":
        return read_fgvc_aircraft(d), str(image_root)
    if info.kind == "imagenet":
        return read_imagenet(d, info.image_dir, root), str(image_root)
    return read_imagenet_variant(d, info.image_dir, root), str(image_root)


def classnames_of(splits: Splits) -> list[str]:
    """Class names indexed by label; labels must be ``0..n-1`` with one name each."""
    names: dict[int, str] = {}
    for s in splits.values():
        for x in s:
            if names.setdefault(x.label, x.classname) != x.classname:
                raise ValueError(f"label {x.label} has two names: {names[x.label]!r} and {x.classname!r}")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"labels are not contiguous from 0: {sorted(names)[:10]}...")
    return [names[i] for i in range(len(names))]


def sample_shots(items: list[Datum], k: int, seed: int) -> list[int]:
    """Indices of ``k`` random items per label (all of a class with fewer), sorted, from ``seed``."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, x in enumerate(items):
        by_label[x.label].append(i)
    rng, chosen = random.Random(f"shots-{seed}-{k}"), []
    for y in sorted(by_label):
        idx = by_label[y]
        if len(idx) < k:
            warnings.warn(f"class {y} has {len(idx)} < {k} images; using all of them", stacklevel=2)
        chosen += idx if len(idx) <= k else rng.sample(idx, k)
    return sorted(chosen)


def _fingerprint(items: list[Datum], image_root: str) -> str:
    # paths relative to the image root, so moving the data folder keeps the cache valid
    h = hashlib.sha256()
    for x in items:
        h.update(f"{os.path.relpath(x.path, image_root)}\t{x.label}\n".encode())
    return h.hexdigest()[:16]


def cached_shots(splits: Splits, image_root: str, k: int, seed: int, cache_file: str | Path | None) -> dict:
    """Shot indices ``{"train": [...], "val": [...]}``, read from ``cache_file`` or sampled and written.

    A cache written for a different train/val list raises instead of silently resampling.
    """
    fp = {s: _fingerprint(splits[s], image_root) for s in ("train", "val")}
    if cache_file is not None and Path(cache_file).is_file():
        data = json.loads(Path(cache_file).read_text())
        if data.get("fingerprint") != fp or data.get("k_shot") != k or data.get("seed") != seed:
            raise ValueError(f"{cache_file}: cached shots were sampled from other data; delete it to resample")
        return data["indices"]
    indices = {"train": sample_shots(splits["train"], k, seed),
               "val": sample_shots(splits["val"], min(k, 4), seed)}
    if cache_file is not None:
        # atomic: concurrent runs never read half a file
        atomic_write_json(cache_file, {"k_shot": k, "seed": seed, "fingerprint": fp, "indices": indices},
                          indent=None)
    return indices


def subsample_classes(splits: Splits, classnames: list[str], which: str) -> tuple[Splits, list[str]]:
    """Keep base (first ceil(n/2) labels), new (the rest) or all classes, relabelled from 0."""
    n = len(classnames)
    m = math.ceil(n / 2)
    lo, hi = {"all": (0, n), "base": (0, m), "new": (m, n)}[which]
    out = {s: [Datum(x.path, x.label - lo, x.classname) for x in items if lo <= x.label < hi]
           for s, items in splits.items()}
    return out, classnames[lo:hi]


def build_fewshot(cfg: FewShotConfig) -> FewShotSplits:
    """Load ``cfg.dataset``, sample (cached) shots for ``cfg.seed``, keep ``cfg.subsample`` classes."""
    validate_fewshot(cfg)
    splits, image_root = load_splits(cfg.dataset, cfg.root, cfg.split_file)
    classnames = classnames_of(splits)
    if cfg.k_shot > 0:
        cache = (Path(cfg.shot_cache_dir) / cfg.dataset / f"shot_{cfg.k_shot}-seed_{cfg.seed}.json"
                 if cfg.shot_cache_dir else None)
        idx = cached_shots(splits, image_root, cfg.k_shot, cfg.seed, cache)
        splits = {**splits, **{s: [splits[s][i] for i in idx[s]] for s in ("train", "val")}}
    splits, names = subsample_classes(splits, classnames, cfg.subsample)
    template = get_info(cfg.dataset).template if cfg.dataset != "folder" else "a photo of a {}."
    return FewShotSplits(cfg.dataset, splits["train"], splits["val"], splits["test"], names, template,
                         cfg.subsample)


class ImageListDataset(Dataset):
    """``(transform(image), label)`` pairs over a list of :class:`Datum`."""

    def __init__(self, items: list[Datum], transform: Callable | None = None):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        x = self.items[i]
        with Image.open(x.path) as im:
            image = im.convert("RGB")
        return (self.transform(image) if self.transform is not None else image), x.label
