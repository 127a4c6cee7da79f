"""The suite's data: a clean caption corpus and backbone, style-shifted few-shot sets, stage-1 corpora.

Everything is built offline under ``SuiteDataConfig.cache_dir`` (``cache/suite``), each part cached and
keyed by the config values it depends on (``suite_spec.json`` written last in the part's folder, so a
half-built part is rebuilt):

* ``corpus/{000000..}.tar``: the backbone's caption corpus. EVERY concept of the suite (all glyph classes,
  the handwritten digits, Fashion-MNIST's clothes), clean: glyphs in :data:`~pipeline.suite.glyphs.TRAIN_FONTS`,
  dark on white, jitter only; ``captions_per_image`` wordings per image (:data:`CAPTIONS`).
* ``backbone.pt``: a tiny CLIP (``arch``) trained on the corpus by open_clip's own trainer on CPU, through
  :mod:`pipeline.digits_demo.data`'s ``open-clip-train`` sub-command (cached, keyed by a config hash).
* ``suite_glyphs_a/``, ``suite_glyphs_b/``, ``suite_glyphs_c/``, ``suite_digits/``, ``suite_fashion/``:
  few-shot sets in the CoOp layout (``images/`` + ``split_zhou_<Name>.json``), registered in
  :data:`pipeline.data.datasets_meta.DATASETS`, so ``FewShotConfig(dataset="SuiteGlyphsA", root=cache_dir)``
  reads them. Images are *style-shifted*: glyphs in the held-out
  :data:`~pipeline.suite.glyphs.DOWNSTREAM_FONTS` plus the dataset's style (:mod:`pipeline.suite.styles`);
  digit and clothing images are held out from the corpus and get a style. Base = first half of the class
  list, new = second half (:func:`pipeline.data.fewshot.subsample_classes`).
* ``stage1_matched/`` and ``stage1_clean/``: unlabeled image-caption shards for stage 1 over the stage-1
  concepts (disjoint from the downstream ones and from their look-alikes, see
  :func:`assign_concepts`); ``matched`` mixes faces and styles like the downstream ones, ``clean`` has the
  same concepts and sample count in the train faces without style.

Fashion-MNIST comes from ``fashion_dir`` (the Debian package ``dataset-fashion-mnist`` by default); when
it is absent the suite is built without ``SuiteFashion`` and ``build_suite_data`` says so (``fashion``).
Item images are inverted (dark on white), like the glyphs and digits: every domain's "ink" is dark on a
light background, and styles change strokes, not polarity. Licences: see :mod:`pipeline.suite.glyphs`.

``python -m pipeline.suite.data [--cache-dir DIR] [--force] [--test]`` builds what is missing and prints
:func:`build_suite_data`'s result (zero-shot accuracy of the backbone on each set's val base/new classes).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.datasets_meta import get_info
from pipeline.data.fewshot import Datum, classnames_of, load_splits, subsample_classes, write_split_file
from pipeline.data.shard_writer import Pair, read_shard_index, write_shards
from pipeline.digits_demo.data import DemoConfig, digit_images, train_cached_backbone
from pipeline.fileio import atomic_write_json
from pipeline.suite import glyphs
from pipeline.suite.styles import Style, apply_style, check_style

log = logging.getLogger(__name__)

GLYPH_TEMPLATE = "a picture of the {}."
"""Prompt template of the glyph and digit sets (also one of the caption wordings)."""
FASHION_TEMPLATE = "a picture of a {}."
"""Prompt template of ``SuiteFashion``."""
CAPTIONS = ("a picture of the {}.", "the {}.", "{}", "a printed {}.", "the character {}.",
            "an image of the {}.", "a rendering of the {}.", "a {} on a white background.")
"""Caption wordings of glyphs and handwritten digits ({} = concept name)."""
FASHION_CAPTIONS = ("a picture of a {}.", "a {}.", "{}", "a photo of a {}.", "an image of a {}.",
                    "a small grayscale picture of a {}.", "a product picture of a {}.",
                    "a {} on a white background.")
"""Caption wordings of Fashion-MNIST items."""
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "ankle boot")
"""Fashion-MNIST's labels 0..9 (its own class names)."""
DATASET_DIRS = {"SuiteGlyphsA": "suite_glyphs_a", "SuiteGlyphsB": "suite_glyphs_b",
                "SuiteGlyphsC": "suite_glyphs_c", "SuiteDigits": "suite_digits", "SuiteFashion": "suite_fashion"}
