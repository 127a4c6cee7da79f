"""Published base-to-new references: the data file's schema and the report's comparison table."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

from pipeline import report
from pipeline.config import ConfigError
from pipeline.data.datasets_meta import BASE_TO_NEW
from pipeline.evaluate import harmonic_mean

EXPECTED = {  # the papers' 11-dataset ViT-B/16 averages, as the issue asked them transcribed
    "CLIP (zero-shot)": (69.34, 74.22, 71.70), "CoOp": (82.69, 63.22, 71.66), "CoCoOp": (80.47, 71.69, 75.83),
    "MaPLe": (82.28, 75.14, 78.55), "PromptSRC": (84.26, 76.10, 79.97), "ProMetaR": (84.39, 76.93, 80.49),
}


def test_the_data_file_is_complete_and_consistent():
    data = report.load_references()  # validates the schema
    raw = json.loads(report.REFERENCES_FILE.read_text(encoding="utf-8"))
    assert "transcribed" in raw["note"] and "check" in raw["note"]
    assert set(raw["methods"]) == set(EXPECTED)
    for name, m in data["methods"].items():
        assert {"base", "new", "hm", "source", "backbone", "shots"} <= set(m)
        assert (m["base"], m["new"], m["hm"]) == EXPECTED[name]
        assert abs(harmonic_mean(m["base"], m["new"]) - m["hm"]) <= 0.01
        assert m["backbone"] == "ViT-B/16" and m["shots"] == 16
        assert all(m["source"][k] for k in ("paper", "venue", "table"))


def test_the_data_file_ships_with_the_package():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    line = re.search(r"\[tool\.setuptools\.package-data\]\s*\npipeline = \[(.*)\]", text).group(1)
    globs = re.findall(r'"([^"]+)"', line)
    rel = report.REFERENCES_FILE.relative_to(Path(report.__file__).parent).as_posix()
    assert any(fnmatch.fnmatch(rel, g) for g in globs)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(hm=75.0), "not the harmonic mean"),
    (lambda m: m.pop("source"), "'source' needs"),
    (lambda m: m.update(base="84"), "base='84' is not a number"),
])
def test_a_bad_entry_is_refused_naming_it(tmp_path, change, message):
    raw = json.loads(report.REFERENCES_FILE.read_text(encoding="utf-8"))
    change(raw["methods"]["CoOp"])
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"CoOp.*{message}"):
        report.load_references(path)


def _write(root, dataset, name, seed, base, new, k_shot=16):
    run = root / dataset / name / f"seed_{seed}"
    run.mkdir(parents=True)
    res = {"dataset": dataset, "name": name, "seed": seed, "k_shot": k_shot, "base": {"accuracy": base},
           "new": {"accuracy": new}, "config": {"model": {"backbone": "ViT-B/16"}}}
    (run / "results.json").write_text(json.dumps(res))


def test_report_puts_an_11_dataset_run_beside_the_published_averages(tmp_path):
    for i, d in enumerate(BASE_TO_NEW):
        _write(tmp_path, d, "mine", 1, 80.0 + i, 70.0)
    _write(tmp_path, "EuroSAT", "partial", 1, 50.0, 50.0)
    _write(tmp_path / "extra", "Other", "mine", 1, 0.0, 0.0)  # outside the 11: not in this run's 11-average
    assert report.main([str(tmp_path), "--references"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Published 11-dataset averages (ViT-B/16, 16 shots), beside this run's" in md
    assert "| mine (this run) | 85.00 | 70.00 | 76.77 | this run: 16 shots, ViT-B/16 |" in md
    assert "| ProMetaR | 84.39 | 76.93 | 80.49 | Prompt Learning via Meta-Regularization" in md
    assert "CVPR 2024, Table 1" in md and "Not shown (fewer than 11 base-to-new datasets): partial (1)." in md
    assert "not comparable" not in md


def test_report_without_the_11_datasets_says_the_published_table_is_not_comparable(tmp_path, capsys):
    _write(tmp_path, "EuroSAT", "mine", 1, 90.0, 60.0)
    _write(tmp_path, "DescribableTextures", "mine", 1, 80.0, 50.0)
    result = report.report(tmp_path, references=True)
    md = result["markdown"]
    assert "This run does not cover the 11 base-to-new datasets (the most complete method, mine, has 2 of them" in md
    assert "for reference only (not comparable with this run)" in md and "(this run)" not in md
    assert "| CoOp | 82.69 | 63.22 | 71.66 |" in md
    assert "Published" not in report.report(tmp_path)["markdown"]  # only when asked for
