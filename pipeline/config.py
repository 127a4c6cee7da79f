"""Typed configuration: frozen dataclasses hold every default once; YAML files are small deltas.

A config is resolved in three layers, later ones winning:

1. the dataclass defaults (the docstring under each field says what it means),
2. a YAML file (``yaml.safe_load``; only the keys that differ from the defaults),
3. dotted ``key=value`` overrides from the command line (``prompts.n_ctx_text=8``).

OmegaConf's structured configs do the merging, so an unknown key, a wrong type or a missing
value fails *before* anything runs, with the offending key in the message. The result is converted
back into the frozen dataclasses, so code downstream gets plain typed Python objects, and
:func:`to_dict` turns it into a JSON/YAML-safe dict for checkpoints and trackers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the key."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen CLIP model to build (any open_clip architecture)."""

    arch: str = "ViT-B-16"
    """open_clip model name, e.g. ``ViT-B-16``, ``RN50``, or a tiny in-repo architecture such as
    ``tiny-vit`` (see ``pipeline/model_configs``)."""
    pretrained: str = "openai"
    """open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``...), a local checkpoint file, or
    ``""`` for random weights (tests only)."""
    precision: str = "fp32"
    """Weights dtype of the frozen backbone: ``fp32``, ``fp64`` (gradient checks) or ``bf16``."""
    cache_dir: str = ""
    """Where open_clip caches downloaded weights; empty uses open_clip's default."""
    force_quick_gelu: bool = False
    """Use QuickGELU activations (needed for OpenAI-trained weights loaded from a local file)."""


@dataclass(frozen=True)
class PromptConfig:
    """Learnable prompts added to the frozen backbone (DESIGN section 3)."""

    type: str = "ivlp"
    """``none`` (plain CLIP), ``coop`` (shallow text context), ``vpt`` (visual tokens), or
    ``ivlp`` (deep text + deep vision prompts, independent)."""
    n_ctx_text: int = 4
    """Number of learnable text context tokens (``coop``/``ivlp``). Ignored when ``init_words`` is
    set: the context then has as many tokens as the init words."""
    n_ctx_vision: int = 4
    """Number of learnable visual tokens inserted after CLS (``vpt``/``ivlp``)."""
    depth_text: int = 9
    """Number of text transformer layers with their own prompts (1 = input only; ``coop`` is 1)."""
    depth_vision: int = 9
    """Number of vision transformer layers with their own prompts (1 = shallow VPT)."""
    init_words: str = "a photo of a"
    """Initialise the layer-0 text context from these words' token embeddings; empty = random."""
    init_std: float = 0.02
    """Standard deviation of the normal init for prompts not initialised from words."""


@dataclass(frozen=True)
class ModelConfig:
    """A frozen backbone plus its prompt learner."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The frozen CLIP model."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """The learnable prompts."""
    seed: int = 1
    """Seed for prompt initialisation."""

    def validate(self) -> None:
        validate_model(self)


PROMPT_TYPES = ("none", "coop", "vpt", "ivlp")
PRECISIONS = ("fp32", "fp64", "bf16", "fp16")


def validate_model(cfg: ModelConfig) -> None:
    """Check value-level consistency that types alone cannot express."""
    p = cfg.prompts
    if p.type not in PROMPT_TYPES:
        raise ConfigError(f"prompts.type={p.type!r}: expected one of {PROMPT_TYPES}")
    if cfg.backbone.precision not in PRECISIONS:
        raise ConfigError(f"backbone.precision={cfg.backbone.precision!r}: expected one of {PRECISIONS}")
    for key in ("n_ctx_text", "n_ctx_vision", "depth_text", "depth_vision"):
        if getattr(p, key) < 0:
            raise ConfigError(f"prompts.{key}={getattr(p, key)} must be >= 0")
    if p.type in ("coop", "ivlp") and p.depth_text < 1:
        raise ConfigError(f"prompts.depth_text={p.depth_text} must be >= 1 for prompts.type={p.type}")
    if p.type in ("vpt", "ivlp") and (p.depth_vision < 1 or p.n_ctx_vision < 1):
        raise ConfigError(f"prompts.depth_vision and prompts.n_ctx_vision must be >= 1 for {p.type}")
    if p.type in ("coop", "ivlp") and not p.init_words and p.n_ctx_text < 1:
        raise ConfigError("prompts.n_ctx_text must be >= 1 when prompts.init_words is empty")


# Which schema each folder under configs/ holds ("module:Class", imported on use so that stage modules
# can define their own configs without import cycles). Listed explicitly, never filled by side effects.
SCHEMAS: dict[str, str] = {
    "model": "pipeline.config:ModelConfig",
    "cluster": "pipeline.cluster:ClusterConfig",
    "extract": "pipeline.extract:ExtractConfig",
    "pretrain": "pipeline.pretrain:PretrainConfig",
    "finetune": "pipeline.finetune:FinetuneConfig",
}


def schema_for(folder: str) -> type:
    """The config dataclass for YAMLs under ``configs/<folder>/``."""
    if folder not in SCHEMAS:
        raise ConfigError(f"configs/{folder}: no schema registered in pipeline.config.SCHEMAS")
    module, name = SCHEMAS[folder].split(":")
    return getattr(importlib.import_module(module), name)


def _validate(obj: Any) -> None:
    """Run ``validate()`` on every nested config that defines one (value checks beyond types)."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        _validate(getattr(obj, f.name))
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Resolve ``schema`` defaults <- YAML file at ``path`` <- dotted ``key=value`` overrides.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types and invalid values.
    """
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        layers.append((str(path), OmegaConf.create(data)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        # `key=` means the empty string (from_dotlist would read it as null)
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item if value else f"{key}=''"])))
    merged = base
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or ""
            raise ConfigError(f"{origin}: invalid key {key!r}: {_first_line(e)}") from None
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"missing or invalid value for {key!r}: {_first_line(e)}") from None
    _validate(obj)
    return obj


def parse_config_args(argv: list[str] | None, prog: str, description: str, schema_name: str) -> tuple[str | None, list[str]]:
    """The command line every stage takes: ``[--config YAML] [key=value ...]`` -> (yaml path, overrides)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help=f"YAML delta over {schema_name}")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a resolved config (serialisable to JSON/YAML, W&B, checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(schema: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output (e.g. read back from a checkpoint), with checks."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid key {getattr(e, 'full_key', '')!r}: {_first_line(e)}") from None
    _validate(obj)
    return obj


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
