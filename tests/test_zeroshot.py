"""Zero-shot classifier from one template or an ensemble, against open_clip directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PromptConfig
from pipeline.prompts import PromptedCLIP
from pipeline.zeroshot import (
    TEMPLATE_SETS,
    FrozenTextCache,
    resolve_templates,
    zeroshot_logits,
    zeroshot_weights,
)

CLASSES = ["zero", "one", "two"]
TEMPLATES = ("a photo of a {}.", "a drawing of the number {}.", "{}")


def test_single_template_matches_open_clip(tiny_backbone):
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="none"))
    w = zeroshot_weights(model, CLASSES, TEMPLATES[:1])
    with torch.no_grad():
        ref = tiny_backbone.model.encode_text(tiny_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    assert torch.allclose(w, F.normalize(ref, dim=-1), atol=1e-6)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        img = F.normalize(tiny_backbone.model.encode_image(x), dim=-1)
        expected = tiny_backbone.model.logit_scale.exp() * img @ w.t()
    assert torch.allclose(zeroshot_logits(model, x, w), expected, atol=1e-5)


def test_ensemble_is_normalised_mean(tiny_backbone):
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="none"))
    per_template = torch.stack([zeroshot_weights(model, CLASSES, (t,)) for t in TEMPLATES])  # [T, C, D]
    w = zeroshot_weights(model, CLASSES, TEMPLATES)
    assert torch.allclose(w, F.normalize(per_template.mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(w.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-6)


def test_bad_templates(tiny_backbone):
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="none"))
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot_weights(model, CLASSES, ("a photo",))
    with pytest.raises(ValueError, match="at least one"):
        zeroshot_weights(model, CLASSES, ())


def test_frozen_text_cache(tiny_backbone):
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="none"))
    cache = FrozenTextCache(model, TEMPLATES[:2], size=len(CLASSES), sets=1)
    a = cache(CLASSES)
    assert cache(CLASSES) is a and cache.computed == len(CLASSES)
    # a subset in another order (a meta step's support or query) is assembled from cached rows
    sub = cache(CLASSES[2::-1])
    assert cache.computed == len(CLASSES) and torch.equal(sub, a[[2, 1, 0]])
    ref = zeroshot_weights(model, CLASSES[2::-1], TEMPLATES[:2])
    assert torch.allclose(sub, ref, atol=1e-6)
    cache(["x"])  # one new name: only it is encoded, and the least recently used row is evicted
    assert cache.computed == len(CLASSES) + 1 and len(cache._rows) == len(CLASSES)
    again = cache(CLASSES)
    assert again is not a and torch.allclose(again, a, atol=1e-6) and cache.computed == len(CLASSES) + 2


def test_template_sets_are_the_published_lists():
    """The sets are plain data; check them against open_clip's copy and CoOp/PromptSRC's construction."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    assert TEMPLATE_SETS["imagenet"] == tuple(f("{}") for f in OPENAI_IMAGENET_TEMPLATES)
    assert len(TEMPLATE_SETS["imagenet"]) == 80 == len(set(TEMPLATE_SETS["imagenet"]))
    assert TEMPLATE_SETS["imagenet7"] == tuple(f("{}") for f in SIMPLE_IMAGENET_TEMPLATES)
    promptsrc = TEMPLATE_SETS["promptsrc"]
    assert len(promptsrc) == 60 and promptsrc[0] == "a photo of a {}." and promptsrc[-1] == "itap of the {}."
    assert set(promptsrc) == set(TEMPLATE_SETS["imagenet"][:60])
    for name, templates in TEMPLATE_SETS.items():
        assert resolve_templates([f"@{name}"], "{}") == templates  # every entry is well formed


def test_resolve_templates():
    dataset = "a photo of a {}, a type of pet."
    assert resolve_templates([], dataset) == (dataset,)  # empty = the dataset's single template
    assert resolve_templates(["@dataset"], dataset) == (dataset,)
    assert resolve_templates(["{} texture.", "a photo of a {}."], dataset) == ("{} texture.", "a photo of a {}.")
    mixed = resolve_templates(["@dataset", "@imagenet7", "itap of a {}.", "{}"], dataset)
    # in order, repeats dropped: "itap of a {}." is already the first of the 7
    assert mixed == (dataset, *TEMPLATE_SETS["imagenet7"], "{}")
    # "a photo of a {}." is in CLIP's 80: as dataset template it is counted once
    both = resolve_templates(["@dataset", "@imagenet"], "a photo of a {}.")
    assert len(both) == 80 and both[0] == "a photo of a {}."


@pytest.mark.parametrize("entries, match", [
    (["@imagenet81"], r"'@imagenet81' is unknown; known: @imagenet, @imagenet7, @promptsrc, @dataset"),
    (["a photo"], r"'a photo' has no '\{\}' for the class name, and no template set has that name"),
    (["{} and {}"], "exactly one"),
    (["a {x} of {}"], "no other braces"),
    (["@dataset"], "exactly one"),  # a dataset template without {} is refused too
])
def test_resolve_templates_errors(entries, match):
    with pytest.raises(ValueError, match=match):
        resolve_templates(entries, "no placeholder" if entries == ["@dataset"] else "{}")


def test_resolved_ensemble_feeds_zeroshot_weights(tiny_backbone):
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="none"))
    templates = resolve_templates(["@dataset", "@imagenet7"], "a photo of the digit {}.")
    w = zeroshot_weights(model, CLASSES, templates)
    per_template = torch.stack([zeroshot_weights(model, CLASSES, (t,)) for t in templates])
    assert len(templates) == 8 and torch.allclose(w, F.normalize(per_template.mean(0), dim=-1), atol=1e-6)


def test_bare_set_names_mean_the_set():
    assert resolve_templates(["imagenet7"], "{}") == resolve_templates(["@imagenet7"], "{}")
    assert resolve_templates(["dataset", "a {}"], "x {}.") == ("x {}.", "a {}")
