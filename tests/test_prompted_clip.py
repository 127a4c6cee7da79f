"""Prompted CLIP on open_clip: exactness with prompts off, frozen backbone, deep prompts, 2nd order."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import PatchDropout

from pipeline.backbone import load_backbone, vision_tokens
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


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-vit-s"])
def test_vision_tokens_then_ln_pre_is_open_clip_embeds(arch):
    """``ln_pre(vision_tokens(x))`` is open_clip's ``_embeds(x)``, also with patch dropout active (same RNG
    draw): the one copy of open_clip's embedding code stays in step with the installed release."""
    bb = make_backbone(arch)
    visual = bb.model.visual
    x = _images()
    with torch.no_grad():
        assert torch.equal(visual.ln_pre(vision_tokens(visual, x)), visual._embeds(x))
        keep = visual.patch_dropout
        visual.patch_dropout = PatchDropout(0.5).train()
        try:
            torch.manual_seed(3)
            ours = visual.ln_pre(vision_tokens(visual, x))
            torch.manual_seed(3)
            ref = visual._embeds(x)
        finally:
            visual.patch_dropout = keep
    n_patches = visual.positional_embedding.shape[0] - 1
    assert ours.shape[1] == 1 + max(1, n_patches // 2) and torch.equal(ours, ref)


def _layer_norm(x, ln):
    return torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _reference_image_features(visual, images, vision_prompts):
    """IVLP/MaPLe image forward written out from the tower's weights (ViT, ``tok`` pooling, batch first).

    As in the reference code: prompts are appended to CLS + patches + positional embedding *before*
    ``ln_pre``; before block ``i >= 1`` the last ``n`` tokens are replaced by ``vision_prompts[i]``.
    """
    assert visual.pool_type == "tok" and visual.attn_pool is None and not visual.final_ln_after_pool
    batch, n = images.shape[0], vision_prompts.shape[1]
    x = torch.nn.functional.conv2d(images, visual.conv1.weight, stride=visual.conv1.stride)  # [B, W, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
    x = torch.cat([visual.class_embedding.expand(batch, 1, -1), x], dim=1) + visual.positional_embedding
    x = torch.cat([x, vision_prompts[0].expand(batch, -1, -1)], dim=1)
    x = _layer_norm(x, visual.ln_pre)
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i < vision_prompts.shape[0]:
            x = torch.cat([x[:, :-n], vision_prompts[i].expand(batch, -1, -1)], dim=1)
        assert isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)
        attn = block.attn
        heads, width = attn.num_heads, x.shape[-1]
        h = _layer_norm(x, block.ln_1) @ attn.in_proj_weight.t() + attn.in_proj_bias
        q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in h.chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
        h = (weights @ v).transpose(1, 2).reshape(batch, -1, width)
        x = x + attn.out_proj(h)
        x = x + block.mlp(_layer_norm(x, block.ln_2))
    return _layer_norm(x[:, 0], visual.ln_post) @ visual.proj


