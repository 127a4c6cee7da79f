"""Prompted CLIP on open_clip: exactness with prompts off, frozen backbone, deep prompts, 2nd order."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.config import BackboneConfig, PromptConfig
from pipeline.prompts import PromptedCLIP

from .conftest import make_backbone

CLASSES = ["dog", "cat", "a big red car", "airplane"]


def _images(n=3, seed=0, dtype=torch.float32):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-vit-s"])
def test_prompts_off_equals_open_clip(arch):
    bb = make_backbone(arch)
    model = PromptedCLIP(bb, PromptConfig(type="none"))
    assert model.initial_prompts() == {}
    x = _images()
    ids = bb.tokenizer(["a photo of a dog.", "zebra", "two cats on a long red sofa"])
    with torch.no_grad():
        ref_img, ref_txt = bb.model.encode_image(x), bb.model.encode_text(ids)
        img, txt = model.encode_image(x, None), model.encode_text(ids, None)
        # the prompted code paths (token insertion, per-layer loop) with zero prompt tokens
        d_t, d_v = model.text_layers, model.vision_layers
        empty = {
            "text": torch.zeros(d_t, 0, bb.model.token_embedding.weight.shape[1]),
            "vision": torch.zeros(d_v, 0, bb.model.visual.class_embedding.shape[-1]),
        }
        img_p, txt_p = model.encode_image(x, empty), model.encode_text(ids, empty)
    for ours in (img, img_p):
        assert (ours - ref_img).abs().max().item() <= 1e-5
    for ours in (txt, txt_p):
        assert (ours - ref_txt).abs().max().item() <= 1e-5
    # also with gradients on (math attention backend instead of the fused kernel)
    img_g = model.encode_image(x, empty)
    assert (img_g.detach() - ref_img).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ptype", ["coop", "vpt", "ivlp"])
def test_only_prompts_train_and_backbone_is_untouched(tiny_backbone_s, ptype):
    cfg = PromptConfig(type=ptype, depth_text=3, depth_vision=3)
    model = PromptedCLIP(tiny_backbone_s, cfg, generator=torch.Generator().manual_seed(0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"coop": {"prompts.text"}, "vpt": {"prompts.vision"}, "ivlp": {"prompts.text", "prompts.vision"}}
    assert trainable == expected[ptype]
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    prompts_before = {k: v.detach().clone() for k, v in model.initial_prompts().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = torch.nn.functional.cross_entropy(model.logits(_images(4), CLASSES, model.initial_prompts()),
                                             torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    for k, v in model.initial_prompts().items():
        assert not torch.equal(v.detach(), prompts_before[k]), f"prompt {k} did not move"


def test_prompt_shapes_and_word_init(tiny_backbone):
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="ivlp"))
    p = model.initial_prompts()
    assert p["text"].shape == (9, 4, 64) and p["vision"].shape == (9, 4, 64)  # "a photo of a" = 4 tokens
    words = model._word_embeddings("a photo of a")
    assert torch.equal(p["text"][0].detach(), words)
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="coop", init_words="", n_ctx_text=6))
    assert model.initial_prompts()["text"].shape == (1, 6, 64)
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="vpt", n_ctx_vision=2, depth_vision=1))
    assert set(model.initial_prompts()) == {"vision"} and model.initial_prompts()["vision"].shape == (1, 2, 64)


def test_depth_beyond_layers_is_rejected(tiny_backbone_s):
    with pytest.raises(ValueError, match="depth_vision=9 exceeds the 4 vision layers"):
        PromptedCLIP(tiny_backbone_s, PromptConfig(type="ivlp", depth_text=2, depth_vision=9))


@pytest.mark.parametrize("key", ["text", "vision"])
def test_deep_prompts_act_at_layer_5(tiny_backbone, key):
    """Depth 9 on the 12-layer tiny model; changing only the layer-5 prompt changes the output."""
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="ivlp"), generator=torch.Generator().manual_seed(1))
    base = {k: v.detach().clone() for k, v in model.initial_prompts().items()}
    x = _images(2)
    with torch.no_grad():
        ref = model.logits(x, CLASSES, base)
        for layer in (5, 8):  # 8 = the deepest prompted layer at depth 9
            changed = {k: v.clone() for k, v in base.items()}
            changed[key][layer] += 0.5 * torch.randn_like(changed[key][layer])
            out = model.logits(x, CLASSES, changed)
            assert (out - ref).abs().max() > 1e-4, f"{key} prompt at layer {layer} had no effect"
        # rows beyond depth do not exist: the forward only uses rows < depth (9)
        assert base[key].shape[0] == 9


def test_class_token_cache(tiny_backbone):
    model = PromptedCLIP(tiny_backbone, PromptConfig(type="coop"), text_cache_size=2)
    ids, emb = model.class_tokens(CLASSES)
    assert model.class_tokens(CLASSES)[1] is emb  # cached, not rebuilt
    # placeholders sit right after SOS, one per context token
    x_id = tiny_backbone.tokenizer(["X"])[0, 1]
    # "X X X X a big red car." is SOS + 4 + 4 + 1 + EOT = 11 tokens: the padding after it is cut
    assert torch.all(ids[:, 1:5] == x_id) and ids.shape == (4, 11)
    assert int(ids.argmax(-1).max()) == ids.shape[1] - 1
    model.class_tokens(["a"])
    model.class_tokens(["b"])
    assert model.class_tokens(CLASSES)[1] is not emb  # evicted (LRU of 2)


@pytest.mark.parametrize("ptype", ["coop", "ivlp"])
def test_cut_padding_equals_full_context(ptype):
    """Class features from the cut token sequence equal those of the full context length (float64),
    values and prompt gradients: the causal mask makes the positions after EOT irrelevant."""
    bb = make_backbone("tiny-vit-s", precision="fp64", seed=5)
    cfg = PromptConfig(type=ptype, depth_text=3, depth_vision=3)
    model = PromptedCLIP(bb, cfg, generator=torch.Generator().manual_seed(0))
    ids, emb = model.class_tokens(CLASSES)
    assert ids.shape[1] < model.context_length
    full_ids = bb.tokenizer([f"X X X X {c}." for c in CLASSES])
    assert torch.equal(full_ids[:, : ids.shape[1]], ids) and torch.all(full_ids[:, ids.shape[1]:] == 0)
    prompts = {k: v.detach().clone().requires_grad_(True) for k, v in model.initial_prompts().items()}
    cut = model.encode_classes(CLASSES, prompts)
    full = model.encode_text(full_ids, prompts, normalize=True)
    assert (cut - full).abs().max().item() <= 1e-12
    weights = torch.randn(cut.shape, generator=torch.Generator().manual_seed(1), dtype=cut.dtype)
    g_cut = torch.autograd.grad((cut * weights).sum(), prompts["text"])[0]
    g_full = torch.autograd.grad((full * weights).sum(), prompts["text"])[0]
    assert g_cut.abs().max() > 0 and (g_cut - g_full).abs().max().item() <= 1e-12


def test_second_order_gradient_matches_finite_differences():
    """d/dp0 of L_query(p0 - a * dL_support/dp0) for IVLP, float64, against central differences."""
    bb = make_backbone("tiny-vit-s", precision="fp64", seed=3)
    model = PromptedCLIP(bb, PromptConfig(type="ivlp", depth_text=3, depth_vision=3),
                         generator=torch.Generator().manual_seed(0))
    p0 = {k: v.detach().clone().requires_grad_(True) for k, v in model.initial_prompts().items()}
    xs, ys = _images(4, seed=1, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    xq, yq = _images(4, seed=2, dtype=torch.float64), torch.tensor([3, 2, 1, 0])
    alpha = 0.5
    ce = torch.nn.functional.cross_entropy

    def outer(p, create_graph):
        inner = ce(model.logits(xs, CLASSES, p), ys)
        grads = torch.autograd.grad(inner, list(p.values()), create_graph=create_graph)
        adapted = {k: v - alpha * g for (k, v), g in zip(p.items(), grads)}
        return ce(model.logits(xq, CLASSES, adapted), yq)

    loss = outer(p0, create_graph=True)
    grads = torch.autograd.grad(loss, list(p0.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6  # the loss is strongly curved at this init: 1e-5 leaves O(eps^2) error ~1e-5
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in p0.items()}
        analytic = sum((g * direction[k]).sum() for g, k in zip(grads, p0))
        with torch.enable_grad():
            plus = outer({k: (v + eps * direction[k]).detach().requires_grad_(True) for k, v in p0.items()}, False)
            minus = outer({k: (v - eps * direction[k]).detach().requires_grad_(True) for k, v in p0.items()}, False)
        numeric = (plus - minus) / (2 * eps)
        rel = (analytic - numeric).abs() / max(numeric.abs().item(), 1e-12)
        print(f"directional derivative rel err {rel.item():.2e}")
        assert rel.item() < 1e-4, f"relative error {rel.item():.2e} (analytic {analytic.item()}, fd {numeric.item()})"


def test_local_checkpoint_path(tmp_path):
    bb = make_backbone("tiny-vit-s", seed=5)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in bb.model.state_dict().items()}}, ckpt)
    torch.manual_seed(99)  # a different random init must be overwritten by the file
    loaded = load_backbone(BackboneConfig(arch="tiny-vit-s", pretrained=str(ckpt)))
    for k, v in bb.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert all(not p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training


def test_backbone_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_backbone(BackboneConfig(arch="tiny-vit-s", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="not a tag of ViT-B-16"):
        load_backbone(BackboneConfig(arch="ViT-B-16", pretrained="not-a-tag"))
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_backbone(BackboneConfig(arch="ViT-Q-99", pretrained=""))
