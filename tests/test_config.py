"""Typed configs: defaults, YAML deltas, dotted overrides, and errors that name the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.cli import SCHEMAS, schema_for
from pipeline.config import (
    ConfigError,
    ConfigLoader,
    ModelConfig,
    dump_yaml,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
YAMLS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_there_are_configs():
    assert YAMLS, "configs/ holds no YAML files"


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_yaml_loads(path):
    folder = path.relative_to(CONFIG_DIR).parts[0]
    assert folder in SCHEMAS, f"{path}: folder {folder!r} has no schema in pipeline.cli.SCHEMAS"
    schema = schema_for(folder)
    cfg = load_config(schema, path)
    # the resolved config survives a round trip through plain dicts (checkpoints, W&B)
    assert from_dict(schema, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(ModelConfig)
    assert cfg.prompts.type == "ivlp" and cfg.prompts.depth_text == 9 and cfg.prompts.init_words == "a photo of a"
    f = tmp_path / "x.yaml"
    f.write_text("prompts:\n  type: coop\n  n_ctx_text: 8\n")
    cfg = load_config(ModelConfig, f, ["prompts.n_ctx_text=16", "backbone.arch=tiny-vit"])
    assert (cfg.prompts.type, cfg.prompts.n_ctx_text, cfg.backbone.arch) == ("coop", 16, "tiny-vit")
    assert cfg.prompts.depth_vision == 9  # untouched default
    assert "n_ctx_text: 16" in dump_yaml(cfg)


def test_configs_are_frozen():
    cfg = load_config(ModelConfig)
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "yaml_text, overrides, key",
    [
        ("prompts:\n  n_ctx_txt: 4\n", [], "n_ctx_txt"),
        ("", ["prompts.deptht=3"], "deptht"),
        ("", ["backbone.nope=1"], "nope"),
        ("prompts:\n  depth_text: many\n", [], "depth_text"),
        ("", ["prompts.n_ctx_vision=1.5"], "n_ctx_vision"),
        ("", ["prompts.type=maple2"], "prompts.type"),
        ("", ["backbone.precision=fp8"], "backbone.precision"),
        ("", ["prompts.depth_vision=0"], "depth_vision"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, yaml_text, overrides, key):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, f, overrides)
    assert key in str(e.value)


def test_override_syntax_and_top_level(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ModelConfig, None, ["prompts.type"])
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ModelConfig, f)


def test_yaml_cannot_construct_objects(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception) as e:
        load_config(ModelConfig, f)
    assert "python/object" in str(e.value)


# ----------------------------------------------------------------------------- YAML syntax and duplicate keys
@pytest.mark.parametrize("text, where, problem", [
    ("prompts:\n  n_ctx_text: [2, 3\n  depth_text: 1\n", "line 3, column 13", r"expected ',' or '\]'"),
    ("prompts:\n\tn_ctx_text: 2\n", "line 2, column 1", r"found character '\\t'"),
    ("prompts:\n  type: coop\n seed: 2\n", "line 3, column 2", r"expected <block end>"),
    ("seed: 'one\n", "line 2, column 1", r"unexpected end of stream \(while scanning a quoted scalar at line 1"),
    ("seed: *nope\n", "line 1, column 7", r"found undefined alias 'nope'"),
])
def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, text, where, problem):
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, f)
    assert str(e.value).startswith(f"{f}: YAML syntax error at {where}: "), str(e.value)
    assert re.search(problem, str(e.value)), str(e.value)
    assert "python tags" not in str(e.value)  # the old message blamed a refused tag


@pytest.mark.parametrize("text, key, line, first", [
    ("seed: 1\nprompts:\n  type: coop\nseed: 2\n", "seed", 4, 1),  # top level
    ("prompts:\n  n_ctx_text: 4\n  depth_text: 2\n  n_ctx_text: 8\n", "n_ctx_text", 4, 2),  # nested
    ("prompts: {type: coop, type: vpt}\n", "type", 1, 1),  # flow mapping
    ("backbone:\n  arch: a\n'arch': b\nbackbone: {}\n", "backbone", 4, 1),  # quoting does not make it another key
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key, line, first):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(ModelConfig, f)
    assert f"{f}: duplicate key {key!r} at line {line} (first given at line {first})" in str(e.value)


def test_duplicate_keys_in_different_sections_and_merges_are_fine(tmp_path):
    """Positive controls: the same name in two sections, and a YAML merge overridden by an explicit key."""
    f = tmp_path / "ok.yaml"
    f.write_text("defaults: &d {n_ctx_text: 2, depth_text: 2}\n")
    assert read_yaml(f) == {"defaults": {"n_ctx_text": 2, "depth_text": 2}}
    f.write_text("base: &d {n_ctx_text: 2, depth_text: 2}\nprompts:\n  <<: *d\n  n_ctx_text: 6\n")
    assert read_yaml(f)["prompts"] == {"n_ctx_text": 6, "depth_text": 2}
    f.write_text("prompts:\n  type: coop\nbackbone:\n  arch: tiny-vit\nseed: 3\n")
    cfg = load_config(ModelConfig, f)
    assert (cfg.prompts.type, cfg.backbone.arch, cfg.seed) == ("coop", "tiny-vit", 3)


def test_config_loader_keeps_safe_load_semantics(tmp_path):
    """The loader is a SafeLoader: only the safe constructors, so python tags still build nothing."""
    assert issubclass(ConfigLoader, yaml.SafeLoader)
    assert not any("python" in tag for tag in ConfigLoader.yaml_constructors if tag)
    assert not any("python" in tag for tag in ConfigLoader.yaml_multi_constructors if tag)
    f = tmp_path / "evil.yaml"
    f.write_text("seed: !!python/name:os.system ''\n")
    with pytest.raises(ConfigError, match=r"not a plain-data YAML config .*python/name"):
        read_yaml(f)
