"""Prompt learners on a frozen open_clip model, with a functional forward.

Prompts live in an explicit ``dict[str, Tensor]`` so an inner loop can evaluate *adapted* prompts
(``encode_image(x, prompts=adapted)``) without cloning any module:

- ``"text"``:   ``[depth_text, n_ctx_text, width_text]``  - context tokens after SOS; row ``i`` replaces
  the context positions at the input of text layer ``i`` (row 0 = the input embedding, CoOp).
- ``"vision"``: ``[depth_vision, n_ctx_vision, width_vision]`` - tokens inserted after CLS, row 0 before
  ``ln_pre``; row ``i`` replaces them at the input of vision layer ``i`` (row 0 only = shallow VPT).

Prompt types: ``none`` (plain CLIP), ``coop`` (text row 0 only), ``vpt`` (vision only), ``ivlp``
(deep text and deep vision, independent). With ``none`` the encoders run exactly open_clip's
``encode_image`` / ``encode_text`` computation; a test checks equality.

Attention backend. With gradients on, every forward runs under the math SDPA backend unless the caller
has declared, with :func:`first_order_attention`, that the graph it builds is differentiated only once:
the fused kernels (flash / memory-efficient on CUDA, flash on CPU) have a first backward but no double
backward, so a second-order meta-gradient through them would fail. Without gradients (frozen forwards,
evaluation) SDPA always picks its fused kernels.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from pipeline.backbone import Backbone, vision_tokens
from pipeline.config import PromptConfig

Prompts = dict[str, Tensor]

# Placeholder word whose token positions the text context replaces ("X X X X classname.").
_PLACEHOLDER = "X"


# Whether a graph built now may be differentiated twice (a second-order meta-gradient). True by default,
# so code that does not say otherwise gets the math backend, which every order of backward goes through;
# only a caller that knows its graph sees a single backward lifts it (first_order_attention).
_DOUBLE_BACKWARD: ContextVar[bool] = ContextVar("double_backward_needed", default=True)


def double_backward_needed() -> bool:
    """Whether forwards run now must stay double-backward safe (see :func:`first_order_attention`)."""
    return _DOUBLE_BACKWARD.get()


@contextlib.contextmanager
def first_order_attention(first_order: bool = True) -> Iterator[None]:
    """Declare how often the graphs built inside are differentiated: once (``first_order=True``) lets SDPA
    pick its fused kernels with gradients on; ``False`` forces the math backend again, also inside an
    enclosing first-order region (a second-order pass nested in a first-order one stays safe).

    The backend is fixed when the forward runs (the backward replays the forward's kernel), so the context
    has to cover the forward, not the ``backward`` / ``autograd.grad`` call. Enter it only around passes
    whose graph no ``create_graph=True`` gradient is taken through: under it, differentiating a gradient
    raises (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented``, or the CUDA kernels' equivalent).
    """
    token = _DOUBLE_BACKWARD.set(not first_order)
    try:
        yield
    finally:
        _DOUBLE_BACKWARD.reset(token)


def attention_context():
    """Math SDPA when gradients are on and a double backward may follow (the default); SDPA's own choice,
    the fused kernels where the shapes allow, without gradients or inside :func:`first_order_attention`."""
    if torch.is_grad_enabled() and _DOUBLE_BACKWARD.get():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class PromptedCLIP(nn.Module):
    """A frozen open_clip model plus learnable prompts; encoders take the prompts as an argument.

    Args:
        backbone: the frozen backbone from :func:`pipeline.backbone.load_backbone`.
        cfg: prompt configuration.
        generator: RNG for prompt initialisation (seed it for reproducible runs).
        text_cache_size: how many class sets keep their token ids + token embeddings cached.
    """

    def __init__(
        self,
        backbone: Backbone,
        cfg: PromptConfig,
        generator: torch.Generator | None = None,
        text_cache_size: int = 128,
    ):
        super().__init__()
        self.clip = backbone.model
        self.tokenizer = backbone.tokenizer
        self.cfg = cfg
        self.text_tower = _text_tower(self.clip)
        self.visual = self.clip.visual
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[tuple[str, ...], tuple[Tensor, Tensor]] = OrderedDict()
        self.prompts = nn.ParameterDict(
            {k: nn.Parameter(v) for k, v in self._init_prompts(cfg, generator).items()}
        )
        self.context_length = int(self.text_tower.positional_embedding.shape[0])

    # ------------------------------------------------------------------ prompt shapes and init
    @property
    def n_ctx_text(self) -> int:
        return int(self.prompts["text"].shape[1]) if "text" in self.prompts else 0

    @property
    def n_ctx_vision(self) -> int:
        return int(self.prompts["vision"].shape[1]) if "vision" in self.prompts else 0

    @property
    def text_layers(self) -> int:
        return len(self.text_tower.transformer.resblocks)

    @property
    def vision_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    def _init_prompts(self, cfg: PromptConfig, generator: torch.Generator | None) -> Prompts:
        dtype = _param_dtype(self.clip)
        device = next(self.clip.parameters()).device
        out: Prompts = {}
        if cfg.type in ("coop", "ivlp"):
            depth = 1 if cfg.type == "coop" else cfg.depth_text
            if depth > self.text_layers:
                raise ValueError(f"prompts.depth_text={depth} exceeds the {self.text_layers} text layers")
            width = self.text_tower.token_embedding.weight.shape[1]
            if cfg.init_words:
                init = self._word_embeddings(cfg.init_words).to(dtype)  # [n_words, width]
                n_ctx = init.shape[0]
            else:
                init, n_ctx = None, cfg.n_ctx_text
            text = torch.randn(depth, n_ctx, width, generator=generator, dtype=dtype) * cfg.init_std
            if init is not None:
                text[0] = init
            out["text"] = text.to(device)
        if cfg.type in ("vpt", "ivlp"):
            # what vision_tokens and encode_image use: open_clip's VisionTransformer has all of them
            vit_parts = ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre",
                         "transformer", "_pool")
            if not all(hasattr(self.visual, a) for a in vit_parts):
                raise ValueError(f"prompts.type={cfg.type} needs a ViT image tower; got {type(self.visual).__name__}")
            if cfg.depth_vision > self.vision_layers:
                raise ValueError(
                    f"prompts.depth_vision={cfg.depth_vision} exceeds the {self.vision_layers} vision layers"
                )
            width = self.visual.class_embedding.shape[-1]
            vision = torch.randn(cfg.depth_vision, cfg.n_ctx_vision, width, generator=generator, dtype=dtype)
            out["vision"] = (vision * cfg.init_std).to(device)
        return out

    def _word_embeddings(self, words: str) -> Tensor:
        """Token embeddings of ``words`` without SOS/EOT: ``[n_tokens, width]``."""
        ids = self.tokenizer([words])[0]
        n = int(ids.argmax())  # EOT has the largest id; tokens 1..n-1 are the words
        with torch.no_grad():
            emb = self.text_tower.token_embedding(ids[1:n].to(self.text_tower.token_embedding.weight.device))
        return emb.detach().clone()

    def initial_prompts(self) -> Prompts:
        """The learnable prompts as a plain dict (the tensors are the module's parameters)."""
        return dict(self.prompts.items())

    # ------------------------------------------------------------------ text
    def class_tokens(self, classnames: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``[C, L]`` and frozen token embeddings ``[C, L, width]`` of the class texts.

        The text is ``"X .. X classname."`` with one placeholder per context token (the placeholders'
        embeddings are replaced by the prompts). ``L`` is cut after the longest text's EOT where that
        cannot change the features (:meth:`text_length`). Cached per class set (LRU of ``text_cache_size``).
        """
        key = tuple(classnames)
        hit = self._text_cache.get(key)
        if hit is not None:
            self._text_cache.move_to_end(key)
            return hit
        prefix = " ".join([_PLACEHOLDER] * self.n_ctx_text)
        texts = [f"{prefix} {name}." if prefix else f"{name}." for name in classnames]
        emb_layer = self.text_tower.token_embedding
        ids = self.tokenizer(texts).to(emb_layer.weight.device)
        ids = ids[:, : self.text_length(ids)]
        with torch.no_grad():
            emb = emb_layer(ids)
        self._text_cache[key] = (ids, emb)
        if len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return ids, emb

    def text_length(self, ids: Tensor) -> int:
        """How many leading positions of ``ids`` the pooled feature depends on.

        Under a causal mask, position ``i`` only attends to positions ``<= i``; with EOT (argmax) pooling
        the feature is read at the EOT position, so everything after the longest text's EOT is padding
        that cannot change the result. Class texts are ~10 tokens of a 77-token context, so cutting the
        padding makes every text-tower forward and backward (of which the meta step runs several) several
        times cheaper. Towers without a causal mask or with ``last`` pooling keep the full length.
        """
        tower = self.text_tower
        if tower.attn_mask is None or tower.text_pool_type not in ("argmax", "eos", "first"):
            return int(ids.shape[1])
        if tower.text_pool_type == "eos" and getattr(tower, "text_eos_id", None) is not None:
            last = (ids == tower.text_eos_id).int().argmax(dim=-1)
        else:
            last = ids.argmax(dim=-1)
        return int(last.max()) + 1

    def encode_text(
        self,
        ids: Tensor,
        prompts: Prompts | None = None,
        token_embeddings: Tensor | None = None,
        normalize: bool = False,
    ) -> Tensor:
        """Text features ``[n, embed_dim]`` of token ids ``[n, L]``.

        With text prompts, positions ``1..n_ctx`` (the placeholders) are replaced by ``prompts["text"][i]``
        at the input of layer ``i``; without, this is open_clip's ``encode_text``. ``L`` may be shorter
        than the context length (padding cut by :meth:`class_tokens`); positional embeddings and the
        causal mask are cut to match.
        """
        tower = self.text_tower
        text_prompts = None if prompts is None else prompts.get("text")
        with attention_context():
            cast_dtype = tower.transformer.get_cast_dtype()
            x = token_embeddings if token_embeddings is not None else tower.token_embedding(ids)
            x = x.to(cast_dtype)  # [n, L, width]
            if text_prompts is not None:
                x = _replace_tokens(x, text_prompts[0], start=1)
            length = x.shape[1]
            x = x + tower.positional_embedding[:length].to(cast_dtype)
            mask = tower.attn_mask
            if mask is not None and length < mask.shape[0]:
                mask = mask[:length, :length]
            x = _run_blocks(tower.transformer, x, mask, text_prompts, start=1)
            x = tower.ln_final(x)
            x = text_global_pool(x, ids, tower.text_pool_type, eos_token_id=getattr(tower, "text_eos_id", None))
            proj = tower.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x

    def encode_classes(self, classnames: Sequence[str], prompts: Prompts | None = None) -> Tensor:
        """Normalised prompted text features ``[C, embed_dim]`` of ``"[ctx] classname."``."""
        ids, emb = self.class_tokens(classnames)
        return self.encode_text(ids, prompts, token_embeddings=emb, normalize=True)

    # ------------------------------------------------------------------ vision
    def encode_image(self, images: Tensor, prompts: Prompts | None = None, normalize: bool = False) -> Tensor:
        """Image features ``[B, embed_dim]``; with vision prompts, tokens are inserted after CLS.

        Row 0 is inserted before ``ln_pre`` (normalised with CLS and the patches); row ``i >= 1``
        replaces the prompt positions at the input of layer ``i``, unnormalised. Prompt tokens are
        dropped again before pooling, so ``avg`` pooling still averages patches only.
        """
        vision_prompts = None if prompts is None else prompts.get("vision")
        visual = self.visual
        if vision_prompts is None:
            with attention_context():
                x = visual(images)
            return F.normalize(x, dim=-1) if normalize else x
        with attention_context():
            # Layer-0 prompts join CLS + patches + positional embedding *before* ln_pre, so they are
            # normalised with the patch tokens as in the IVLP/MaPLe reference (docs/ARCHITECTURE.md
            # section 3). Patch dropout acts on CLS + patches only, as in open_clip, never on prompts.
            x = vision_tokens(visual, images)  # [B, 1 + n_patches, width], before ln_pre
            n = vision_prompts.shape[1]
            x = _replace_tokens(x, vision_prompts[0], start=1, n_replaced=0)  # [B, 1 + n + n_patches, width]
            x = visual.ln_pre(x)
            x = _run_blocks(visual.transformer, x, None, vision_prompts, start=1)
            x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)  # drop prompt tokens: [B, 1 + n_patches, width]
            pooled, _ = visual._pool(x)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    # ------------------------------------------------------------------ classification
    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()

    def logits(self, images: Tensor, classnames: Sequence[str], prompts: Prompts | None = None) -> Tensor:
        """``s * cos(f(x), g(c))``: ``[B, C]`` logits of images against prompted class texts."""
        img = self.encode_image(images, prompts, normalize=True)
        txt = self.encode_classes(classnames, prompts)
        return self.logit_scale * img @ txt.t()


def _text_tower(clip: nn.Module) -> nn.Module:
    """The module holding the text transformer (``CLIP`` keeps it inline, ``CustomTextCLIP`` in ``.text``)."""
    tower = getattr(clip, "text", clip)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    missing = [a for a in needed if not hasattr(tower, a)]
    if missing or getattr(tower, "cls_emb", None) is not None:
        raise ValueError(
            f"unsupported text tower {type(tower).__name__}: prompts need an open_clip causal text "
            f"transformer (missing {missing or ['no CLS-token pooling']})"
        )
    return tower


def _param_dtype(model: nn.Module) -> torch.dtype:
    """Prompts are fp32 unless the backbone is fp64 (gradient checks); low precision stays in autocast."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _replace_tokens(x: Tensor, tokens: Tensor, start: int, n_replaced: int | None = None) -> Tensor:
    """Out-of-place ``x[:, start:start+n_replaced] = tokens`` (autograd-friendly). x: [B, L, W], tokens: [n, W].

    ``n_replaced`` defaults to ``n`` (swap the prompt positions); ``0`` inserts the tokens at ``start``.
    """
    n = tokens.shape[0] if n_replaced is None else n_replaced
    rows = tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], rows, x[:, start + n :]], dim=1)


class _ContiguousAttentionInput(TorchFunctionMode):
    """Hand ``F.multi_head_attention_forward`` a contiguous self-attention input.

    ``nn.MultiheadAttention(batch_first=True)`` transposes its ``[N, L, E]`` input to ``[L, N, E]``, a
    strided view, and projects it with ``linear``. When that input requires grad and the weight does not
    (frozen backbone, learnable prompts), ``matmul`` will not fold a non-contiguous 3-D input into one
    ``mm``: it broadcasts the weight to ``[L, E, 3E]`` and runs ``bmm`` over the ``L`` positions, each a
    product with only ``N`` rows. Its backward, and under a vectorised two-cotangent or double backward
    every derivative of it, inherits those thin products. Copying the input once makes the projection
    one ``mm`` with ``L * N`` rows: the same products, so the same values up to summation order.
    Measured side by side (``bench/ab_attention_input.py``, docs/BENCHMARKS.md): on ViT-B/16 on the CPU
    at 50 classes, the plain and the ProMetaR iteration both take about a fifth less time.
    Only this function is touched; every other call passes straight through.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.multi_head_attention_forward and len(args) >= 3:
            q, k, v = args[:3]
            if q is k and k is v and not q.is_contiguous():  # self-attention keeps its packed projection
                q = q.contiguous()
                args = (q, q, q, *args[3:])
        return func(*args, **(kwargs or {}))


def _run_blocks(transformer: nn.Module, x: Tensor, attn_mask: Tensor | None, deep: Tensor | None, start: int) -> Tensor:
    """Run the residual blocks; before block ``i >= 1`` (``i < len(deep)``) swap in ``deep[i]``."""
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    with _ContiguousAttentionInput():
        for i, block in enumerate(transformer.resblocks):
            if deep is not None and 1 <= i < deep.shape[0]:
                if transformer.batch_first:
                    x = _replace_tokens(x, deep[i], start)
                else:
                    x = _replace_tokens(x.transpose(0, 1), deep[i], start).transpose(0, 1)
            x = block(x, attn_mask=attn_mask)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x
