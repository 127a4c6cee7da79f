"""Evaluation protocol: base/new relabelling, separate label spaces, counts, HM, other-dataset targets."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.config import FewShotConfig
from pipeline.data.fewshot import Datum, build_fewshot
from pipeline.evaluate import evaluate, harmonic_mean
from pipeline.evaluation import items_fingerprint
from pipeline.finetune import EvalConfig

from .helpers.fewshot_data import make_coop_dataset

N = 5  # classes: base = kind_0..kind_2 (ceil(5/2)), new = kind_3, kind_4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_coop_dataset(tmp_path_factory.mktemp("data"), n_classes=N)


class ColourOracle:
    """Stands in for a prompted CLIP: an image's feature is the one-hot of the class whose colour is
    nearest its mean colour, a class text's feature the one-hot of its name. Perfect accuracy is reached
    only if each subset's labels index its own class list."""

    def __init__(self, colours: dict[str, np.ndarray]):
        self.names = sorted(colours)
        self.colours = torch.tensor(np.stack([colours[n] for n in self.names]), dtype=torch.float32)  # [N, 3]
        self.clip = SimpleNamespace(logit_scale=torch.zeros(()))

    def encode_classes(self, classnames, prompts):
        return F.one_hot(torch.tensor([self.names.index(c) for c in classnames]), len(self.names)).float()

    def encode_image(self, images, prompts, normalize=True):  # images: [B, 3] mean colours
        nearest = torch.cdist(images, self.colours).argmin(-1)
        return F.one_hot(nearest, len(self.names)).float()


def _mean_colour(image) -> torch.Tensor:
    return torch.tensor(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0))


def _cfg(root, **kw):
    data = FewShotConfig(dataset="OxfordPets", root=str(root), k_shot=2, seed=1, subsample="base",
                         shot_cache_dir=str(root / "shots"))
    return SimpleNamespace(data=data, eval=EvalConfig(**kw))


def test_base_and_new_are_relabelled_into_their_own_label_spaces(root):
    all_ = build_fewshot(_cfg(root).data.__class__(**{**_cfg(root).data.__dict__, "subsample": "all"}))
    base = build_fewshot(_cfg(root).data)
    new = build_fewshot(_cfg(root).data.__class__(**{**_cfg(root).data.__dict__, "subsample": "new"}))
    assert base.classnames == all_.classnames[:3] and new.classnames == all_.classnames[3:]
    assert sorted({x.label for x in base.test}) == [0, 1, 2] and sorted({x.label for x in new.test}) == [0, 1]
    for fs in (base, new):  # label i names classnames[i] of the subset
        assert all(fs.classnames[x.label] == x.classname for x in fs.test + fs.train)
    # shots are sampled before the split: the base/new train images are those of the all-class run
    assert {x.path for x in base.train} | {x.path for x in new.train} == {x.path for x in all_.train}


def test_evaluate_reports_each_subset_in_its_own_space(root):
    fs = build_fewshot(FewShotConfig(dataset="OxfordPets", root=str(root), k_shot=0, subsample="all",
                                     shot_cache_dir=""))
    colours = {}
    for x in fs.train:
        colours.setdefault(x.classname, []).append(_mean_colour(Image.open(x.path).convert("RGB")).numpy())
    oracle = ColourOracle({k: np.mean(v, 0) for k, v in colours.items()})
    out = evaluate(_cfg(root, subsets=("base", "new", "all")), oracle, {}, _mean_colour)
    assert out["base"]["accuracy"] == 100.0 and out["new"]["accuracy"] == 100.0 and out["all"]["accuracy"] == 100.0
    assert (out["base"]["total"], out["new"]["total"], out["all"]["total"]) == (9, 6, 15)
    assert out["base"]["classnames"] == fs.classnames[:3] and out["new"]["classnames"] == fs.classnames[3:]
    assert len(out["new"]["per_class_accuracy"]) == 2 and out["hm"] == 100.0


def test_targets_are_other_datasets_on_all_classes(root, tmp_path):
    make_coop_dataset(tmp_path, n_classes=3)  # a second dataset under another root, read as a target
    (tmp_path / "oxford_pets").rename(tmp_path / "food-101")
    (tmp_path / "food-101" / "split_zhou_OxfordPets.json").rename(tmp_path / "food-101" / "split_zhou_Food101.json")
    (root / "food-101").symlink_to(tmp_path / "food-101")
    fs = build_fewshot(FewShotConfig(dataset="OxfordPets", root=str(root), k_shot=0, subsample="all",
                                     shot_cache_dir=""))
    names = {c: np.zeros(3) + 40 * i for i, c in enumerate(fs.classnames)}
    oracle = ColourOracle(names)
    out = evaluate(_cfg(root, subsets=("base",), targets=("Food101",)), oracle, {}, _mean_colour)
    t = out["targets"]["Food101"]
    assert t["n_classes"] == 3 and t["total"] == 9 and "hm" not in out


def test_harmonic_mean():
    assert harmonic_mean(84.39, 76.93) == pytest.approx(80.49, abs=0.005)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(50.0, 50.0) == 50.0


def test_per_image_hits_follow_the_item_order_and_counts(root):
    fs = build_fewshot(FewShotConfig(dataset="OxfordPets", root=str(root), k_shot=0, subsample="base",
                                     shot_cache_dir=""))
    oracle = ColourOracle({c: np.zeros(3) + 40 * i for i, c in enumerate(fs.classnames)})  # often wrong
    out = evaluate(_cfg(root, subsets=("base",)), oracle, {}, _mean_colour)["base"]
    assert len(out["hits"]) == out["total"] and out["hits"].count("1") == out["correct"]
    assert 0 < out["correct"] < out["total"] and set(out["hits"]) == {"0", "1"}
    for x, h in zip(fs.test, out["hits"]):  # one character per item, in the loader's order
        pred = int(oracle.encode_image(_mean_colour(Image.open(x.path).convert("RGB"))[None], {}).argmax())
        assert h == ("1" if oracle.names[pred] == fs.classnames[x.label] else "0")
    assert out["items_sha"] == items_fingerprint(fs.test) and len(out["items_sha"]) == 16


def test_items_fingerprint_ignores_the_data_root_but_not_order_or_labels():
    items = [Datum(f"/data/a/pets/images/{n}.jpg", label, "x") for n, label in (("cat", 0), ("dog", 1), ("owl", 2))]
    moved = [Datum(x.path.replace("/data/a", "/mnt/other"), x.label, x.classname) for x in items]
    assert items_fingerprint(moved) == items_fingerprint(items)
    assert items_fingerprint(items[::-1]) != items_fingerprint(items)
    relabelled = [Datum(x.path, (x.label + 1) % 3, x.classname) for x in items]
    assert items_fingerprint(relabelled) != items_fingerprint(items)
    assert items_fingerprint(items[:2]) != items_fingerprint(items)
