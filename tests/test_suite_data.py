"""The suite's data: glyph rendering, the confusable table, styles, few-shot sets and stage-1 shards."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.config import FewShotConfig
from pipeline.data.datasets_meta import get_info
from pipeline.data.fewshot import build_fewshot
from pipeline.suite import glyphs
from pipeline.suite.data import (
    FASHION_CLASSES,
    SuiteDataConfig,
    assign_concepts,
    build_fewshot_sets,
    build_stage1,
    build_suite_data,
    fashion_available,
)
from pipeline.suite.styles import OPERATORS, apply_style


def _a(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


# ---------------------------------------------------------------- glyphs


def test_renderings_differ_per_font_and_class_and_are_dark_on_white():
    ims = {(f, c): _a(glyphs.render_glyph(c, f, 32)) for f in ("DejaVuSans", "cmr10", "STIXGeneral")
           for c in "AgQ"}
    for k, a in ims.items():
        assert a.shape == (32, 32, 3) and a.min() < 60 and np.median(a) == 255, k  # dark ink, white ground
    keys = list(ims)
    for i, k in enumerate(keys):
        for j in keys[i + 1:]:
            assert np.abs(ims[k] - ims[j]).sum() > 0, (k, j)
    rng = random.Random(0)
    a1, a2 = (_a(glyphs.render_glyph("A", "DejaVuSans", 32, rng)) for _ in range(2))
    assert np.abs(a1 - a2).sum() > 0  # jitter: two renderings of one class and font differ


def test_missing_glyphs_are_detected_not_trusted_from_the_cmap():
    assert glyphs.has_glyph("DejaVuSans", "Ω") and glyphs.has_glyph("STIXGeneral", "ω")
    for face in ("cmr10", "cmtt10", "cmb10"):
        assert not glyphs.has_glyph(face, "Ω") and glyphs.has_glyph(face, "A")
    with pytest.raises(ValueError, match="no glyph"):
        glyphs.render_glyph("ω", "cmr10", 32)
    assert not glyphs.has_glyph("DejaVuSansDisplay", "A")  # a face without Latin letters
    assert glyphs.faces_for("λ", glyphs.DOWNSTREAM_FONTS) and all(
        not f.startswith("cm") for f in glyphs.faces_for("λ", glyphs.DOWNSTREAM_FONTS))
    # OT1 punctuation in the TeX fonts is refused (a "<" there is an inverted exclamation mark)
    assert not glyphs.has_glyph("cmr10", "<")


def test_font_groups_are_disjoint_and_exist():
    train, down, extra = (set(g) for g in (glyphs.TRAIN_FONTS, glyphs.DOWNSTREAM_FONTS, glyphs.EXTRA_FONTS))
    assert not down & train and not down & extra
    for f in train | down | extra:
        assert Path(glyphs.font_path(f)).is_file(), f
    for c in glyphs.GLYPH_CHARS:
        assert glyphs.faces_for(c, glyphs.TRAIN_FONTS), c  # every concept reaches the backbone corpus


# ---------------------------------------------------------------- confusables and concept assignment


def test_confusable_table_names_the_known_look_alikes():
    groups = glyphs.confusable_groups()
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names)), "a concept in two groups"
    must = ["AΑ", "BΒ", "EΕ", "HΗ", "Il1Ι|", "KΚκk", "MΜ", "NΝ", "OΟ0oο", "PΡpρ", "TΤ", "XΧxχ", "YΥ", "ZΖz",
            "Cc", "Ss", "Vvν", "Ww", "Uuυ"]
    for chars in must:
        assert len({glyphs.group_of(glyphs.concept_name(c)) for c in chars}) == 1, chars
    assert glyphs.group_of("handwritten digit three") == glyphs.group_of("digit three")
    assert glyphs.group_of("greek capital letter omega") == {"greek capital letter omega"}


def test_concepts_downstream_and_stage1_are_disjoint_and_groups_unsplit():
    cfg = SuiteDataConfig()
    a = assign_concepts(cfg, fashion=True)
    down = {c for cs in a["downstream"].values() for c in cs}
    stage1 = set(a["stage1"])
    assert len(stage1) >= 40 and not down & stage1
    for g in glyphs.confusable_groups():
        assert not (g & stage1) or not (g & set(a["downstream_side"])), sorted(g)  # one side only
    for name, classes in a["downstream"].items():
        assert len(classes) == len(set(classes)) >= 10, name
        assert len({glyphs.group_of(c) for c in classes}) == len(classes), name  # no look-alikes in a set
    assert "digit one" not in stage1 and "latin capital letter i" not in stage1  # grouped with handwritten 1


def test_look_alikes_in_one_label_set_are_refused():
    with pytest.raises(ValueError, match="look-alikes"):
        assign_concepts(SuiteDataConfig(glyph_sets=(("SuiteGlyphsA", "DFGJLQREHΕ"),)))
    with pytest.raises(ValueError, match="not suite glyphs"):
        assign_concepts(SuiteDataConfig(glyph_sets=(("SuiteGlyphsA", "ϹDFGJLQRET"),)))


# ---------------------------------------------------------------- styles


@pytest.mark.parametrize("op", sorted(OPERATORS))
def test_styles_are_deterministic_pure_and_identity_at_zero(op):
    im = glyphs.render_glyph("G", "DejaVuSerif", 64)
    before = _a(im).copy()
    assert np.array_equal(_a(apply_style(im, ((op, 0.0),), 3)), before)
    strength = {"noise": 0.2, "texture": 0.5, "invert": 1.0, "colour": 0.8, "shear": 0.3}.get(op, 1.5)
    x, y = apply_style(im, ((op, strength),), 7), apply_style(im, ((op, strength),), 7)
    assert np.array_equal(_a(x), _a(y)) and np.array_equal(_a(im), before)
    assert x.size == im.size and x.mode == "RGB" and not np.array_equal(_a(x), before)


def test_thicken_grows_ink_and_unknown_operator_is_refused():
    im = glyphs.render_glyph("l", "DejaVuSans", 64)
    ink = (_a(im).mean(axis=2) < 128).sum()
    assert (_a(apply_style(im, (("thicken", 1.0),), 0)).mean(axis=2) < 128).sum() > 1.5 * ink
    with pytest.raises(ValueError, match="bad style"):
        apply_style(im, (("sparkle", 1.0),), 0)


# ---------------------------------------------------------------- built data (tiny sizes)


def _tiny(tmp: Path, **kw) -> SuiteDataConfig:
    return SuiteDataConfig(cache_dir=str(tmp), train_per_class=4, val_per_class=4, test_per_class=3,
                           corpus_renders_per_font=1, corpus_digits_per_class=2, corpus_fashion_per_class=2,
                           stage1_samples=120, samples_per_shard=50, **kw)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    cfg = _tiny(tmp_path_factory.mktemp("suite"))
    fashion = fashion_available(cfg)
    return cfg, fashion, build_fewshot_sets(cfg, fashion), build_stage1(cfg, fashion)


def test_split_files_read_back_with_the_registered_names(tiny_build, tmp_path):
    cfg, fashion, splits, _ = tiny_build
    assert {"SuiteGlyphsA", "SuiteGlyphsB", "SuiteGlyphsC", "SuiteDigits"} <= set(splits)
    assert ("SuiteFashion" in splits) == fashion
    classes = assign_concepts(cfg, fashion)["downstream"]
    for name in splits:
        info = get_info(name)
        assert info.augment == "noflip" and "{}" in info.template
        for sub, half in (("base", slice(0, 5)), ("new", slice(5, 10))):
            fs = build_fewshot(FewShotConfig(dataset=name, root=cfg.cache_dir, k_shot=4, seed=1, subsample=sub,
                                             shot_cache_dir=str(tmp_path / "shots")))
            assert fs.classnames == classes[name][half]
            assert len(fs.train) == 20 and len(fs.test) == 15 and len(fs.val) == 20
            x = np.asarray(Image.open(fs.test[0].path).convert("RGB"))
            assert x.shape == (cfg.image_size, cfg.image_size, 3)
        train = {x.path for x in build_fewshot(FewShotConfig(dataset=name, root=cfg.cache_dir, k_shot=0,
                                                             subsample="all")).train}
        test = {x.path for x in build_fewshot(FewShotConfig(dataset=name, root=cfg.cache_dir, k_shot=0,
                                                            subsample="all")).test}
        assert not train & test


def test_sets_are_cached_and_a_half_built_set_is_redone(tiny_build):
    cfg, fashion, splits, _ = tiny_build
    path = splits["SuiteGlyphsA"]
    mtime = path.stat().st_mtime_ns
    assert build_fewshot_sets(cfg, fashion)["SuiteGlyphsA"].stat().st_mtime_ns == mtime  # cached
    (path.parent / "suite_spec.json").unlink()  # as if killed before the end
    assert build_fewshot_sets(cfg, fashion)["SuiteGlyphsA"].stat().st_mtime_ns != mtime


def _samples(pattern: str) -> list[dict]:
    folder = Path(pattern).parent
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: m for m in tf.getmembers()}
            for name in members:
                if name.endswith(".json"):
                    meta = json.loads(tf.extractfile(members[name]).read())
                    key = name[:-5]
                    img = next(members[k] for k in members if k.startswith(key + ".") and not
                               k.endswith((".json", ".txt")))
                    im = Image.open(io.BytesIO(tf.extractfile(img).read())).convert("RGB")
                    meta["txt"] = tf.extractfile(members[key + ".txt"]).read().decode()
                    meta["size"] = im.size
                    out.append(meta)
    return out


def test_stage1_shards_are_readable_and_carry_no_downstream_concept(tiny_build):
    cfg, fashion, _, urls = tiny_build
    a = assign_concepts(cfg, fashion)
    banned = set(a["downstream_side"]) | {c for cs in a["downstream"].values() for c in cs}
    for which in ("matched", "clean"):
        samples = _samples(urls[which])
        assert len(samples) == cfg.stage1_samples
        names = {s["classname"] for s in samples}
        assert names <= set(a["stage1"]) and not names & banned
        for s in samples:
            assert s["classname"] in s["txt"] and s["size"] == (cfg.image_size, cfg.image_size)
            words = s["txt"].lower()
            assert not any(b in words for b in banned if len(b.split()) > 2), s["txt"]
        faces = {s["face"] for s in samples}
        if which == "clean":
            assert faces <= set(glyphs.TRAIN_FONTS) and all(s["style"] == [] for s in samples)
        else:
            assert faces & set(glyphs.EXTRA_FONTS) - set(glyphs.TRAIN_FONTS)
            assert len({json.dumps(s["style"]) for s in samples}) >= 5


def test_fashion_absent_builds_without_it_and_says_so(tmp_path, monkeypatch):
    import pipeline.suite.data as sd

    cfg = _tiny(tmp_path, fashion_dir=str(tmp_path / "no_such_folder"))
    assert not fashion_available(cfg)
    a = assign_concepts(cfg, fashion=False)
    assert "SuiteFashion" not in a["downstream"] and not set(FASHION_CLASSES) & set(a["stage1"])
    # stop before any backbone is trained: the summary must still say fashion is absent
    monkeypatch.setattr(sd, "train_backbone", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        build_suite_data(cfg)
    assert not (tmp_path / "suite_fashion").exists() and (tmp_path / "suite_glyphs_a").is_dir()
    assert sd.downstream_sets(cfg, fashion_available(cfg)).keys() == {"SuiteGlyphsA", "SuiteGlyphsB",
                                                                      "SuiteGlyphsC", "SuiteDigits"}


@pytest.mark.slow
def test_full_build_trains_a_backbone_with_headroom(tmp_path):
    """The whole suite at a reduced size: backbone trained, zero-shot table on val base/new."""
    cfg = SuiteDataConfig(cache_dir=str(tmp_path), corpus_renders_per_font=1, epochs=2, stage1_samples=200,
                          test_per_class=5)
    out = build_suite_data(cfg)
    assert Path(out["backbone"]).is_file() and out["fashion"] == fashion_available(cfg)
    assert set(out["zero_shot"]["val"]) == set(out["datasets"])
    json.dumps(out)
