"""The frozen CLIP backbone: the only module that builds open_clip models.

Any open_clip architecture works (``open_clip.list_models()``), with a pretrained tag, a local
checkpoint file, or random weights. The tiny architectures in ``pipeline/model_configs`` are
registered in-process (open_clip's own config search path; nothing is written anywhere) so tests and
the demo never download anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from pipeline.config import BackboneConfig, ConfigError, PromptConfig

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_ARCHS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))

_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def register_tiny_archs() -> None:
    """Make the in-repo architectures (``tiny-vit``, ``tiny-vit-s``...) known to open_clip. Idempotent."""
    if not set(TINY_ARCHS) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class Backbone:
    """A frozen open_clip model with its preprocessing and tokenizer."""

    model: nn.Module
    """The open_clip ``CLIP``/``CustomTextCLIP`` in eval mode, ``requires_grad=False`` everywhere."""
    preprocess_train: Callable
    """open_clip's training transform (random resized crop) for PIL images."""
    preprocess_val: Callable
    """open_clip's evaluation transform (resize + center crop) for PIL images."""
    tokenizer: Callable
    """open_clip tokenizer for this architecture (text -> ``[n, context_length]`` token ids)."""
    name: str
    """Architecture name."""
    pretrained: str
    """Pretrained tag or checkpoint path the weights came from (``""`` for random)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu", seed: int | None = None) -> Backbone:
    """Build the frozen backbone described by ``cfg`` on ``device``.

    ``cfg.pretrained`` is an open_clip tag (downloaded into ``cfg.cache_dir`` by open_clip), a path to
    a local checkpoint (open_clip state dict or open_clip_train checkpoint, loaded with
    ``weights_only=True``), or ``""`` for random weights. ``seed`` makes random weights reproducible
    (every process of a run must build the same random backbone); the global RNG is left untouched.
    """
    register_tiny_archs()
    pretrained = cfg.pretrained or None
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"backbone.pretrained={pretrained!r}: no such checkpoint file")
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
        if tags and pretrained not in tags:
            raise ValueError(f"backbone.pretrained={pretrained!r} is not a tag of {cfg.arch} (known: {tags})")
    if cfg.arch not in open_clip.list_models() and not cfg.arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"backbone.arch={cfg.arch!r} is not an open_clip architecture")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            cfg.arch,
            pretrained=pretrained,
            device=device,
            force_quick_gelu=cfg.force_quick_gelu,
            cache_dir=cfg.cache_dir or None,
        )
    model = model.to(dtype=_DTYPES[cfg.precision])
    freeze(model)
    return Backbone(
        model=model,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=open_clip.get_tokenizer(cfg.arch),
        name=cfg.arch,
        pretrained=cfg.pretrained,
    )


def check_backbone(cfg: BackboneConfig, prompts: PromptConfig | None = None, key: str = "backbone",
                   prompts_key: str = "prompts") -> None:
    """Config-level checks of a backbone, without building it or downloading anything (stage preflights).

    The architecture must be known to open_clip, ``pretrained`` an existing checkpoint file or a tag of
    that architecture, and the prompt depths must fit the towers read from the architecture's config.
    Raises :class:`ConfigError` naming the key (``key`` / ``prompts_key`` are the dotted prefixes).
    """
    register_tiny_archs()
    arch, pretrained = cfg.arch, cfg.pretrained
    remote = arch.startswith(("hf-hub:", "local-dir:"))  # configs that live elsewhere: not checked here
    if not remote and arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise ConfigError(f"{key}.arch={arch!r} is not an open_clip architecture"
                          + (f" (close: {', '.join(close)})" if close else ""))
    if pretrained and not Path(pretrained).is_file():
        if Path(pretrained).is_dir():
            raise ConfigError(f"{key}.pretrained={pretrained!r} is a directory, not a checkpoint file")
        if _looks_like_path(pretrained):
            raise ConfigError(f"{key}.pretrained={pretrained!r}: no such checkpoint file")
        tags = [] if remote else open_clip.list_pretrained_tags_by_model(arch)
        if not remote and pretrained not in tags:
            known = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
            raise ConfigError(f"{key}.pretrained={pretrained!r} is neither a checkpoint file nor a tag of {arch} "
                              f"({known}; '' = random weights)")
    if prompts is None or remote:
        return
    towers = open_clip.get_model_config(arch) or {}
    text_layers = towers.get("text_cfg", {}).get("layers")
    vision = towers.get("vision_cfg", {})
    if prompts.type in ("coop", "ivlp") and isinstance(text_layers, int):
        depth = 1 if prompts.type == "coop" else prompts.depth_text
        if depth > text_layers:
            raise ConfigError(f"{prompts_key}.depth_text={depth} exceeds the {text_layers} text layers of {arch}")
    if prompts.type in ("vpt", "ivlp"):
        layers = vision.get("layers")
        if vision.get("timm_model_name") or isinstance(layers, list | tuple):
            raise ConfigError(f"{prompts_key}.type={prompts.type} needs a ViT image tower; {arch} has none")
        if isinstance(layers, int) and prompts.depth_vision > layers:
            raise ConfigError(f"{prompts_key}.depth_vision={prompts.depth_vision} exceeds the {layers} vision "
                              f"layers of {arch}")


def vision_tokens(visual: nn.Module, images: Tensor) -> Tensor:
    """Input tokens of an open_clip ViT image tower *before* ``ln_pre``: ``[B, 1 + n_patches, width]``.

    The same computation as ``VisionTransformer._embeds`` minus its last step: patch embedding
    (``conv1``), CLS token, positional embedding, then patch dropout (active only in training mode;
    it keeps CLS and draws the patches to keep). ``visual.ln_pre(vision_tokens(visual, x))`` equals
    ``visual._embeds(x)``; a test checks it on the tiny architectures, so an open_clip release that
    changes ``_embeds`` fails there rather than silently. It exists because layer-0 vision prompts
    are concatenated here and normalised by ``ln_pre`` together with the patch tokens, as in the
    IVLP/MaPLe reference code (docs/ARCHITECTURE.md section 3).
    """
    x = visual.conv1(images)  # [B, width, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, n_patches, width]
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.patch_dropout(x)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every backbone weight (dropout off; the backbone never trains)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _looks_like_path(s: str) -> bool:
    return "/" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
