"""Report: protocol aggregation (published averages from their parts), markdown, CSV and plots from a run tree."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from pipeline import report
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
