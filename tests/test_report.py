"""Report: protocol aggregation (published averages from their parts), markdown, CSV and plots from a run tree."""

from __future__ import annotations

import csv
import json
import re
import statistics

import pytest

from pipeline import report
from pipeline.config import ConfigError
from pipeline.evaluate import harmonic_mean

# docs/ARCHITECTURE.md section 6: 11-dataset averages (base, new, HM), ViT-B/16.
PUBLISHED = {
    "zero-shot CLIP": (69.34, 74.22, 71.70), "CoOp": (82.69, 63.22, 71.66), "CoCoOp": (80.47, 71.69, 75.83),
    "IVLP": (84.21, 71.79, 77.51), "MaPLe": (82.28, 75.14, 78.55), "PromptSRC": (84.26, 76.10, 79.97),
    "ProMetaR": (84.39, 76.93, 80.49),
}


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_published_hm_is_the_hm_of_the_average_base_and_new(method):
    base, new, hm = PUBLISHED[method]
    assert round(harmonic_mean(base, new), 2) == hm


def test_overall_is_hm_of_dataset_means_not_mean_of_hms():
    base, new, hm = PUBLISHED["ProMetaR"]
    # 11 per-dataset (base, new) pairs spread around the published averages (deviations sum to zero)
    dev = [-6.0, 4.0, -2.5, 3.5, 1.0, -1.0, 0.5, -0.5, 2.0, -3.0, 2.0]
    parts = [(base + d, new - 2 * d) for d in dev]
    out = report.overall_average(parts)
    assert (round(out["base"], 2), round(out["new"], 2), round(out["hm"], 2)) == (base, new, hm)
    mean_of_hms = statistics.fmean(harmonic_mean(b, n) for b, n in parts)
    assert round(mean_of_hms, 2) != hm  # the protocol's order of operations matters


def _write(root, dataset, name, seed, base, new, targets=None):
    run = root / dataset / name / f"seed_{seed}"
    run.mkdir(parents=True)
    res = {"dataset": dataset, "method": name, "name": name, "seed": seed,
           "base": {"accuracy": base}, "new": {"accuracy": new}, "hm": harmonic_mean(base, new)}
    if targets:
        res["targets"] = {k: {"accuracy": v} for k, v in targets.items()}
    (run / "results.json").write_text(json.dumps(res))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": 0, "reg_step/task": 1 / s}) + "\n"
                                               for s in (1, 2, 3)))


