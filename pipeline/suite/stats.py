"""Uncertainty of base-to-new results: bootstrap confidence intervals over seeds and test images.

A run's ``results.json`` holds, per subset, ``hits`` (one ``'0'``/``'1'`` per test image, in the loader's
order) and ``items_sha`` (which images, in which order, with which labels; see
:func:`pipeline.evaluation.items_fingerprint`). For one method on one dataset the hits of its seeds form a
``[seeds, images]`` matrix; accuracy is the mean over seeds of the per-seed accuracy, base/new/HM are
aggregated as :mod:`pipeline.report` does (HM of the mean base and mean new; the average over datasets is
the HM of the mean base and the mean new over datasets).

The bootstrap resamples both sources of variation: seeds (with replacement) and test images within each
subset (with replacement; one image resample per replicate, shared by all seeds). Resampling both axes
of a crossed seeds x images design counts the seed-by-image noise twice, so the intervals are, if
anything, conservative. Intervals are the 2.5 and 97.5 percentiles of ``B`` replicates.

Every resample is drawn from a stream keyed by ``(seed, dataset, subset, size)``: the interval of a
method does not depend on which other methods are bootstrapped alongside it, and two methods evaluated
on the same images with the same seed numbers get the *same* seed and image resamples, which makes
:func:`paired_difference` a paired bootstrap without extra bookkeeping.

The work is vectorised: a block of replicates' image resamples is a count matrix ``W`` ``[B, images]``,
and ``W @ hits.T`` gives every seed's resampled accuracy for every method at once.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.evaluation import RESULTS_FILE, MalformedResults, parse_results, read_results_json

SUBSETS = ("base", "new")
"""The class subsets the statistics cover."""
LEVEL = 0.95
"""Coverage of every interval."""
BLOCK = 256
"""Replicates per block of image-count matrices: bounds memory to BLOCK x images per subset. Part of the
random stream's layout, so changing it changes the resamples (not their distribution)."""


class StatsError(ConfigError):
    """The runs cannot give the statistic asked for; the message names the file or the mismatch."""


class MissingHits(StatsError):
    """A run has no per-image ``hits`` (written before they were recorded, or a malformed entry)."""


class NotPairable(StatsError):
    """Two groups of runs differ in seeds or test images, so they cannot be compared pair by pair."""


@dataclass(frozen=True)
class Run:
    """One ``results.json``: identity, per-subset accuracy and (when recorded) per-image hits."""

    dataset: str
    method: str
    seed: int
    path: Path
    accuracy: dict[str, float]
    hits: dict[str, np.ndarray] = field(default_factory=dict)
    """Subset -> bool ``[images]``; a subset without recorded hits is absent."""
    items_sha: dict[str, str] = field(default_factory=dict)


@dataclass
class RunTable:
    """The runs under a runs tree keyed by ``(dataset, method, seed)``, and the files that were skipped."""

    root: str
    runs: dict[tuple[str, str, int], Run]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def methods(self) -> list[str]:
        """Method names (the ``name`` label of the runs), sorted."""
        return sorted({m for _, m, _ in self.runs})

    def datasets(self, method: str | None = None) -> list[str]:
        """Datasets (of ``method`` when given), sorted."""
        return sorted({d for d, m, _ in self.runs if method is None or m == method})


@dataclass(frozen=True)
class Group:
    """One method on one dataset: hits as ``[seeds, images]`` per subset, seeds sorted."""

    dataset: str
    method: str
    seeds: tuple[int, ...]
    hits: dict[str, np.ndarray]
    items_sha: dict[str, str]
    paths: tuple[Path, ...]


