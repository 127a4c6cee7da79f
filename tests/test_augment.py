"""Training augmentation presets (pipeline.augment) and each dataset's choice (datasets_meta)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.augment import AUGMENT_PRESETS, COOP_CROP_SCALE, train_transform
from pipeline.data.datasets_meta import DATASETS, FOLDER_AUGMENT, augment_for


def _types(transform):
    return [type(t) for t in transform.transforms]


def test_coop_and_noflip_presets(tiny_backbone_s):
    norm_ref = tiny_backbone_s.preprocess_train.transforms[-1]  # open_clip's Normalize for this backbone
    for preset, flip in (("coop", True), ("noflip", False)):
        tf = train_transform(tiny_backbone_s, preset)
        crop = tf.transforms[0]
        assert isinstance(crop, T.RandomResizedCrop)
        assert crop.scale == COOP_CROP_SCALE == (0.08, 1.0) and crop.size == (32, 32)
        assert crop.interpolation == T.InterpolationMode.BICUBIC
        assert (T.RandomHorizontalFlip in _types(tf)) is flip
        if flip:
            assert tf.transforms[1].p == 0.5
        norm = tf.transforms[-1]
        assert isinstance(norm, T.Normalize) and T.ToTensor in _types(tf)
        assert tuple(norm.mean) == tuple(norm_ref.mean) and tuple(norm.std) == tuple(norm_ref.std)
        pickle.loads(pickle.dumps(tf))  # DataLoader workers get a copy
        out = tf(Image.new("L", (50, 40), 128))  # grey input of another size -> RGB at the model's size
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_open_clip_preset_is_todays_transform(tiny_backbone_s):
    tf = train_transform(tiny_backbone_s, "open_clip")
    assert tf is tiny_backbone_s.preprocess_train
    assert tf.transforms[0].scale == (0.9, 1.0) and T.RandomHorizontalFlip not in _types(tf)


def _is_mirrored(x: torch.Tensor) -> bool:
    """The glyph is dark on the left, bright on the right; a crop keeps that, only a flip reverses it."""
    half = x.shape[-1] // 2
    return bool(x[..., :half].mean() > x[..., half:].mean())


def test_noflip_never_mirrors_a_glyph(tiny_backbone_s):
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1)).astype(np.uint8)
    glyph = Image.fromarray(ramp).convert("RGB")  # left-right asymmetric at every crop position and scale
    counts = {}
    for preset in ("noflip", "coop"):
        tf = train_transform(tiny_backbone_s, preset)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: seed, then restore it
            torch.manual_seed(0)
            counts[preset] = sum(_is_mirrored(tf(glyph)) for _ in range(200))
    assert counts["noflip"] == 0
    assert 50 < counts["coop"] < 150  # the detector does see flips: about half of coop's draws


def test_unknown_preset_is_refused(tiny_backbone_s):
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'flip'; known: coop, noflip, open_clip"):
        train_transform(tiny_backbone_s, "flip")


def test_each_dataset_chooses_a_known_preset():
    assert all(info.augment in AUGMENT_PRESETS for info in DATASETS.values())
    assert augment_for("Digits") == "noflip" and augment_for("folder") == FOLDER_AUGMENT == "noflip"
    assert augment_for("OxfordPets") == augment_for("ImageNet") == "coop"
    with pytest.raises(KeyError, match="unknown dataset"):
        augment_for("NoSuchSet")


def test_stage2_trains_with_the_datasets_preset_or_the_configured_one(tmp_path, monkeypatch):
    from pipeline import finetune, finetune_loop
    from pipeline.config import ConfigError

    from .helpers.fewshot_data import finetune_overrides, make_coop_dataset

    root = make_coop_dataset(tmp_path / "data")
    seen, teachers = [], []
    real_transform, real_objective = finetune_loop.train_transform, finetune_loop.Objective
    monkeypatch.setattr(finetune_loop, "train_transform", lambda b, preset: seen.append(preset) or real_transform(b, preset))

    def objective(model, loss, templates):
        teachers.append(templates)
        return real_objective(model, loss, templates=templates)

    monkeypatch.setattr(finetune_loop, "Objective", objective)
    base = finetune_overrides(root, tmp_path / "runs", ("method=ivlp",))
    assert finetune.main(base) == 0
    assert finetune.main([*base, "name=b", "data.augment=open_clip", "frozen_templates=[imagenet7]"]) == 0
    assert seen == ["coop", "open_clip"]  # OxfordPets chooses coop; the config overrides
    assert teachers[0] == ("a photo of a {}, a type of pet.",) and len(teachers[1]) == 7
    with pytest.raises(ConfigError, match="data.augment='mirror'"):
        finetune.main([*base, "name=c", "data.augment=mirror"])
    with pytest.raises(ConfigError, match="frozen_templates"):
        finetune.main([*base, "name=d", "frozen_templates=[nope]"])