def test_report_from_a_tree_of_runs(tmp_path):
    values = {("EuroSAT", "ivlp"): [(90, 60), (92, 64), (94, 62)], ("EuroSAT", "prometar"): [(91, 70), (93, 72), (92, 74)],
              ("DTD", "ivlp"): [(80, 50), (82, 52), (84, 54)], ("DTD", "prometar"): [(81, 60), (83, 62), (85, 64)]}
    for (dataset, name), pairs in values.items():
        for seed, (b, n) in enumerate(pairs, start=1):
            _write(tmp_path, dataset, name, seed, b, n, {"ImageNetV2": 60.0 + seed} if dataset == "DTD" else None)
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| EuroSAT | ivlp | 3 | 92.00 ± 2.00 | 62.00 ± 2.00 | 74.08 | - |" in md  # HM of the means
    # overall prometar: base mean (92 + 83) / 2 = 87.5, new (72 + 62) / 2 = 67 -> HM 75.89
    assert "| prometar | 2 | 87.50 | 67.00 | 75.89 |" in md
    assert "ImageNetV2" in md and "| 62.00 |" in md  # target mean over seeds
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert len(rows) == 6 and rows[-1]["dataset"] == "AVERAGE"
    row = next(r for r in rows if r["dataset"] == "DTD" and r["method"] == "prometar")
    assert float(row["base"]) == 83.0 and float(row["new_std"]) == 2.0 and row["seeds"] == "1 2 3"
    assert (tmp_path / "report_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "report_curves.png").stat().st_size > 1000


def test_report_without_runs_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        report.report(tmp_path)


# ----------------------------------------------------------------------------- malformed results.json
def _good_tree(root):
    for seed, (b, n) in enumerate([(90, 60), (92, 64)], start=1):
        _write(root, "EuroSAT", "ivlp", seed, b, n)


def _bad_file(root, content: bytes):
    run = root / "EuroSAT" / "ivlp" / "seed_9"
    run.mkdir(parents=True)
    (run / "results.json").write_bytes(content)
    return run / "results.json"


GOOD = {"dataset": "EuroSAT", "method": "ivlp", "name": "ivlp", "seed": 9, "base": {"accuracy": 1.0},
        "new": {"accuracy": 2.0}}


def _without(key):
    return {k: v for k, v in GOOD.items() if k != key}


MALFORMED = {
    "truncated_json": (json.dumps(GOOD)[:40].encode(), r"invalid JSON \(.* at line 1, column \d+\)"),
    "empty_file": (b"", r"invalid JSON"),
    "not_utf8": (b"\xff\xfe{}", r"not UTF-8 text"),
    "list_not_object": (b"[1, 2, 3]", r"top level is a JSON list, not an object"),
    "null": (b"null", r"top level is a JSON NoneType"),
    "missing_base": (json.dumps(_without("base")).encode(), r"missing key 'base' \(the run evaluated base, new\)"),
    "missing_new": (json.dumps(_without("new")).encode(), r"missing key 'new'"),
    "missing_dataset": (json.dumps(_without("dataset")).encode(), r"missing key 'dataset'"),
    "missing_seed": (json.dumps(_without("seed")).encode(), r"missing key 'seed'"),
    "missing_method": (json.dumps({k: v for k, v in GOOD.items() if k not in ("name", "method")}).encode(),
                       r"missing key 'name' or 'method'"),
    "base_without_accuracy": (json.dumps({**GOOD, "base": {}}).encode(), r"base has no 'accuracy'"),
    "base_not_object": (json.dumps({**GOOD, "base": 92.0}).encode(), r"base is float, not an object"),
    "accuracy_text": (json.dumps({**GOOD, "new": {"accuracy": "64"}}).encode(), r"new.accuracy='64' is not a finite"),
    "accuracy_nan": (json.dumps({**GOOD, "new": {"accuracy": float("nan")}}).encode(), r"new.accuracy=nan"),
    "seed_text": (json.dumps({**GOOD, "seed": "1"}).encode(), r"seed='1' is not an integer"),
    "target_without_accuracy": (json.dumps({**GOOD, "targets": {"ImageNetV2": {}}}).encode(),
                                r"targets.ImageNetV2 has no 'accuracy'"),
    "subset_of_its_config_missing": (json.dumps({**_without("new"), "config": {"eval": {"subsets": ["base", "all"]}}})
                                     .encode(), r"missing key 'all' \(the run evaluated base, all\)"),
}


@pytest.mark.parametrize("fault", sorted(MALFORMED))
def test_malformed_results_are_skipped_named_and_counted(tmp_path, capsys, fault):
    """A bad results.json next to good ones: skipped, named in a warning, counted on stdout and in report.md."""
    content, reason = MALFORMED[fault]
    _good_tree(tmp_path)
    bad = _bad_file(tmp_path, content)
    assert report.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    warning = [line for line in err.splitlines() if line.startswith("warning: results file skipped:")]
    assert len(warning) == 1 and re.search(re.escape(f"{bad}: ") + reason, warning[0]), err
    assert "report: 1 results file skipped:" in out and re.search(re.escape(f"report: {bad}: ") + reason, out), out
    md = (tmp_path / "report.md").read_text()
    assert "1 results file skipped:" in md and re.search(re.escape(f"- `{bad}`: ") + reason, md), md
    assert "| EuroSAT | ivlp | 2 | 91.00 ± 1.41 | 62.00 ± 2.83 |" in md  # the good runs only


def test_results_without_usable_files_fail_naming_them(tmp_path):
    """Only malformed files: an error (a ConfigError naming runs_root and every file), not an empty table."""
    bad = _bad_file(tmp_path, b'{"dataset": "EuroSAT", "se')
    with pytest.raises(ConfigError, match=r"no usable results.json under .*all 1 were skipped: " + re.escape(str(bad))):
        report.report(tmp_path)
    with pytest.raises(ConfigError, match=r"runs_root: .*nope is not a folder"):
        report.report(tmp_path / "nope")
    assert not (tmp_path / "report.md").exists()


def test_results_of_other_subsets_are_not_skipped(tmp_path, capsys):
    """Positive control: a run that evaluated only `all` (its config says so) or only targets is well formed."""
    _good_tree(tmp_path)
    run = tmp_path / "EuroSAT" / "zeroshot" / "seed_1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "dataset": "EuroSAT", "method": "zeroshot", "seed": 1, "all": {"accuracy": 50.0},
        "targets": {"DTD": {"accuracy": 40}}, "config": {"eval": {"subsets": ["all"]}}}))
    result = report.report(tmp_path)
    assert result["skipped"] == [] and result["runs"] == 3
    assert "| EuroSAT | zeroshot | 1 | - | - | - | 50.00 ± 0.00 |" in result["markdown"]
    assert "skipped" not in capsys.readouterr().err


def test_truncated_metrics_file_skips_only_its_curve(tmp_path, capsys):
    """A metrics.jsonl cut mid-line (a killed run) costs that run's curve, with a warning, not the report."""
    _good_tree(tmp_path)
    metrics = tmp_path / "EuroSAT" / "ivlp" / "seed_2" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "reg_st')
    result = report.report(tmp_path)
    assert result["runs"] == 2 and result["curves"]  # seed 1's curve is still drawn
    assert f"warning: training curve skipped: {metrics}: JSONDecodeError" in capsys.readouterr().err