@dataclass
class Replicates:
    """Point estimates and bootstrap replicates (accuracy in percent) per ``(dataset, method)``."""

    B: int
    seed: int
    groups: dict[tuple[str, str], Group]
    point: dict[tuple[str, str], dict[str, float]]
    reps: dict[tuple[str, str], dict[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------- loading


def parse_hits(value, where: str) -> tuple[np.ndarray, str] | None:
    """``(bool [images], items_sha)`` of one subset entry of ``results.json``; ``None`` without hits.

    :class:`MalformedResults` when the hits are not a ``0``/``1`` string agreeing with ``total`` and
    ``correct``, or the fingerprint is missing: such hits cannot be trusted image by image.
    """
    if not isinstance(value, dict) or "hits" not in value:
        return None
    hits, sha = value["hits"], value.get("items_sha")
    if not isinstance(hits, str) or not hits or hits.strip("01"):
        raise MalformedResults(f"{where}.hits is not a non-empty string of 0 and 1")
    if not isinstance(sha, str) or not sha:
        raise MalformedResults(f"{where}.items_sha is missing (hits cannot be paired without it)")
    arr = np.frombuffer(hits.encode("ascii"), dtype=np.uint8) == ord("1")
    if "total" in value and value["total"] != arr.size:
        raise MalformedResults(f"{where}.hits has {arr.size} images but total={value['total']!r}")
    if "correct" in value and value["correct"] != int(arr.sum()):
        raise MalformedResults(f"{where}.hits has {int(arr.sum())} hits but correct={value['correct']!r}")
    return arr, sha


def read_run(path: Path) -> Run:
    """One :class:`Run` from a ``results.json``; :class:`MalformedResults` says why it is unusable."""
    raw = read_results_json(path)  # the same reading and error messages as pipeline.report
    row = parse_results(raw)
    hits, shas = {}, {}
    for s in SUBSETS:
        parsed = parse_hits(raw.get(s), s)
        if parsed is not None:
            hits[s], shas[s] = parsed
    return Run(row["dataset"], row["name"], row["seed"], path, {s: row[s] for s in SUBSETS if s in row},
               hits, shas)


def load_runs(root: str | Path) -> RunTable:
    """Every ``results.json`` under ``root`` as a :class:`RunTable`.

    Unusable files are skipped with a warning line on stderr (as :mod:`pipeline.report` does) and listed
    in ``skipped``; two files for the same (dataset, method, seed) are an error, since either could be
    the one a table means.
    """
    if not Path(root).is_dir():
        raise StatsError(f"runs_root: {root} is not a folder")
    runs: dict[tuple[str, str, int], Run] = {}
    skipped = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        try:
            run = read_run(path)
        except MalformedResults as e:
            skipped.append((str(path), str(e)))
            print(f"warning: results file skipped: {path}: {e}", file=sys.stderr, flush=True)
            continue
        key = (run.dataset, run.method, run.seed)
        if key in runs:
            raise StatsError(f"two results for dataset={key[0]} method={key[1]} seed={key[2]}: "
                             f"{runs[key].path} and {path}")
        runs[key] = run
    return RunTable(str(root), runs, skipped)


def group(table: RunTable, dataset: str, method: str) -> Group:
    """The ``[seeds, images]`` hits of ``method`` on ``dataset``, base and new.

    :class:`MissingHits` names every run without per-image hits; :class:`NotPairable` when the seeds of
    the method evaluated different images (their ``items_sha`` differ).
    """
    runs = sorted((r for (d, m, _), r in table.runs.items() if d == dataset and m == method),
                  key=lambda r: r.seed)
    if not runs:
        raise StatsError(f"no runs of method {method} on dataset {dataset} under {table.root}")
    missing = [f"{r.path} ({'/'.join(s for s in SUBSETS if s not in r.hits)})"
               for r in runs if any(s not in r.hits for s in SUBSETS)]
    if missing:
        raise MissingHits(f"{method} on {dataset}: no per-image hits in {', '.join(missing)}; "
                          "re-evaluate these runs (python -m pipeline.evaluate) to record them")
    hits, shas = {}, {}
    for s in SUBSETS:
        found = {r.items_sha[s] for r in runs}
        if len(found) > 1 or len({r.hits[s].size for r in runs}) > 1:
            raise NotPairable(f"{method} on {dataset}: its seeds evaluated different {s} images "
                              f"(items_sha {sorted(found)}) in {', '.join(str(r.path) for r in runs)}")
        hits[s] = np.stack([r.hits[s] for r in runs])
        shas[s] = found.pop()
    return Group(dataset, method, tuple(r.seed for r in runs), hits, shas, tuple(r.path for r in runs))


# -------------------------------------------------------------------------------------------- bootstrap


def _rng(seed: int, *key) -> np.random.Generator:
    """A generator keyed by ``seed`` and ``key`` (stable across processes, unlike ``hash``)."""
    words = [zlib.crc32(str(k).encode("utf-8")) for k in key]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def _counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``[rows, n]`` multiplicities of ``n`` draws with replacement from ``n`` items, per row."""
    idx = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n)


def _image_blocks(seed: int, dataset: str, subset: str, n: int, B: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Image-resample count matrices ``float32 [block, n]`` for replicates ``0..B-1``, block by block."""
    rng = _rng(seed, "images", dataset, subset, n)
    for start in range(0, B, BLOCK):
        rows = min(BLOCK, B - start)
        yield slice(start, start + rows), _counts(rng, rows, n).astype(np.float32)  # exact below 2**24


def seed_counts(seed: int, dataset: str, n_seeds: int, B: int) -> np.ndarray:
    """``float64 [B, n_seeds]`` multiplicities of the seed resample of every replicate."""
    return _counts(_rng(seed, "seeds", dataset, n_seeds), B, n_seeds).astype(np.float64)


def _subset_replicates(groups: Sequence[Group], subset: str, B: int, seed: int) -> list[np.ndarray]:
    """Bootstrap accuracy (percent, ``[B]``) of each group on one dataset's ``subset``.

    Groups with the same number of images share each replicate's image resample; their hits are stacked
    so that one matrix product per block serves them all.
    """
    out: list[np.ndarray | None] = [None] * len(groups)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_size.setdefault(g.hits[subset].shape[1], []).append(i)
    for n, members in by_size.items():
        stacked = np.concatenate([groups[i].hits[subset] for i in members]).astype(np.float32).T  # [n, sum S]
        per_seed = np.empty((B, stacked.shape[1]))
        for rows, w in _image_blocks(seed, groups[members[0]].dataset, subset, n, B):
            per_seed[rows] = (w @ stacked).astype(np.float64) / n  # [block, sum S] resampled accuracies
        col = 0
        for i in members:
            s = len(groups[i].seeds)
            c = seed_counts(seed, groups[i].dataset, s, B)
            out[i] = 100.0 * (c * per_seed[:, col:col + s]).sum(1) / s
            col += s
    return out  # type: ignore[return-value]


def bootstrap(table: RunTable, methods: Sequence[str] | None = None, B: int = 2000, seed: int = 0,
              datasets: Sequence[str] | None = None) -> Replicates:
    """Point estimates and ``B`` bootstrap replicates of base and new accuracy for every (dataset, method).

    ``methods``/``datasets`` restrict the work (default: all in the table). Deterministic given ``seed``.
    """
    if B < 1:
        raise StatsError(f"B={B}: the bootstrap needs at least one replicate")
    methods = list(methods) if methods is not None else table.methods()
    datasets = list(datasets) if datasets is not None else table.datasets()
    groups = {(d, m): group(table, d, m) for d in datasets for m in methods if d in table.datasets(m)}
    point, reps = {}, {}
    for d in datasets:
        keys = [k for k in groups if k[0] == d]
        for s in SUBSETS:
            for k, r in zip(keys, _subset_replicates([groups[k] for k in keys], s, B, seed)):
                reps.setdefault(k, {})[s] = r
                point.setdefault(k, {})[s] = 100.0 * float(groups[k].hits[s].mean())
    return Replicates(B, seed, groups, point, reps)


# ------------------------------------------------------------------------------------------- statistics


def harmonic_mean(base, new):
    """HM = 2BN / (B + N), elementwise on arrays (0 where both are 0)."""
    base, new = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    total = base + new
    return np.divide(2 * base * new, total, out=np.zeros_like(total), where=total > 0)


def interval(point: float, reps: np.ndarray) -> dict:
    """``{"mean", "low", "high"}``: the point estimate and the percentile interval of ``reps``."""
    alpha = (1 - LEVEL) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return {"mean": float(point), "low": float(low), "high": float(high)}


def _metrics(point: dict[str, float], reps: dict[str, np.ndarray]) -> dict:
    """Base, new and HM intervals from point estimates and replicates of base and new."""
    return {"base": interval(point["base"], reps["base"]), "new": interval(point["new"], reps["new"]),
            "hm": interval(float(harmonic_mean(point["base"], point["new"])),
                           harmonic_mean(reps["base"], reps["new"]))}


def _average(parts: Sequence[tuple[dict, dict]]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean base and mean new over datasets, for the point estimates and replicate by replicate."""
    point = {s: float(np.mean([p[s] for p, _ in parts])) for s in SUBSETS}
    reps = {s: np.mean([r[s] for _, r in parts], axis=0) for s in SUBSETS}
    return point, reps


def _replicates(table: RunTable, methods: Sequence[str], B: int, seed: int,
                replicates: Replicates | None) -> Replicates:
    if replicates is None:
        return bootstrap(table, methods, B, seed)
    missing = [m for m in methods if not any(k[1] == m for k in replicates.groups)]
    if missing:
        raise StatsError(f"the replicates given hold no runs of {', '.join(missing)}")
    return replicates


def method_summary(table: RunTable, method: str, B: int = 2000, seed: int = 0,
                   replicates: Replicates | None = None) -> dict:
    """Base, new and HM of ``method`` with 95% bootstrap intervals, per dataset and averaged over datasets.

    Returns ``{"method", "B", "seed", "per_dataset": {dataset: {"seeds", "images", "base", "new", "hm"}},
    "average": {"datasets", "base", "new", "hm"}}``, each metric ``{"mean", "low", "high"}`` in percent.
    ``replicates`` (from :func:`bootstrap`) saves recomputing them for many summaries.
    """
    rep = _replicates(table, [method], B, seed, replicates)
    keys = sorted(k for k in rep.groups if k[1] == method)
    if not keys:
        raise StatsError(f"no runs of method {method} under {table.root}")
    per_dataset = {}
    for k in keys:
        g = rep.groups[k]
        per_dataset[k[0]] = {"seeds": list(g.seeds), "images": {s: int(g.hits[s].shape[1]) for s in SUBSETS},
                             **_metrics(rep.point[k], rep.reps[k])}
    point, reps = _average([(rep.point[k], rep.reps[k]) for k in keys])
    return {"method": method, "B": rep.B, "seed": rep.seed, "per_dataset": per_dataset,
            "average": {"datasets": [k[0] for k in keys], **_metrics(point, reps)}}


def verdict(low: float, high: float) -> str:
    """``distinguishable from zero`` when the interval excludes 0, else ``not distinguishable from zero``."""
    return "distinguishable from zero" if low > 0 or high < 0 else "not distinguishable from zero"


def difference(point: float, reps: np.ndarray) -> dict:
    """A paired difference: ``{"mean", "low", "high", "verdict", "excluded"}``.

    ``excluded`` (for a null result only, else ``None``) is X = max(|low|, |high|): an effect larger than
    X points either way lies outside the interval.
    """
    d = interval(point, reps)
    d["verdict"] = verdict(d["low"], d["high"])
    d["excluded"] = max(abs(d["low"]), abs(d["high"])) if d["verdict"].startswith("not") else None
    return d


def _check_pairable(ga: Group, gb: Group) -> None:
    if ga.seeds != gb.seeds:
        raise NotPairable(f"{ga.method} and {gb.method} on {ga.dataset} have different seeds "
                          f"({list(ga.seeds)} vs {list(gb.seeds)}); paired statistics need the same seed set")
    for s in SUBSETS:
        if ga.items_sha[s] != gb.items_sha[s]:
            raise NotPairable(f"{ga.method} and {gb.method} on {ga.dataset} evaluated different {s} images "
                              f"(items_sha {ga.items_sha[s]} vs {gb.items_sha[s]}: other images, order or "
                              f"labels); see {ga.paths[0]} and {gb.paths[0]}")


def paired_difference(table: RunTable, a: str, b: str, B: int = 2000, seed: int = 0,
                      replicates: Replicates | None = None) -> dict:
    """``a`` minus ``b`` in base, new and HM, per dataset and averaged over datasets, with a paired
    bootstrap 95% interval: both methods get the same seed resample (seeds paired by seed number) and
    the same test-image resample in every replicate.

    Both methods must have the same seed set and the same ``items_sha`` on every dataset they share
    (:class:`NotPairable` otherwise); the average is over the shared datasets (``datasets``), and those
    only one method has are listed in ``only_a``/``only_b``. Each difference is ``{"mean", "low",
    "high", "verdict", "excluded"}`` in percentage points (:func:`difference`).
    """
    rep = _replicates(table, [a, b], B, seed, replicates)
    da = {d for d, m in rep.groups if m == a}
    db = {d for d, m in rep.groups if m == b}
    shared = sorted(da & db)
    if not shared:
        raise StatsError(f"{a} and {b} share no dataset under {table.root}; nothing to compare")
    per_dataset, pa, pb = {}, [], []
    for d in shared:
        _check_pairable(rep.groups[(d, a)], rep.groups[(d, b)])
        pa.append((rep.point[(d, a)], rep.reps[(d, a)]))
        pb.append((rep.point[(d, b)], rep.reps[(d, b)]))
        per_dataset[d] = _differences(pa[-1], pb[-1])
    return {"a": a, "b": b, "B": rep.B, "seed": rep.seed, "per_dataset": per_dataset,
            "average": {"datasets": shared, **_differences(_average(pa), _average(pb))},
            "only_a": sorted(da - db), "only_b": sorted(db - da)}


def _differences(a: tuple[dict, dict], b: tuple[dict, dict]) -> dict:
    """Base, new and HM differences of two (point, replicates) pairs drawn with the same resamples."""
    (pa, ra), (pb, rb) = a, b
    out = {s: difference(pa[s] - pb[s], ra[s] - rb[s]) for s in SUBSETS}
    hm_a, hm_b = harmonic_mean(pa["base"], pa["new"]), harmonic_mean(pb["base"], pb["new"])
    out["hm"] = difference(float(hm_a - hm_b),
                           harmonic_mean(ra["base"], ra["new"]) - harmonic_mean(rb["base"], rb["new"]))
    return out
