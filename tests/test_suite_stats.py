"""Suite statistics: loading per-image hits, bootstrap intervals (coverage, width), paired differences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import report
from pipeline.suite import stats


def _run(dataset, method, seed, base, new, sha=("b0", "n0")) -> stats.Run:
    hits = {"base": np.asarray(base, dtype=bool), "new": np.asarray(new, dtype=bool)}
    return stats.Run(dataset, method, seed, Path(f"/runs/{dataset}/{method}/seed_{seed}/results.json"),
                     {s: 100.0 * h.mean() for s, h in hits.items()}, hits, {"base": sha[0], "new": sha[1]})


def _table(runs) -> stats.RunTable:
    return stats.RunTable("mem", {(r.dataset, r.method, r.seed): r for r in runs})


def _bernoulli(rng, p, seeds, n, dataset="D", method="m"):
    return [_run(dataset, method, s, rng.random(n) < p, rng.random(n) < p) for s in range(1, seeds + 1)]


def _hits_str(h) -> str:
    return "".join("1" if x else "0" for x in h)


def _write(root, dataset, name, seed, base, new, hits=True, sha="s"):
    run = root / dataset / name / f"seed_{seed}"
    run.mkdir(parents=True)
    res = {"dataset": dataset, "method": name, "name": name, "seed": seed}
    for subset, h in (("base", base), ("new", new)):
        res[subset] = {"accuracy": 100.0 * sum(h) / len(h), "correct": sum(h), "total": len(h)}
        if hits:
            res[subset] |= {"hits": _hits_str(h), "items_sha": f"{sha}-{subset}"}
    (run / "results.json").write_text(json.dumps(res))
    return run / "results.json"


# ----------------------------------------------------------------------------------------------- loading


def test_load_reads_hits_and_refuses_runs_without_them_naming_the_file(tmp_path, capsys):
    _write(tmp_path, "D", "a", 1, [1, 0, 1, 1], [0, 0, 1])
    old = _write(tmp_path, "D", "b", 1, [1, 1, 1, 0], [1, 0, 1], hits=False)
    table = stats.load_runs(tmp_path)
    run = table.runs[("D", "a", 1)]
    assert run.hits["base"].tolist() == [True, False, True, True] and run.items_sha["new"] == "s-new"
    assert stats.method_summary(table, "a", B=50)["per_dataset"]["D"]["base"]["mean"] == 75.0
    with pytest.raises(stats.MissingHits, match=str(old)):
        stats.method_summary(table, "b", B=50)
    with pytest.raises(stats.MissingHits, match=str(old)):
        stats.paired_difference(table, "a", "b", B=50)


def test_hits_that_disagree_with_the_counts_are_skipped_and_named(tmp_path, capsys):
    path = _write(tmp_path, "D", "a", 1, [1, 0, 1, 1], [0, 0, 1])
    res = json.loads(path.read_text())
    res["base"]["hits"] = "101"  # one image short of total=4
    path.write_text(json.dumps(res))
    table = stats.load_runs(tmp_path)
    assert not table.runs and table.skipped[0][0] == str(path) and "total=4" in table.skipped[0][1]
    assert str(path) in capsys.readouterr().err


def test_two_results_for_one_run_are_an_error(tmp_path):
    _write(tmp_path / "x", "D", "a", 1, [1, 0], [0, 1])
    _write(tmp_path / "y", "D", "a", 1, [1, 1], [0, 1])
    with pytest.raises(stats.StatsError, match="two results"):
        stats.load_runs(tmp_path)


def test_seeds_of_one_method_on_other_images_are_refused():
    runs = [_run("D", "m", 1, [1, 0], [1, 0]), _run("D", "m", 2, [1, 0], [1, 0], sha=("other", "n0"))]
    with pytest.raises(stats.NotPairable, match="different base images"):
        stats.bootstrap(_table(runs), B=10)


# ------------------------------------------------------------------------------------------- intervals


def test_point_estimates_follow_the_report_aggregation():
    rng = np.random.default_rng(1)
    runs = _bernoulli(rng, 0.7, 3, 300, "D1") + _bernoulli(rng, 0.5, 3, 200, "D2")
    out = stats.method_summary(_table(runs), "m", B=100)
    rows = [{"dataset": r.dataset, "name": r.method, "seed": r.seed, **r.accuracy, "targets": {}} for r in runs]
    agg = report.aggregate(rows)
    for d in ("D1", "D2"):
        for key in ("base", "new", "hm"):
            assert out["per_dataset"][d][key]["mean"] == pytest.approx(agg["per_dataset"][(d, "m")][key])
    for key in ("base", "new", "hm"):
        assert out["average"][key]["mean"] == pytest.approx(agg["overall"]["m"][key])
        ci = out["average"][key]
        assert ci["low"] < ci["mean"] < ci["high"]


def test_interval_covers_the_true_accuracy_and_narrows_with_more_images():
    rng = np.random.default_rng(2024)
    covered, widths = 0, {400: [], 1600: []}
    for i in range(100):
        out = stats.method_summary(_table(_bernoulli(rng, 0.6, 5, 400)), "m", B=500, seed=i)
        ci = out["per_dataset"]["D"]["base"]
        covered += ci["low"] <= 60.0 <= ci["high"]
        widths[400].append(ci["high"] - ci["low"])
    for i in range(10):
        ci = stats.method_summary(_table(_bernoulli(rng, 0.6, 5, 1600)), "m", B=500, seed=i)["per_dataset"]["D"]["base"]
        widths[1600].append(ci["high"] - ci["low"])
    assert covered >= 90
    # 4x the images: about half the width (sampling error ~ 1/sqrt(images))
    assert np.mean(widths[1600]) < 0.6 * np.mean(widths[400])
    # and not absurdly wide: the binomial 95% half-width of 2000 hits is ~2.1 points
    assert 2.0 < np.mean(widths[400]) < 9.0


def test_deterministic_given_the_seed_and_independent_of_other_methods():
    rng = np.random.default_rng(3)
    runs = _bernoulli(rng, 0.6, 3, 200, method="m") + _bernoulli(rng, 0.7, 3, 200, method="other")
    alone = stats.method_summary(_table(runs[:3]), "m", B=300, seed=5)
    assert stats.method_summary(_table(runs), "m", B=300, seed=5) == alone
    assert stats.method_summary(_table(runs[:3]), "m", B=300, seed=6) != alone


# ---------------------------------------------------------------------------------------- paired tests


def test_a_method_against_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(4)
    runs = _bernoulli(rng, 0.6, 3, 300, "D1") + _bernoulli(rng, 0.5, 3, 300, "D2")
    twin = [stats.Run(r.dataset, "twin", r.seed, r.path, r.accuracy, r.hits, r.items_sha) for r in runs]
    out = stats.paired_difference(_table(runs + twin), "m", "twin", B=300)
    for part in (out["average"], *out["per_dataset"].values()):
        for key in ("base", "new", "hm"):
            d = part[key]
            assert (d["mean"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
            assert d["verdict"] == "not distinguishable from zero" and d["excluded"] == 0.0


def test_a_small_consistent_gain_is_detected_only_because_the_test_is_paired():
    rng = np.random.default_rng(5)
    n, flip = 1000, 25
    base_runs = _bernoulli(rng, 0.6, 3, n, method="b")
    better = []
    for r in base_runs:  # the same predictions except 25 more images right, in every seed: +2.5 points
        h = {s: v.copy() for s, v in r.hits.items()}
        for s in h:
            h[s][np.flatnonzero(~h[s])[:flip]] = True
        better.append(stats.Run(r.dataset, "a", r.seed, r.path, {}, h, r.items_sha))
    table = _table(base_runs + better)
    out = stats.paired_difference(table, "a", "b", B=1000)["average"]
    for key in ("base", "new", "hm"):
        d = out[key]
        assert d["mean"] == pytest.approx(2.5, abs=0.01) and d["low"] > 0 and d["low"] <= 2.5 <= d["high"]
        assert d["verdict"] == "distinguishable from zero" and d["excluded"] is None
    sa, sb = (stats.method_summary(table, m, B=1000)["average"]["hm"] for m in ("a", "b"))
    assert sa["low"] < sb["high"]  # the marginal intervals overlap: an unpaired comparison would miss it


def test_a_null_result_states_the_largest_effect_it_excludes():
    rng = np.random.default_rng(6)
    runs = _bernoulli(rng, 0.6, 3, 500, method="a") + _bernoulli(rng, 0.6, 3, 500, method="b")
    d = stats.paired_difference(_table(runs), "a", "b", B=500)["average"]["hm"]
    assert d["low"] < 0 < d["high"] and d["verdict"] == "not distinguishable from zero"
    assert d["excluded"] == max(-d["low"], d["high"])


def test_pairs_need_the_same_images_and_seeds():
    rng = np.random.default_rng(7)
    a = _bernoulli(rng, 0.6, 3, 50, method="a")
    b_other_images = [_run("D", "b", r.seed, r.hits["base"], r.hits["new"], sha=("b0", "other")) for r in a]
    with pytest.raises(stats.NotPairable, match="different new images"):
        stats.paired_difference(_table(a + b_other_images), "a", "b", B=20)
    b_two_seeds = _bernoulli(rng, 0.6, 2, 50, method="b")
    with pytest.raises(stats.NotPairable, match="different seeds"):
        stats.paired_difference(_table(a + b_two_seeds), "a", "b", B=20)


def test_the_average_is_over_shared_datasets_and_names_the_rest():
    rng = np.random.default_rng(8)
    runs = (_bernoulli(rng, 0.6, 2, 40, "D1", "a") + _bernoulli(rng, 0.6, 2, 40, "D2", "a")
            + _bernoulli(rng, 0.6, 2, 40, "D1", "b"))
    out = stats.paired_difference(_table(runs), "a", "b", B=20)
    assert out["average"]["datasets"] == ["D1"] and out["only_a"] == ["D2"] and out["only_b"] == []


def test_bootstrap_is_fast_enough_for_the_suite():
    import time

    rng = np.random.default_rng(9)
    runs = [r for m in range(15) for d in range(5) for r in _bernoulli(rng, 0.6, 3, 1000, f"D{d}", f"m{m}")]
    t0 = time.perf_counter()
    stats.bootstrap(_table(runs), B=2000)
    assert time.perf_counter() - t0 < 10.0  # one shot count; measured ~0.2 s on 2 shared cores
