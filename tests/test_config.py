"""Typed configs: defaults, YAML deltas, dotted overrides, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import SCHEMAS, schema_for
from pipeline.config import (
    ConfigError,
    ModelConfig,
    dump_yaml,
    from_dict,
    load_config,
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
