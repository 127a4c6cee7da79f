"""Typed configuration: frozen dataclasses hold every default once; YAML files are small deltas.

A config is resolved in three layers, later ones winning:

1. the dataclass defaults (the docstring under each field says what it means),
2. a YAML file (safe YAML, :class:`ConfigLoader`; only the keys that differ from the defaults),
3. dotted ``key=value`` overrides from the command line (``prompts.n_ctx_text=8``).

OmegaConf's structured configs do the merging, so an unknown key, a wrong type or a missing
value fails *before* anything runs, with the offending key in the message. The result is converted
back into the frozen dataclasses, so code downstream gets plain typed Python objects, and
:func:`to_dict` turns it into a JSON/YAML-safe dict for checkpoints and trackers.

Configs are plain data, never code: YAML is read with a ``yaml.SafeLoader`` subclass (``!!python/...``
tags are refused, nothing is constructed; a key given twice in one mapping is refused too, naming the
key and both lines, where plain ``safe_load`` would silently keep the last value), and OmegaConf
interpolations and resolvers (``${oc.env:HOME}``, ``${any_registered_resolver:...}``) are refused before
OmegaConf sees them, so a config can neither run a registered function nor copy an environment variable
(a token) into checkpoints and W&B. A YAML syntax error names the file, the line and the column.

Files a config names (checkpoints, shards, clusters, datasets) are checked by each stage's
``preflight`` before anything starts, with the helpers of :mod:`pipeline.inputs`, so a typo costs
seconds, not a queued job.

On the command line a :class:`ConfigError` (and a checkpoint or artifact loading error) is one line
``error: ...`` on stderr with exit status 2, not a traceback: every entry point runs its ``main``
through :func:`run_main`; ``main(argv)`` called from Python still raises.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import sys
import typing
from collections.abc import Callable
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
    """Learnable prompts added to the frozen backbone (docs/ARCHITECTURE.md section 3)."""

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
    return _resolve(schema, user_layers(schema, path, overrides))


def user_layers(schema: type, path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The YAML file and each override as ``(origin, nested plain dict)``, checked against ``schema``.

    Checks everything that can be said without merging: the YAML is safe and a mapping, every key
    exists in ``schema`` (with a did-you-mean), sections get mappings, values are plain data without
    interpolations. Types of scalar values are left to OmegaConf's merge in :func:`load_config`.
    """
    layers = []
    if path is not None:
        layers.append((str(path), read_yaml(path)))
    for item in overrides:
        layers.append((f"override {item!r}", parse_override(item)))
    for origin, data in layers:
        check_layer(schema, data, origin)
    return layers


