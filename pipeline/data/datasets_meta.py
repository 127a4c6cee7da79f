"""Where each downstream dataset lives on disk and how its classes are named and prompted.

The layout is the one CoOp's data preparation guide produces (``<root>/<dataset_dir>/...``), so
people can point this project at the folders they already have. Class names are read from the
split files (or ``classnames.txt`` for the ImageNet family) and then cleaned by
:func:`clean_classname`; the per-dataset prompt template is CoOp's single hand-written template, and
each dataset names its training augmentation preset (:func:`augment_for`, :mod:`pipeline.augment`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of one downstream dataset."""

    name: str
    """Name used in configs and result tables (``OxfordPets``)."""
    dataset_dir: str
    """Folder under the data root (``oxford_pets``)."""
    image_dir: str
    """Folder under ``dataset_dir`` that split-file paths are relative to (``""`` = ``dataset_dir``)."""
    kind: str
    """How splits are read: ``coop_split`` (``split_zhou_*.json``), ``fgvc`` (official text files),
    ``imagenet`` (``classnames.txt`` + train/val wnid folders) or ``imagenet_variant`` (test only)."""
    template: str
    """CoOp's prompt template for the dataset; ``{}`` is replaced by the class name."""
    split_file: str = ""
    """Split file name inside ``dataset_dir`` for ``coop_split`` datasets."""
    rename: dict[str, str] = field(default_factory=dict)
    """Raw class name -> readable class name, for datasets whose folder names are not words."""
    augment: str = "coop"
    """Training augmentation preset (:data:`pipeline.augment.AUGMENT_PRESETS`): ``coop`` (random resized
    crop + horizontal flip, CoOp's recipe for natural images) or ``noflip`` (the same crop, no flip: for
    glyphs and digits a mirror image is another symbol)."""


# EuroSAT's folder names are CamelCase abbreviations; CoOp prompts with these readable names.
_EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
_CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def _coop(name: str, dataset_dir: str, image_dir: str, split: str, template: str, **kw) -> DatasetInfo:
    return DatasetInfo(name, dataset_dir, image_dir, "coop_split", template, split_file=split, **kw)


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("ImageNet", "imagenet", "images", "imagenet", "a photo of a {}."),
        _coop("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
              "a photo of a {}.", rename=_CALTECH_NAMES),
        _coop("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
              "a photo of a {}, a type of pet."),
        _coop("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
        _coop("OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
              "a photo of a {}, a type of flower."),
        _coop("Food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
        DatasetInfo("FGVCAircraft", "fgvc_aircraft", "images", "fgvc", "a photo of a {}, a type of aircraft."),
        _coop("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
        _coop("DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
        _coop("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.",
              rename=_EUROSAT_NAMES),
        _coop("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
              "a photo of a person doing {}."),
        _coop("Digits", "digits", "images", "split_zhou_Digits.json", "a photo of the digit {}.",
              augment="noflip"),
        DatasetInfo("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                    "imagenet_variant", "a photo of a {}."),
        DatasetInfo("ImageNetSketch", "imagenet-sketch", "images", "imagenet_variant", "a photo of a {}."),
        DatasetInfo("ImageNetA", "imagenet-adversarial", "imagenet-a", "imagenet_variant", "a photo of a {}."),
        DatasetInfo("ImageNetR", "imagenet-rendition", "imagenet-r", "imagenet_variant", "a photo of a {}."),
        # the style-shifted suite (pipeline.suite.data), built under cache/suite
        _coop("SuiteGlyphsA", "suite_glyphs_a", "images", "split_zhou_SuiteGlyphsA.json",
              "a picture of the {}.", augment="noflip"),
        _coop("SuiteGlyphsB", "suite_glyphs_b", "images", "split_zhou_SuiteGlyphsB.json",
              "a picture of the {}.", augment="noflip"),
        _coop("SuiteGlyphsC", "suite_glyphs_c", "images", "split_zhou_SuiteGlyphsC.json",
              "a picture of the {}.", augment="noflip"),
        _coop("SuiteDigits", "suite_digits", "images", "split_zhou_SuiteDigits.json",
              "a picture of the {}.", augment="noflip"),
        _coop("SuiteFashion", "suite_fashion", "images", "split_zhou_SuiteFashion.json",
              "a picture of a {}.", augment="noflip"),
    )
}
"""Every dataset of the base-to-new, domain-generalization and cross-dataset protocols, plus the
bundled ``Digits`` demo set (:mod:`pipeline.digits_demo.data`) and the style-shifted ``Suite*`` sets
(:mod:`pipeline.suite.data`)."""

BASE_TO_NEW = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
               "FGVCAircraft", "SUN397", "DescribableTextures", "EuroSAT", "UCF101")
"""The 11 datasets of the base-to-new benchmark, in the order result tables use."""
DOMAIN_SHIFT = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
"""Test-only ImageNet variants of the domain-generalization benchmark."""

# Caltech101 ships these two non-object folders; CoOp leaves them out of the class list.
CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def clean_classname(raw: str, info: DatasetInfo | None = None) -> str:
    """Readable class name: dataset rename table first, then ``_`` -> space and split CamelCase.

    Split files store names as folder names (``american_bulldog``, ``Apply_Eye_Makeup``); prompts
    need words, and the tokenizer would otherwise see one unknown token per name.
    """
    if info is not None and raw in info.rename:
        return info.rename[raw]
    name = raw.replace("_", " ")
    if " " not in name:
        name = _CAMEL.sub(" ", name)
    return " ".join(name.split())


def template_for(dataset: str) -> str:
    """The CoOp prompt template of ``dataset`` (``"a photo of a {}."`` for unknown names)."""
    info = DATASETS.get(dataset)
    return info.template if info is not None else "a photo of a {}."


FOLDER_AUGMENT = "noflip"
"""Augmentation preset of ``dataset=folder``: its content is unknown, and flipping is only safe for
natural images (a flipped glyph is another class), so the folder set does not flip."""


def augment_for(dataset: str) -> str:
    """The training augmentation preset ``dataset`` chooses (``DatasetInfo.augment``; ``folder`` ->
    :data:`FOLDER_AUGMENT`). Raises ``KeyError`` for an unknown dataset, like :func:`get_info`."""
    return FOLDER_AUGMENT if dataset == "folder" else get_info(dataset).augment


def get_info(dataset: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``dataset``; raises ``KeyError`` listing the known names."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}") from None