def test_layer0_vision_prompts_go_through_ln_pre():
    """Against a hand-written IVLP reference forward (float64, non-trivial ln_pre weight and bias):
    image features, logits and the layer-0 vision prompt gradient agree. With the prompts inserted
    after ln_pre (the former placement) this fails by orders of magnitude."""
    bb = make_backbone("tiny-vit-s", precision="fp64", seed=11)
    visual = bb.model.visual
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        visual.ln_pre.weight.copy_(1 + 0.5 * torch.randn(visual.ln_pre.weight.shape, generator=gen, dtype=torch.float64))
        visual.ln_pre.bias.copy_(0.5 * torch.randn(visual.ln_pre.bias.shape, generator=gen, dtype=torch.float64))
    model = PromptedCLIP(bb, PromptConfig(type="ivlp", depth_text=3, depth_vision=3, init_std=0.5),
                         generator=torch.Generator().manual_seed(0))
    prompts = {k: v.detach().clone().requires_grad_(True) for k, v in model.initial_prompts().items()}
    x, y = _images(4, seed=6, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    ce = torch.nn.functional.cross_entropy

    ours_img = model.encode_image(x, prompts)
    ours_logits = model.logits(x, CLASSES, prompts)
    ours_grad = torch.autograd.grad(ce(ours_logits, y), prompts["vision"])[0]

    ref_img = _reference_image_features(visual, x, prompts["vision"])
    txt = model.encode_classes(CLASSES, prompts)
    ref_logits = model.logit_scale * torch.nn.functional.normalize(ref_img, dim=-1) @ txt.t()
    ref_grad = torch.autograd.grad(ce(ref_logits, y), prompts["vision"])[0]

    d_img = (ours_img - ref_img).abs().max().item()
    d_logits = (ours_logits - ref_logits).abs().max().item()
    d_grad0 = (ours_grad[0] - ref_grad[0]).abs().max().item()
    d_grad = (ours_grad - ref_grad).abs().max().item()
    print(f"max abs diff: features {d_img:.1e}, logits {d_logits:.1e}, layer-0 grad {d_grad0:.1e} "
          f"(|grad| {ref_grad[0].abs().max().item():.1e}), all rows {d_grad:.1e}")
    scale = ref_grad[0].abs().max().item()
    assert scale > 1e-3  # the layer-0 prompt matters, so the comparison means something
    assert d_img <= 1e-6 and d_logits <= 1e-6
    # the gradients are ~5e-3, so also relative: the old placement is off by ~80% of the gradient
    assert d_grad0 <= 1e-6 and d_grad <= 1e-6 and d_grad0 <= 1e-9 * scale


class _CountBroadcastBmm(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ``bmm`` calls whose second operand is broadcast over the batch (stride 0): a weight that
    ``matmul`` expanded because it would not fold a strided input into one ``mm``."""

    def __init__(self):
        super().__init__()
        self.broadcast = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            self.total += 1
            self.broadcast += int(args[1].stride(0) == 0)
        return func(*args, **(kwargs or {}))


def _second_order_loss(model, prompts, create_graph=True):
    ce = torch.nn.functional.cross_entropy
    xs = _images(3, seed=1, dtype=torch.float64)
    inner = ce(model.logits(xs, CLASSES, prompts), torch.tensor([0, 1, 2]))
    grads = torch.autograd.grad(inner, list(prompts.values()), create_graph=create_graph)
    adapted = {k: v - 0.5 * g for (k, v), g in zip(prompts.items(), grads)}
    return ce(model.logits(_images(3, seed=2, dtype=torch.float64), CLASSES, adapted), torch.tensor([3, 2, 1]))


def test_attention_projection_runs_as_one_mm_with_unchanged_results(monkeypatch):
    """The self-attention input is made contiguous before open_clip's MultiheadAttention projects it
    (pipeline.prompts._ContiguousAttentionInput): no projection runs as a bmm over a broadcast weight,
    in the forward, the backward or the double backward; values and second-order gradients equal those
    of the unmodified path (float64)."""
    import contextlib

    import pipeline.prompts as prompts_mod

    bb = make_backbone("tiny-vit-s", precision="fp64", seed=3)
    model = PromptedCLIP(bb, PromptConfig(type="ivlp", depth_text=3, depth_vision=3),
                         generator=torch.Generator().manual_seed(0))

    def run():
        p0 = {k: v.detach().clone().requires_grad_(True) for k, v in model.initial_prompts().items()}
        counter = _CountBroadcastBmm()
        with counter:
            loss = _second_order_loss(model, p0)
            grads = torch.autograd.grad(loss, list(p0.values()))
        return loss.detach(), grads, counter

    loss, grads, counter = run()
    assert counter.total > 0 and counter.broadcast == 0  # math attention still runs its own bmm
    monkeypatch.setattr(prompts_mod, "_ContiguousAttentionInput", contextlib.nullcontext)
    ref_loss, ref_grads, ref_counter = run()
    assert ref_counter.broadcast > 0  # without it, matmul broadcasts the frozen projection weight
    assert (loss - ref_loss).abs().item() <= 1e-12
    for g, r in zip(grads, ref_grads):  # the same products summed in another order: float64 rounding
        assert g.abs().max() > 0 and (g - r).abs().max().item() <= 1e-12 * r.abs().max().item()
