"""Suite report: tables, paired comparisons, sentences from numbers, summary.json and figures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipeline.suite import plots, stats
from pipeline.suite.report import excluded_bound, suite_report


def _write(root, dataset, name, seed, base, new, sha="s"):
    run = root / dataset / name / f"seed_{seed}"
    run.mkdir(parents=True)
    res = {"dataset": dataset, "method": name, "name": name, "seed": seed}
    for subset, h in (("base", base), ("new", new)):
        res[subset] = {"accuracy": 100.0 * h.mean(), "correct": int(h.sum()), "total": int(h.size),
                       "hits": "".join("1" if x else "0" for x in h), "items_sha": f"{sha}-{dataset}-{subset}"}
    (run / "results.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Two shot counts, two datasets, three seeds: ``ref``, ``better`` (+4 points on the same predictions),
    ``noise`` (independent draws at the same accuracy) and ``other_images`` (another test set)."""
    rng = np.random.default_rng(0)
    roots = {}
    for label in ("4-shot", "8-shot"):
        root = roots[label] = tmp_path_factory.mktemp(label)
        for d, n in (("DatasetA", 300), ("DatasetB", 200)):
            for seed in (1, 2, 3):
                ref = {s: rng.random(n) < 0.6 for s in ("base", "new")}
                better = {s: h.copy() for s, h in ref.items()}
                for h in better.values():
                    h[np.flatnonzero(~h)[: n // 25]] = True
                _write(root, d, "ref", seed, ref["base"], ref["new"])
                _write(root, d, "better", seed, better["base"], better["new"])
                _write(root, d, "noise", seed, rng.random(n) < 0.6, rng.random(n) < 0.6)
                _write(root, d, "other_images", seed, ref["base"], ref["new"], sha="other")
    return roots


@pytest.fixture(scope="module")
def result(trees, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    families = {"Does it help?": ["ref", "better", "noise"], "Everything": [f"m{i}" for i in range(9)] + ["ref"]}
    res = suite_report(trees, out, pairs=[("better", "ref"), ("noise", "ref"), ("other_images", "ref"),
                                          ("absent", "ref")],
                       families=families, method_order=["ref", "better", "noise", "other_images", "absent"], B=300)
    return out, res


def test_every_file_is_written(result):
    out, res = result
    names = {p.rsplit("/", 1)[-1] for p in res["files"]}
    assert {"table.md", "paired.md", "summary.json", "forest_hm.png", "family_does_it_help.png",
            "family_everything_1.png", "family_everything_2.png"} <= names  # 10 methods: split in two
    for p in res["files"]:
        assert (out / p.rsplit("/", 1)[-1]).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["sentences"] == res["sentences"]


def test_tables_show_every_method_in_order_with_intervals(result):
    out, res = result
    md = (out / "table.md").read_text()
    assert md.count("## 4-shot") == 1 and md.count("## 8-shot") == 1
    section = md.split("## 8-shot")[1].split("### DatasetA")[0]
    assert [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ") and "[" in line] == \
        ["| ref", "| better", "| noise", "| other_images"]
    avg = res["shots"]["8-shot"]["summaries"]["better"]["average"]["hm"]
    assert f"{avg['mean']:.1f} [{avg['low']:.1f}, {avg['high']:.1f}]" in section
    assert "Methods not run: absent." in md and "(held-out images: base 300, new 300)" in md


def test_sentences_state_the_numbers_and_verdicts(result):
    _, res = result
    for label in ("4-shot", "8-shot"):
        pairs = {(p["a"], p["b"]): p for p in res["shots"][label]["pairs"]}
        gain = pairs[("better", "ref")]["average"]["hm"]
        assert gain["verdict"] == "distinguishable from zero" and gain["low"] > 0
        assert (f"{label}: better vs ref: HM {gain['mean']:+.1f} [{gain['low']:.1f}, {gain['high']:.1f}] — "
                f"distinguishable from zero (higher).") in res["sentences"]
        null = pairs[("noise", "ref")]["average"]["hm"]
        assert null["verdict"] == "not distinguishable from zero"
        x = excluded_bound(null)
        assert x >= max(-null["low"], null["high"]) and x - max(-null["low"], null["high"]) < 0.1
        assert any(s.startswith(f"{label}: noise vs ref: HM ") and s.endswith(
            f"not distinguishable from zero; an effect larger than {x:.1f} HM points is excluded.")
            for s in res["sentences"])
        reasons = {(f["a"], f["b"]): f["reason"] for f in res["shots"][label]["not_compared"]}
        assert "different base images" in reasons[("other_images", "ref")]
        assert "no runs of absent" in reasons[("absent", "ref")]
    numbers = [s for s in res["sentences"] if " HM " in s and "not compared" not in s]
    assert len(numbers) == 4 and all(re.search(r"HM [+-]\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]", s) for s in numbers)


def test_paired_markdown_has_each_pair_and_a_per_dataset_table(result):
    out, res = result
    md = (out / "paired.md").read_text()
    assert md.count("### better vs ref") == 2 and "| ΔHM |" in md and "| Pair | DatasetA | DatasetB |" in md
    d = res["shots"]["4-shot"]["pairs"][0]["per_dataset"]["DatasetA"]["hm"]
    assert f"{d['mean']:+.1f} [{d['low']:.1f}, {d['high']:.1f}]" in md
    assert "other_images vs ref: not compared" in md


def test_summary_numbers_match_the_statistics(trees, result):
    _, res = result
    table = stats.load_runs(trees["4-shot"])
    again = stats.method_summary(table, "noise", B=300, seed=0)
    assert res["shots"]["4-shot"]["summaries"]["noise"] == again


def test_a_panel_refuses_more_than_eight_methods(tmp_path, result):
    _, res = result
    summaries = {k: v["summaries"] for k, v in res["shots"].items()}
    with pytest.raises(ValueError, match="more than 8"):
        plots.plot_family(summaries, "too many", [f"m{i}" for i in range(9)], tmp_path / "x.png")
    assert plots.family_chunks([f"m{i}" for i in range(17)]) == [[f"m{i}" for i in range(j, min(j + 6, 17))]
                                                                 for j in (0, 6, 12)]
    assert plots.plot_family(summaries, "two", ["ref", "better"], tmp_path / "two.png").stat().st_size > 0