def _resolve(schema: type[T], layers: list[tuple[str, dict[str, Any]]]) -> T:
    merged = OmegaConf.structured(schema)
    for origin, data in layers:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or ""
            raise ConfigError(f"{origin}: invalid value for {key!r}: {_first_line(e)}") from None
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"missing or invalid value for {key!r}: {_first_line(e)}") from None
    _validate(obj)
    return obj


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"dotted.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping gives the same key twice (``safe_load`` would silently keep the last value)."""

    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r} at line {line} (first given at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys; otherwise exactly ``safe_load``'s semantics.

    Only the safe constructors are registered (the base class's), so ``!!python/...`` tags still raise
    a ``ConstructorError`` and nothing is built. Keys brought in by a YAML merge (``<<: *base``) may be
    overridden by explicit keys, as YAML specifies; only explicit keys are compared.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class raises its own error for it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(stream) -> Any:
    """``safe_load`` with :class:`ConfigLoader` (what ``yaml.safe_load`` does, with our loader)."""
    loader = ConfigLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a plain dict, read with :class:`ConfigLoader` (safe; Python tags are refused,
    never executed; duplicate keys are refused). Every failure is a :class:`ConfigError` naming the file:
    syntax errors with their line and column, duplicate keys with the key and both lines."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path}: " + ("not a file" if p.exists() else "no such file"))
    try:
        with open(p, encoding="utf-8") as f:
            data = _yaml_load(f)
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}; each key may appear once per section") from None
    except yaml.constructor.ConstructorError as e:
        # an unknown tag, e.g. `!!python/...`: refused before anything was built
        raise ConfigError(f"{path}: not a plain-data YAML config (only safe YAML is read; python tags are "
                          f"refused and nothing was executed): {' '.join(str(e).split())}") from None
    except yaml.MarkedYAMLError as e:  # scanner, parser and composer errors: the text is not valid YAML
        where = _mark(e.problem_mark) if e.problem_mark is not None else "an unknown position"
        context = f" ({e.context} at {_mark(e.context_mark)})" if e.context and e.context_mark is not None else ""
        raise ConfigError(f"{path}: YAML syntax error at {where}: {e.problem}{context}") from None
    except yaml.YAMLError as e:  # e.g. a control character the reader refuses
        raise ConfigError(f"{path}: not a readable YAML file: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from None
    if data is None:  # an empty file is an empty delta
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> dict[str, Any]:
    """One dotted ``key=value`` override as a nested plain dict (the value is parsed as YAML, safely)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    if not key or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key such as optim.lr")
    try:
        # `key=` means the empty string (from_dotlist would read it as null); OmegaConf parses the value
        # with its SafeLoader subclass, so `!!python/...` tags raise instead of constructing anything
        layer = OmegaConf.from_dotlist([item if value else f"{key}=''"])
        return OmegaConf.to_container(layer, resolve=False)  # interpolations stay text; checked next
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"override {item!r}: {' '.join(str(e).split())}") from None


MAX_CONFIG_VALUES = 100_000
"""A config with more values than this is refused (YAML aliases can expand a small file enormously)."""
_PLAIN = (str, bool, int, float, type(None))


def check_layer(schema: type, data: dict[str, Any], origin: str) -> None:
    """Check one user layer against ``schema``; raises :class:`ConfigError` naming the key.

    Unknown keys (with a did-you-mean or the valid keys), a scalar where a section is expected, values
    YAML read as something other than plain data (dates, binary, sets), OmegaConf interpolations and
    resolvers (``${...}``), OmegaConf's missing marker ``???`` (a merge would silently skip it) and
    alias bombs.
    """
    if _expanded_size(data, {}) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{origin}: expands to more than {MAX_CONFIG_VALUES} values (YAML aliases?); refused")
    _check_section(schema, data, origin, "")


def _check_section(schema: type, data: dict, origin: str, prefix: str) -> None:
    hints = _field_types(schema)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(f"{origin}: key {dotted!r} is of type {type(key).__name__}, not a name (quote it in YAML)")
        if key not in hints:
            raise ConfigError(f"{origin}: unknown key {dotted!r}{_suggest(key, list(hints), prefix)}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {dotted!r} is a section ({kind.__name__}) and needs a mapping of "
                                  f"its keys, got {type(value).__name__} {value!r}")
            _check_section(kind, value, origin, f"{dotted}.")
        else:
            _check_value(value, origin, dotted)


def _check_value(value: Any, origin: str, key: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_value(v, origin, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_value(v, origin, f"{key}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ConfigError(f"{origin}: {key}: YAML read {value!r} as {type(value).__name__}, which is not a config "
                          "value (quote it if it is text)")
    elif isinstance(value, str) and "${" in value:
        raise ConfigError(f"{origin}: {key}={value!r}: interpolations and resolvers (${{...}}) are not allowed; "
                          "configs are plain data (write the value itself)")
    elif isinstance(value, str) and value == "???":
        raise ConfigError(f"{origin}: {key}='???': give a value (OmegaConf's missing marker is not one)")


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """Number of values once YAML aliases are expanded; linear in the distinct nodes (memo by id).

    A container that contains itself (``a: &a [*a]``) expands without end: it counts as too many.
    """
    if not isinstance(value, dict | list):
        return 1
    if id(value) not in memo:
        memo[id(value)] = MAX_CONFIG_VALUES + 1  # seen again while still being counted: a cycle
        items = value.values() if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(_expanded_size(v, memo) for v in items)
    return memo[id(value)]


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    """Field name -> resolved type of a config dataclass (the annotations are strings under PEP 563)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix + close[0]!r}?)"
    where = f"under {prefix[:-1]!r}" if prefix else "at the top level"
    return f" (valid keys {where}: {', '.join(valid)})"


def parse_config_args(argv: list[str] | None, prog: str, description: str, schema_name: str) -> tuple[str | None, list[str]]:
    """The command line every stage takes: ``[--config YAML] [key=value ...]`` -> (yaml path, overrides)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help=f"YAML delta over {schema_name}")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


USER_ERRORS = ("pipeline.config.ConfigError", "pipeline.checkpoint.CheckpointError")
"""Exception classes (by qualified name, subclasses included) that :func:`run_main` reports as one line.
By name because this module is layer 0 and may not import :mod:`pipeline.checkpoint` (layer 1)."""
USER_VALUE_ERRORS = ("incompatible artifact:",)
"""Prefixes of ``ValueError`` messages that are user errors too: an artifact that does not fit the run
(``pipeline.checkpoint.check_compatible``, ``pipeline.finetune_loop.init_from_artifact``)."""
TRACEBACK_ENV = "PIPELINE_TRACEBACK"
"""Set to ``1`` to get the full traceback of a user error from :func:`run_main` (for bug reports)."""


def is_user_error(exc: BaseException) -> bool:
    """True when ``exc`` says what the user must fix (a config, a path, an artifact), not a bug: a
    :class:`ConfigError`, a checkpoint/artifact loading error, or an incompatible artifact."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}
    if names & set(USER_ERRORS):
        return True
    return type(exc) is ValueError and str(exc).startswith(USER_VALUE_ERRORS)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run an entry point's ``main(argv)`` as a command: a user error (:func:`is_user_error`) becomes
    one line ``error: <message>`` on stderr and exit status 2 instead of a Python traceback.

    For ``if __name__ == "__main__": sys.exit(run_main(main))`` blocks and ``pipeline <command>``;
    ``main(argv)`` called from Python still raises. Any other exception is a bug and keeps its
    traceback; so does a user error when the environment sets ``PIPELINE_TRACEBACK=1``.
    """
    try:
        return int(main(argv) or 0)
    except Exception as e:
        if not is_user_error(e) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a resolved config (serialisable to JSON/YAML, W&B, checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(schema: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from :func:`to_dict` output (e.g. read back from a checkpoint), with checks."""
    if not isinstance(data, dict):
        raise ConfigError(f"stored config must be a mapping, got {type(data).__name__}")
    check_layer(schema, data, "stored config")
    return _resolve(schema, [("stored config", data)])


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