"""Registered suite dataset name -> folder under the cache (``DATASETS[name].dataset_dir``)."""


@dataclass(frozen=True)
class SuiteDataConfig:
    """The suite's data, backbone and stage-1 corpora; every size is a field so tests can shrink it."""

    cache_dir: str = "cache/suite"
    """Root of everything built (also the ``root`` of the registered few-shot datasets)."""
    image_size: int = 32
    """Side of every stored image (px)."""
    render_scale: int = 4
    """Images are drawn and styled at ``image_size * render_scale`` px, then downsampled (antialiasing,
    and style strengths finer than one output pixel)."""
    glyph_sets: tuple[tuple[str, str], ...] = (
        ("SuiteGlyphsA", "DFGJLQREHT"),
        ("SuiteGlyphsB", "bdefghmqrt"),
        ("SuiteGlyphsC", "ΓΔΣλζΩΛβξδ"),
    )
    """(registered dataset name, class characters in label order): first half base, second half new."""
    styles: tuple[tuple[str, Style], ...] = (
        ("SuiteGlyphsA", (("thicken", 1.25),)),
        ("SuiteGlyphsB", (("thicken", 1.25),)),
        ("SuiteGlyphsC", (("thicken", 1.25),)),
        ("SuiteDigits", (("thicken", 1.25), ("noise", 0.25))),
        ("SuiteFashion", (("thicken", 1.25), ("noise", 0.2))),
    )
    """Style of each downstream set ((operator, strength) steps, :mod:`pipeline.suite.styles`): strokes
    thickened by 1.25 px (of 32), plus grey noise where thickening alone leaves the backbone above 75%
    (digit blobs and filled clothing shapes change little when thickened). Tuned on the val split so the
    backbone's zero-shot accuracy is 40-75% on base and on new classes of every set."""
    train_per_class: int = 16
    """Few-shot train images per class (enough for 16 shots)."""
    val_per_class: int = 20
    """Validation images per class (style tuning happens here)."""
    test_per_class: int = 40
    """Test images per class."""
    corpus_renders_per_font: int = 3
    """Backbone corpus: jittered renderings per (glyph class, train face that draws it)."""
    corpus_digits_per_class: int = 100
    """Backbone corpus: handwritten digits per class (held out from ``SuiteDigits``)."""
    corpus_fashion_per_class: int = 100
    """Backbone corpus: Fashion-MNIST items per class (held out from ``SuiteFashion``)."""
    captions_per_image: int = 2
    """Backbone corpus: differently worded captions per image (each a separate sample)."""
    stage1_samples: int = 4000
    """Samples of each stage-1 corpus (``matched`` and ``clean``: the same number, the same concepts)."""
    matched_styles: tuple[Style, ...] = (
        (), (("thicken", 0.5),), (("thicken", 1.0),), (("thicken", 1.75),), (("outline", 0.75),),
        (("noise", 0.2),), (("blur", 0.6),), (("elastic", 1.5),), (("shear", 0.3),),
        (("thicken", 0.75), ("noise", 0.15)),
    )
    """Styles the ``matched`` corpus draws from uniformly (faces: train + extra)."""
    samples_per_shard: int = 1000
    """Samples per webdataset shard."""
    fashion_dir: str = "/usr/share/datasets/fashion-mnist"
    """Folder with Fashion-MNIST's ``train-images-idx3-ubyte.gz`` and ``train-labels-idx1-ubyte.gz``;
    empty or missing = build without ``SuiteFashion`` (never downloaded)."""
    arch: str = "tiny-vit-suite"
    """Backbone architecture trained from scratch (in-repo open_clip config)."""
    epochs: int = 8
    """open_clip_train epochs over the corpus."""
    batch_size: int = 128
    """Contrastive batch size of the backbone training."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine schedule)."""
    warmup: int = 30
    """Warmup steps."""
    workers: int = 1
    """open_clip_train data workers."""
    seed: int = 0
    """Seed of every random choice (splits, jitter, styles, captions, backbone training)."""


# ----------------------------------------------------------------------------------------------------
# concepts


