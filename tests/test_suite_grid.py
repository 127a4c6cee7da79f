"""The suite's grid runner: rows, presets and jobs are consistent; stage-2 jobs load as configs; the document
block writer; and (slow) the whole `ci` grid end to end, twice: the second call reuses every run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.finetune_config import load_finetune_config
from pipeline.suite import grid
from pipeline.suite.data import SuiteDataConfig

CONFIG = grid.CONFIGS / "finetune" / "suite.yaml"


def fake_info(tmp_path: Path) -> dict:
    names = ("SuiteGlyphsA", "SuiteDigits")
    return {"arch": "tiny-vit-suite", "backbone": str(tmp_path / "backbone.pt"),
            "datasets": {n: {"dataset": n, "root": str(tmp_path)} for n in names},
            "stage1": {"matched": "m/{000000..000001}.tar", "clean": "c/{000000..000001}.tar"}}


def test_presets_rows_pairs_and_families_are_consistent():
    for name, preset in grid.PRESETS.items():
        assert set(preset.rows) <= set(grid.ROWS), name
        assert len(set(preset.seeds)) == len(preset.seeds) >= 1 and all(k > 0 for k in preset.shots)
        for field in preset.data:  # a misspelt data field would otherwise only fail when the preset runs
            assert field in {f.name for f in dataclasses.fields(SuiteDataConfig)}, (name, field)
    for row in grid.ROWS.values():
        assert not row.stage1 or row.stage1 in grid.STAGE1
    for a, b in grid.PAIRS:
        assert a in grid.ROWS and b in grid.ROWS and a != b
    for question, methods in grid.FAMILIES.items():
        assert set(methods) <= set(grid.ROWS) and len(methods) <= 8, question
    # the full grid holds every row and the controls the issue asks for
    full = grid.PRESETS["full"]
    assert set(full.rows) == set(grid.ROWS) and len(full.seeds) >= 5 and len(full.shots) >= 2
    assert grid.stage1_needed(full.rows) == ["matched", "clean", "matched_inner0"]
    assert grid.stage1_needed(("zeroshot", "ivlp")) == []


def test_stage2_jobs_are_valid_configs_with_the_rows_settings(tmp_path):
    preset = dataclasses.replace(grid.PRESETS["full"], seeds=(1, 2), shots=(4,))
    info = fake_info(tmp_path)
    jobs = grid.stage2_jobs(tmp_path, info, preset, "val", ["SuiteDigits"])
    assert len(jobs) == len(preset.rows) * 2
    cfgs = [load_finetune_config(CONFIG, job.overrides) for job in jobs]
    for cfg in cfgs:
        cfg.validate()
        row = grid.ROWS[cfg.name]
        assert cfg.eval.split == "val" and cfg.model.backbone.pretrained == info["backbone"]
        assert cfg.run_dir.is_relative_to(tmp_path / "val" / "k4" / "SuiteDigits")
        if row.stage1:
            assert cfg.init == "artifact" and cfg.artifact == str(grid.artifact_of(tmp_path, row.stage1))
        else:
            assert cfg.init == "words" and not cfg.artifact
    assert len({c.run_dir for c in cfgs}) == len(jobs), "two jobs share a run folder"
    by_name = {c.name: c for c in cfgs}
    assert by_name["prometar_s1_frozen_reg"].init_parts == "prompts+frozen_regulator"
    assert by_name["prometar_s1_prompts"].init_parts == "prompts"
    assert by_name["ivlp"].regulator.kind == "none" and by_name["prometar"].meta.meta_step
    shots = grid.stage2_jobs(tmp_path, info, dataclasses.replace(preset, seeds=(1,), shots=(4, 8)), "test",
                             list(info["datasets"]))
    assert len(shots) == len(preset.rows) * 2 * 2 and len({tuple(j.overrides) for j in shots}) == len(shots)


def test_stage1_jobs_set_the_control(tmp_path):
    info = fake_info(tmp_path)
    jobs = {j.label: j for j in grid.stage1_jobs(tmp_path, info, grid.PRESETS["full"],
                                                 ["matched", "clean", "matched_inner0"])}
    assert "meta.inner_lr=0.0" in jobs["stage1 matched_inner0"].overrides
    assert "meta.inner_lr=0.0" not in jobs["stage1 matched"].overrides
    assert f"data.urls={info['stage1']['clean']}" in jobs["stage1 clean"].overrides
    assert any(o.startswith("data.urls=m/") for o in jobs["stage1 matched_inner0"].overrides)


def test_doc_block_replaces_only_its_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nprose before\n\n<!-- suite:demo-test -->\nold\n<!-- /suite:demo-test -->\n\nafter\n")
    grid.write_doc_block(doc, "demo-test", "new table\n")
    text = doc.read_text()
    assert "old" not in text and "new table" in text and "prose before" in text and text.endswith("after\n")
    grid.write_doc_block(doc, "demo-test", "new table\n")
    assert doc.read_text() == text  # idempotent
    grid.write_doc_block(doc, "full-test", "other\n")
    assert doc.read_text().startswith(text.rstrip("\n")) and "<!-- suite:full-test -->\nother\n" in doc.read_text()


@pytest.mark.slow  # trains a 1-epoch backbone and runs the tiny grid (~3 min on 2 cores); `make demo` in CI too
def test_ci_grid_end_to_end_and_resumable(tmp_path, monkeypatch):
    monkeypatch.chdir(grid.CONFIGS.parent)
    preset = grid.PRESETS["ci"]
    preset = dataclasses.replace(preset, data={**preset.data, "cache_dir": str(tmp_path / "cache")})
    res = grid.run_grid("ci", root=tmp_path / "runs", preset=preset)
    results = sorted((tmp_path / "runs" / "test").rglob("results.json"))
    assert len(results) == len(preset.rows) * len(preset.datasets) * len(preset.seeds) * len(preset.shots)
    summary = json.loads((Path(res["report"]) / "summary.json").read_text())
    assert summary["sentences"] and (Path(res["report"]) / "table.md").is_file()
    assert res["timings"]["stage2_reused"] == 0
    again = grid.run_grid("ci", root=tmp_path / "runs", preset=preset)
    assert again["timings"]["stage2_reused"] == again["timings"]["stage2_runs"] == len(results)
