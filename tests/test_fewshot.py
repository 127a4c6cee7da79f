"""Few-shot datasets: CoOp split files, FGVC official split, ImageNet variants, shots and base/new."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data.config import FewShotConfig
from pipeline.data.datasets_meta import BASE_TO_NEW, DATASETS, DOMAIN_SHIFT, clean_classname, template_for
from pipeline.data.fewshot import (
    ImageListDataset,
    build_fewshot,
    load_splits,
    read_fgvc_aircraft,
    read_labelled_folder,
    write_split_file,
)

N_CLASSES, PER_CLASS = 37, {"train": 6, "val": 5, "test": 2}


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(path)


@pytest.fixture
def pets_root(tmp_path) -> Path:
    """A fake OxfordPets in the CoOp layout: images/ + split_zhou_OxfordPets.json, 37 classes."""
    d = tmp_path / "data" / "oxford_pets"
    split = {s: [] for s in PER_CLASS}
    for y in range(N_CLASSES):
        for s, n in PER_CLASS.items():
            for j in range(n):
                rel = f"breed_{y:02d}_{s}_{j}.png"
                _img(d / "images" / rel, y * 7 + j)
                split[s].append([rel, y, f"breed_{y:02d}"])
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return tmp_path


def _cfg(root: Path, **kw) -> FewShotConfig:
    base = {"dataset": "OxfordPets", "root": str(root / "data"), "k_shot": 2, "seed": 1, "subsample": "all",
            "shot_cache_dir": str(root / "cache")}
    return FewShotConfig(**{**base, **kw})


def _paths(items) -> list[str]:
    return sorted(x.path for x in items)


def test_k_shots_per_class_and_split_file_contents(pets_root):
    fs = build_fewshot(_cfg(pets_root))
    assert len(fs.classnames) == 37 and fs.classnames[3] == "breed 03"
    assert fs.template == "a photo of a {}, a type of pet."
    for split, k in (("train", 2), ("val", 2)):  # val keeps min(k, 4) shots per class
        counts = np.bincount([x.label for x in getattr(fs, split)], minlength=37)
        assert counts.tolist() == [k] * 37
    assert len(fs.test) == 37 * 2
    for x in fs.train:
        assert Path(x.path).is_file() and x.classname == fs.classnames[x.label]
        assert Path(x.path).name.startswith(f"breed_{x.label:02d}_train")


def test_same_seed_same_shots_other_seed_other_shots(pets_root):
    a = build_fewshot(_cfg(pets_root))
    cache = pets_root / "cache" / "OxfordPets" / "shot_2-seed_1.json"
    assert cache.is_file()
    b = build_fewshot(_cfg(pets_root))  # read back from the cache
    cache.unlink()
    c = build_fewshot(_cfg(pets_root))  # sampled again from the seed
    d = build_fewshot(_cfg(pets_root, seed=2))
    assert _paths(a.train) == _paths(b.train) == _paths(c.train)
    assert _paths(a.train) != _paths(d.train)
    assert json.loads(cache.read_text())["indices"]["train"] == sorted(json.loads(cache.read_text())["indices"]["train"])


def test_cached_shots_are_what_every_run_uses(pets_root):
    a = build_fewshot(_cfg(pets_root))
    cache = pets_root / "cache" / "OxfordPets" / "shot_2-seed_1.json"
    data = json.loads(cache.read_text())
    data["indices"]["train"] = data["indices"]["train"][:5]  # an edited cache is honoured as written
    cache.write_text(json.dumps(data))
    assert len(build_fewshot(_cfg(pets_root)).train) == 5 != len(a.train)


def test_stale_cache_is_an_error(pets_root):
    build_fewshot(_cfg(pets_root))
    split_path = pets_root / "data" / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(split_path.read_text())
    split["train"] = split["train"][1:]
    split_path.write_text(json.dumps(split))
    with pytest.raises(ValueError, match="other data"):
        build_fewshot(_cfg(pets_root))


def test_base_new_split_and_relabelling(pets_root):
    full = build_fewshot(_cfg(pets_root))
    base = build_fewshot(_cfg(pets_root, subsample="base"))
    new = build_fewshot(_cfg(pets_root, subsample="new"))
    assert (len(base.classnames), len(new.classnames)) == (19, 18)
    assert base.classnames == full.classnames[:19] and new.classnames == full.classnames[19:]
    for fs, offset in ((base, 0), (new, 19)):
        labels = {x.label for x in fs.train + fs.val + fs.test}
        assert labels == set(range(len(fs.classnames)))
        for x in fs.train + fs.test:
            assert x.classname == fs.classnames[x.label] == full.classnames[x.label + offset]
    # shots were drawn before the split: base/new are exactly the all-class shots, partitioned
    assert _paths(base.train) + _paths(new.train) == sorted(_paths(base.train) + _paths(new.train))
    assert sorted(_paths(base.train) + _paths(new.train)) == _paths(full.train)


def test_fgvc_official_split(tmp_path):
    d = tmp_path / "data" / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Boeing 717", "DC-10"]
    (d).mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    for s, ids in (("train", range(0, 8)), ("val", range(8, 12)), ("test", range(12, 20))):
        lines = [f"{1000 + i:07d} {variants[i % 4]}" for i in ids]
        (d / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
        for i in ids:
            _img(d / "images" / f"{1000 + i:07d}.jpg", i)
    splits = read_fgvc_aircraft(d)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 4, 8]
    x = splits["train"][2]
    assert (x.label, x.classname, Path(x.path).name) == (2, "Boeing 717", "0001002.jpg")
    fs = build_fewshot(FewShotConfig(dataset="FGVCAircraft", root=str(tmp_path / "data"), k_shot=1,
                                     subsample="new", shot_cache_dir=""))
    assert fs.classnames == ["Boeing 717", "DC-10"] and sorted(x.label for x in fs.train) == [0, 1]


def test_imagenet_variants(tmp_path):
    wnids = [f"n{i:08d}" for i in range(5)]
    root = tmp_path / "data"
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} thing {i}\n" for i, w in enumerate(wnids)))
    for w in (wnids[1], wnids[3], wnids[4]):  # ImageNet-A style: a subset of the classes
        _img(root / "imagenet-adversarial" / "imagenet-a" / w / "a.jpg", 1)
    for f in ("0", "2"):
        _img(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / f / "x.jpeg", 2)
    a, _ = load_splits("ImageNetA", root)
    assert [(x.label, x.classname) for x in a["test"]] == [(0, "thing 1"), (1, "thing 3"), (2, "thing 4")]
    v2, _ = load_splits("ImageNetV2", root)
    assert [(x.label, x.classname) for x in v2["test"]] == [(0, "thing 0"), (2, "thing 2")]
    assert not a["train"]


@pytest.mark.filterwarnings("ignore:class . has 2 < 4 images")
def test_labelled_folder_split_and_roundtrip(tmp_path):
    for c in ("cat", "dog", "sea_lion"):
        for j in range(10):
            _img(tmp_path / "lab" / c / f"{j}.png", j)
    s1, s2 = read_labelled_folder(tmp_path / "lab", seed=3), read_labelled_folder(tmp_path / "lab", seed=3)
    assert s1 == s2 and [len(s1[s]) for s in ("train", "val", "test")] == [15, 6, 9]
    assert {x.classname for x in s1["test"]} == {"cat", "dog", "sea lion"}
    write_split_file(tmp_path / "split.json", s1, tmp_path / "lab")
    fs = build_fewshot(FewShotConfig(dataset="folder", root=str(tmp_path / "lab"), k_shot=4,
                                     split_file=str(tmp_path / "split.json"), subsample="base",
                                     shot_cache_dir=str(tmp_path / "c")))
    assert fs.classnames == ["cat", "dog"] and len(fs.train) == 8
    images, label = ImageListDataset(fs.train, transform=lambda im: np.asarray(im))[0]
    assert images.shape == (8, 8, 3) and label == fs.train[0].label


def test_dataset_table_and_classnames():
    suite = {"SuiteGlyphsA", "SuiteGlyphsB", "SuiteGlyphsC", "SuiteDigits", "SuiteFashion"}
    assert set(BASE_TO_NEW) | set(DOMAIN_SHIFT) | {"Digits"} | suite == set(DATASETS) and len(BASE_TO_NEW) == 11
    assert template_for("EuroSAT") == "a centered satellite photo of {}."
    assert template_for("DescribableTextures") == "{} texture."
    assert clean_classname("SeaLake", DATASETS["EuroSAT"]) == "Sea or Lake"
    assert clean_classname("ApplyEyeMakeup") == "Apply Eye Makeup"
    assert clean_classname("american_pit_bull_terrier") == "american pit bull terrier"
    with pytest.raises(ConfigError, match="fewshot.dataset"):
        build_fewshot(FewShotConfig(dataset="Pets"))
    with pytest.raises(ConfigError, match="fewshot.subsample"):
        build_fewshot(FewShotConfig(subsample="old"))