def fashion_available(cfg: SuiteDataConfig) -> bool:
    """Whether ``cfg.fashion_dir`` holds Fashion-MNIST's train images and labels."""
    d = Path(cfg.fashion_dir) if cfg.fashion_dir else None
    return bool(d) and all((d / f).is_file() for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"))


def downstream_sets(cfg: SuiteDataConfig, fashion: bool) -> dict[str, list[str]]:
    """Dataset name -> class names in label order (glyph sets, ``SuiteDigits``, ``SuiteFashion``)."""
    out = {name: [glyphs.concept_name(c) for c in chars] for name, chars in cfg.glyph_sets}
    out["SuiteDigits"] = [glyphs.HANDWRITTEN_PREFIX + glyphs.concept_name(d) for d in glyphs.DIGITS]
    if fashion:
        out["SuiteFashion"] = list(FASHION_CLASSES)
    return out


def assign_concepts(cfg: SuiteDataConfig, fashion: bool = True) -> dict:
    """Split the concepts: ``downstream`` (set -> classes), ``downstream_side`` (every concept whose
    confusable group has a downstream class: never in stage 1) and ``stage1`` (glyph concepts, the rest).

    Raises ``ValueError`` when a label set holds two members of one confusable group, a set is not
    registered, a class has no held-out face, or a character is not a suite glyph.
    """
    sets = downstream_sets(cfg, fashion)
    for name, chars in cfg.glyph_sets:
        get_info(name)  # registered?
        bad = [c for c in chars if c not in glyphs.GLYPH_CHARS]
        if bad:
            raise ValueError(f"{name}: {bad} are not suite glyphs")
        bare = [c for c in chars if not glyphs.faces_for(c, glyphs.DOWNSTREAM_FONTS)]
        if bare:
            raise ValueError(f"{name}: no held-out face draws {bare}")
        if len(set(chars)) != len(chars):
            raise ValueError(f"{name}: repeated classes in {chars!r}")
    for name, classes in sets.items():
        seen: dict[frozenset, str] = {}
        for c in classes:
            g = glyphs.group_of(c)
            if g in seen and len(g) > 1:
                raise ValueError(f"{name}: {seen[g]!r} and {c!r} are look-alikes (one confusable group)")
            seen[g] = c
    down = {c for classes in sets.values() for c in classes}
    side = set().union(*(glyphs.group_of(c) for c in down))
    all_glyphs = [glyphs.concept_name(c) for c in glyphs.GLYPH_CHARS]
    stage1 = [c for c in all_glyphs if c not in side]
    return {"downstream": sets, "downstream_side": sorted(side), "stage1": stage1}


# ----------------------------------------------------------------------------------------------------
# images


def _spec(cfg: SuiteDataConfig, keys: tuple[str, ...], extra: dict | None = None) -> str:
    d = dataclasses.asdict(cfg)
    spec = {k: d[k] for k in keys} | (extra or {})
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _finish(im: Image.Image, size: int) -> Image.Image:
    return im.resize((size, size), Image.LANCZOS) if im.width != size else im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def glyph_image(cfg: SuiteDataConfig, ch: str, face: str, style: Style, rng: random.Random) -> Image.Image:
    """``ch`` in ``face`` with jitter and ``style`` (seeded from ``rng``), at ``cfg.image_size`` px."""
    big = glyphs.render_glyph(ch, face, cfg.image_size * cfg.render_scale, rng)
    return _finish(apply_style(big, style, rng.getrandbits(32)) if style else big, cfg.image_size)


def styled(cfg: SuiteDataConfig, im: Image.Image, style: Style, rng: random.Random) -> Image.Image:
    """A non-glyph image (digit, clothing) upsampled to the render size, styled, downsampled."""
    big = im.convert("RGB").resize((cfg.image_size * cfg.render_scale,) * 2, Image.BICUBIC)
    return _finish(apply_style(big, style, rng.getrandbits(32)) if style else big, cfg.image_size)


def fashion_images(cfg: SuiteDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's 60000 training items (uint8 ``[N, 28, 28]``, inverted: dark on white) and labels."""
    d = Path(cfg.fashion_dir)
    with gzip.open(d / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(d / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(int)
    return 255 - x, y


def _per_class_split(labels: np.ndarray, n_classes: int, sizes: dict[str, int], seed: str) -> dict[str, list[int]]:
    rng, out = random.Random(seed), {k: [] for k in sizes}
    for y in range(n_classes):
        idx = [int(i) for i in np.flatnonzero(labels == y)]
        rng.shuffle(idx)
        start = 0
        for k, n in sizes.items():
            out[k] += idx[start:start + n]
            start += n
    return out


def _source_split(cfg: SuiteDataConfig, kind: str) -> tuple[list[Image.Image], np.ndarray, dict[str, list[int]]]:
    """Images, labels and the disjoint train/val/test/corpus index split of ``digits`` or ``fashion``."""
    if kind == "digits":
        ims, labels = digit_images(upscale=4)
        corpus = cfg.corpus_digits_per_class
    else:
        x, labels = fashion_images(cfg)
        ims, corpus = None, cfg.corpus_fashion_per_class
    sizes = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class, "corpus": corpus}
    parts = _per_class_split(labels, 10, sizes, f"{kind}-{cfg.seed}")
    if ims is None:  # decode only the items used
        used = {i for v in parts.values() for i in v}
        ims = {i: Image.fromarray(x[i]).convert("RGB") for i in used}
    return ims, labels, parts


# ----------------------------------------------------------------------------------------------------
# few-shot sets


def _style_of(cfg: SuiteDataConfig, name: str) -> Style:
    styles = dict(cfg.styles)
    style = tuple(tuple(s) for s in styles.get(name, ()))
    check_style(style)
    return style


def _cached(folder: Path, spec: str, build: Callable[[Path], None], force: bool = False) -> bool:
    """Run ``build(folder)`` unless ``folder/suite_spec.json`` records ``spec``; True when built."""
    marker = folder / "suite_spec.json"
    if not force and marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return False
    shutil.rmtree(folder, ignore_errors=True)  # a half-built or outdated part is redone from scratch
    folder.mkdir(parents=True)
    build(folder)
    atomic_write_json(marker, {"spec": spec}, indent=None)  # last: its presence means the part is complete
    return True


def build_fewshot_sets(cfg: SuiteDataConfig, fashion: bool) -> dict[str, Path]:
    """Write every downstream set (cached); returns dataset name -> split file."""
    concepts = assign_concepts(cfg, fashion)["downstream"]
    out = {}
    keys = ("image_size", "render_scale", "train_per_class", "val_per_class", "test_per_class", "seed")
    sizes = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
    for name, classes in concepts.items():
        info = get_info(name)
        folder = Path(cfg.cache_dir) / info.dataset_dir
        split_path = folder / info.split_file
        style = _style_of(cfg, name)
        extra = {"classes": classes, "style": style, "fashion_dir": cfg.fashion_dir}

        def build(d: Path, name=name, classes=classes, style=style, info=info, split_path=split_path) -> None:
            image_root = d / info.image_dir
            rng = random.Random(f"{name}-{cfg.seed}")
            splits: dict[str, list[Datum]] = {s: [] for s in sizes}
            if name in ("SuiteDigits", "SuiteFashion"):
                ims, labels, parts = _source_split(cfg, "digits" if name == "SuiteDigits" else "fashion")
                for s in sizes:
                    for i in parts[s]:
                        y = int(labels[i])
                        path = image_root / _folder_name(classes[y]) / f"{s}_{i:05d}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        styled(cfg, ims[i], style, rng).save(path)
                        splits[s].append(Datum(str(path), y, classes[y]))
            else:
                for y, cname in enumerate(classes):
                    ch = glyphs.char_of(cname)
                    faces = glyphs.faces_for(ch, glyphs.DOWNSTREAM_FONTS)
                    for s, n in sizes.items():
                        for k in range(n):
                            path = image_root / _folder_name(cname) / f"{s}_{k:04d}.png"
                            path.parent.mkdir(parents=True, exist_ok=True)
                            glyph_image(cfg, ch, faces[k % len(faces)], style, rng).save(path)
                            splits[s].append(Datum(str(path), y, cname))
            write_split_file(split_path, splits, image_root)

        _cached(folder, _spec(cfg, keys, extra), build)
        out[name] = split_path
    return out


def _folder_name(classname: str) -> str:
    return classname.replace("/", "_or_").replace(" ", "_")


# ----------------------------------------------------------------------------------------------------
# caption corpora


def _caption(rng: random.Random, name: str, fashion: bool = False) -> str:
    return rng.choice(FASHION_CAPTIONS if fashion else CAPTIONS).format(name)


def corpus_pairs(cfg: SuiteDataConfig, fashion: bool) -> list[Pair]:
    """The backbone's clean caption corpus over every concept (shuffled)."""
    rng, pairs = random.Random(f"corpus-{cfg.seed}"), []

    def add(im: Image.Image, name: str, kind: str, is_fashion: bool = False) -> None:
        data = _png(im)
        for tpl in rng.sample(FASHION_CAPTIONS if is_fashion else CAPTIONS, cfg.captions_per_image):
            pairs.append(Pair(image=data, caption=tpl.format(name), meta={"classname": name, "source": kind}))

    for ch in glyphs.GLYPH_CHARS:
        name = glyphs.concept_name(ch)
        for face in glyphs.faces_for(ch, glyphs.TRAIN_FONTS):
            for _ in range(cfg.corpus_renders_per_font):
                add(glyph_image(cfg, ch, face, (), rng), name, "glyph")
    kinds = ["digits"] + (["fashion"] if fashion else [])
    for kind in kinds:
        ims, labels, parts = _source_split(cfg, kind)
        names = downstream_sets(cfg, True)["SuiteDigits" if kind == "digits" else "SuiteFashion"]
        for i in parts["corpus"]:
            add(styled(cfg, ims[i], (), rng), names[int(labels[i])], kind, kind == "fashion")
    rng.shuffle(pairs)
    return pairs


def stage1_pairs(cfg: SuiteDataConfig, which: str, fashion: bool) -> list[Pair]:
    """``stage1_samples`` image-caption pairs over the stage-1 concepts, one caption per image:
    ``matched`` (train + extra faces, a style from ``matched_styles``) or ``clean`` (train faces, no style).
    Samples are spread evenly over concepts (round robin) and shuffled."""
    if which not in ("matched", "clean"):
        raise ValueError(f"stage-1 corpus {which!r}: expected 'matched' or 'clean'")
    concepts = assign_concepts(cfg, fashion)["stage1"]
    rng = random.Random(f"stage1-{which}-{cfg.seed}")
    fonts = glyphs.TRAIN_FONTS + (glyphs.EXTRA_FONTS if which == "matched" else ())
    for s in cfg.matched_styles:
        check_style(tuple(tuple(x) for x in s))
    pairs = []
    for k in range(cfg.stage1_samples):
        name = concepts[k % len(concepts)]
        ch = glyphs.char_of(name)
        face = rng.choice(glyphs.faces_for(ch, fonts))
        style = tuple(tuple(x) for x in rng.choice(cfg.matched_styles)) if which == "matched" else ()
        im = glyph_image(cfg, ch, face, style, rng)
        pairs.append(Pair(image=_png(im), caption=_caption(rng, name),
                          meta={"classname": name, "face": face, "style": [list(x) for x in style]}))
    rng.shuffle(pairs)
    return pairs


def _write_corpus(folder: Path, pairs_fn: Callable[[], list[Pair]], cfg: SuiteDataConfig, spec: str) -> str:
    def build(d: Path) -> None:
        report = write_shards(pairs_fn(), d, cfg.samples_per_shard, image_format="keep", overwrite=True)
        if report.skipped:
            raise RuntimeError(f"{d}: shard writer skipped samples: {report.skipped}")

    _cached(folder, spec, build)
    n = len(read_shard_index(folder))
    return str(folder / f"{{000000..{n - 1:06d}}}.tar")


def _corpus_spec(cfg: SuiteDataConfig, fashion: bool) -> str:
    return _spec(cfg, ("image_size", "render_scale", "corpus_renders_per_font", "corpus_digits_per_class",
                       "corpus_fashion_per_class", "captions_per_image", "train_per_class", "val_per_class",
                       "test_per_class", "seed"), {"fashion": fashion and cfg.fashion_dir})


def build_corpus(cfg: SuiteDataConfig, fashion: bool) -> str:
    """Write the backbone's caption corpus (cached); returns its brace URL pattern."""
    return _write_corpus(Path(cfg.cache_dir) / "corpus", lambda: corpus_pairs(cfg, fashion), cfg,
                         _corpus_spec(cfg, fashion))


def build_stage1(cfg: SuiteDataConfig, fashion: bool) -> dict[str, str]:
    """Write the ``matched`` and ``clean`` stage-1 corpora (cached); returns their brace URL patterns."""
    concepts = assign_concepts(cfg, fashion)["stage1"]
    out = {}
    for which in ("matched", "clean"):
        spec = _spec(cfg, ("image_size", "render_scale", "stage1_samples", "samples_per_shard", "seed")
                     + (("matched_styles",) if which == "matched" else ()), {"concepts": concepts})
        out[which] = _write_corpus(Path(cfg.cache_dir) / f"stage1_{which}",
                                   lambda which=which: stage1_pairs(cfg, which, fashion), cfg, spec)
    return out


# ----------------------------------------------------------------------------------------------------
# backbone


def _demo_cfg(cfg: SuiteDataConfig) -> DemoConfig:
    return DemoConfig(cache_dir=cfg.cache_dir, arch=cfg.arch, epochs=cfg.epochs, batch_size=cfg.batch_size,
                      lr=cfg.lr, warmup=cfg.warmup, workers=cfg.workers, seed=cfg.seed)


def train_backbone(cfg: SuiteDataConfig, fashion: bool, force: bool = False) -> tuple[Path, float]:
    """Train (or reuse) ``<cache>/backbone.pt`` on the corpus; returns (path, training seconds, 0 cached)."""
    spec = _spec(cfg, ("arch", "epochs", "batch_size", "lr", "warmup", "workers", "seed"),
                 {"corpus": _corpus_spec(cfg, fashion)})

    def inputs() -> tuple[str, int]:
        urls = build_corpus(cfg, fashion)
        return urls, sum(read_shard_index(Path(cfg.cache_dir) / "corpus").values())

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return train_cached_backbone(_demo_cfg(cfg), spec, inputs, {"config": dataclasses.asdict(cfg)}, force, env)


def zero_shot_table(cfg: SuiteDataConfig, backbone, names: list[str], split: str = "val") -> dict[str, dict]:
    """Zero-shot top-1 of ``backbone`` per set on ``split``, base and new classes separately (each half's
    own classes as the label space, the set's registered template)."""
    from pipeline.digits_demo.data import zero_shot_accuracy

    out = {}
    for name in names:
        splits, _ = load_splits(name, cfg.cache_dir)
        classnames = classnames_of(splits)
        row = {}
        for which in ("base", "new"):
            sub, cls = subsample_classes(splits, classnames, which)
            row[which] = round(zero_shot_accuracy(backbone, sub[split], cls, templates=(get_info(name).template,)), 4)
        out[name] = row
    return out


def build_suite_data(cfg: SuiteDataConfig | None = None, force: bool = False,
                     eval_splits: tuple[str, ...] = ("val",)) -> dict:
    """Build (or reuse) every part; returns a JSON-able summary (see the module docstring)."""
    import torch

    from pipeline.backbone import load_backbone
    from pipeline.config import BackboneConfig

    cfg = cfg if cfg is not None else SuiteDataConfig()
    t0 = time.time()
    fashion = fashion_available(cfg)
    if not fashion:
        log.warning("Fashion-MNIST not found in %r: the suite is built without SuiteFashion", cfg.fashion_dir)
    concepts = assign_concepts(cfg, fashion)
    timings = {}
    t = time.time()
    splits = build_fewshot_sets(cfg, fashion)
    timings["fewshot_s"] = round(time.time() - t, 1)
    t = time.time()
    stage1 = build_stage1(cfg, fashion)
    timings["stage1_s"] = round(time.time() - t, 1)
    t = time.time()
    corpus = build_corpus(cfg, fashion)
    timings["corpus_s"] = round(time.time() - t, 1)
    ckpt, train_s = train_backbone(cfg, fashion, force)
    timings["backbone_train_s"] = round(train_s, 1)
    torch.set_num_threads(1)
    backbone = load_backbone(BackboneConfig(arch=cfg.arch, pretrained=str(ckpt)))
    t = time.time()
    zs = {s: zero_shot_table(cfg, backbone, list(splits), s) for s in eval_splits}
    timings["zero_shot_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - t0, 1)
    datasets = {}
    for name, path in splits.items():
        classes = concepts["downstream"][name]
        m = -(-len(classes) // 2)
        datasets[name] = {"dataset": name, "root": cfg.cache_dir, "split_file": str(path),
                          "template": get_info(name).template, "n_classes": len(classes),
                          "base": classes[:m], "new": classes[m:], "style": [list(x) for x in _style_of(cfg, name)]}
    corpus_n = sum(read_shard_index(Path(cfg.cache_dir) / "corpus").values())
    return {"backbone": str(ckpt), "arch": cfg.arch, "corpus": corpus, "corpus_samples": corpus_n,
            "datasets": datasets, "stage1": stage1, "stage1_concepts": concepts["stage1"],
            "fashion": fashion, "fashion_dir": cfg.fashion_dir,
            "zero_shot": zs, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.suite.data [--cache-dir DIR] [--force] [--test]``."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.suite.data", description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=SuiteDataConfig.cache_dir)
    ap.add_argument("--force", action="store_true", help="retrain the backbone even if cached")
    ap.add_argument("--test", action="store_true", help="also report zero-shot accuracy on the test split")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = build_suite_data(SuiteDataConfig(cache_dir=args.cache_dir), force=args.force,
                              eval_splits=("val", "test") if args.test else ("val",))
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
