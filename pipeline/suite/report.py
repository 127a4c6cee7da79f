"""The suite's report: base/new/HM with 95% bootstrap intervals, paired comparisons, figures and sentences.

:func:`suite_report` takes one runs tree per shot count (``{"8-shot": Path(...)}``) and writes into
``out_dir``:

- ``table.md``: per shot count, a table for the average over datasets and one per dataset; rows are
  methods, cells ``mean [low, high]`` (95% interval over seeds and test images, :mod:`pipeline.suite.stats`).
- ``paired.md``: per shot count and pair ``a vs b``: ΔBase, ΔNew, ΔHM (a − b) on the average over datasets
  with the paired interval and its verdict, and a compact per-dataset ΔHM table.
- ``summary.json``: every number, machine-readable.
- ``family_<question>.png`` per family of methods and ``forest_hm.png`` (:mod:`pipeline.suite.plots`).

Every statement in ``sentences`` is generated from the numbers, never typed by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.fileio import atomic_write_json, atomic_write_text
from pipeline.suite import plots, stats

NULL = "not distinguishable from zero"


def _num(x: float, sign: str = "") -> str:
    """``x`` with 1 decimal, or 2-3 when 1 would show a nonzero bound as 0.0 (whose side of zero decides
    the verdict)."""
    for digits in (1, 2, 3):
        text = f"{x:{sign}.{digits}f}"
        if x == 0 or float(text) != 0:
            break
    return text


def _ci(c: dict) -> str:
    """``mean [low, high]`` with 1 decimal."""
    return f"{c['mean']:.1f} [{c['low']:.1f}, {c['high']:.1f}]"


def _delta(d: dict) -> str:
    """``+mean [low, high]`` with 1 decimal (more for a bound next to zero, see :func:`_num`)."""
    return f"{_num(d['mean'], '+')} [{_num(d['low'])}, {_num(d['high'])}]"


def excluded_bound(d: dict) -> float:
    """The excluded effect X of a null result, rounded *up* to 0.1 so the printed claim is never stronger
    than the interval supports."""
    return math.ceil(round(d["excluded"] * 10, 9)) / 10


def in_words(d: dict, unit: str = "points") -> str:
    """The verdict of a paired difference in words, with the largest effect it excludes when null."""
    if d["verdict"] == NULL:
        return f"{NULL}; an effect larger than {excluded_bound(d):.1f} {unit} is excluded"
    return f"{d['verdict']} ({'higher' if d['mean'] > 0 else 'lower'})"


def pair_sentences(label: str, p: dict) -> list[str]:
    """Plain-language statements of one paired comparison (average over its datasets)."""
    avg, head = p["average"], f"{label}: {p['a']} vs {p['b']}"
    where = f" (over {len(avg['datasets'])} shared datasets)" if p["only_a"] or p["only_b"] else ""
    return [f"{head}: HM {_delta(avg['hm'])}{where} — {in_words(avg['hm'], 'HM points')}.",
            f"{head}: base {_delta(avg['base'])} ({avg['base']['verdict']}), "
            f"new {_delta(avg['new'])} ({avg['new']['verdict']})."]


def _method_table(rows: list[tuple[str, dict, str]]) -> list[str]:
    """Markdown rows ``| method | seeds | base | new | HM |``."""
    out = ["| Method | Seeds | Base | New | HM |", "|---|---|---|---|---|"]
    out += [f"| {m} | {seeds} | {_ci(c['base'])} | {_ci(c['new'])} | {_ci(c['hm'])} |" for m, c, seeds in rows]
    return out


def table_markdown(label: str, summaries: Mapping[str, dict], datasets: Sequence[str]) -> list[str]:
    """The ``table.md`` section of one shot count: the average over datasets, then each dataset."""
    lines = [f"## {label}", ""]
    avg_rows = []
    for m, s in summaries.items():
        seeds = sorted({len(v["seeds"]) for v in s["per_dataset"].values()})
        note = "" if len(s["average"]["datasets"]) == len(datasets) else f" ({len(s['average']['datasets'])} datasets)"
        avg_rows.append((m + note, s["average"], "/".join(map(str, seeds))))
    lines += [f"### Average over datasets ({', '.join(datasets)})", "", *_method_table(avg_rows), ""]
    for d in datasets:
        rows = [(m, s["per_dataset"][d], str(len(s["per_dataset"][d]["seeds"])))
                for m, s in summaries.items() if d in s["per_dataset"]]
        images = next(iter(s["per_dataset"][d]["images"] for s in summaries.values() if d in s["per_dataset"]))
        lines += [f"### {d} (held-out images: base {images['base']}, new {images['new']})", "",
                  *_method_table(rows), ""]
    return lines


def paired_markdown(label: str, pairs: Sequence[dict], failed: Sequence[dict]) -> list[str]:
    """The ``paired.md`` section of one shot count."""
    lines = [f"## {label}", ""]
    for p in pairs:
        avg = p["average"]
        lines += [f"### {p['a']} vs {p['b']} ({p['a']} − {p['b']}, average over {len(avg['datasets'])} datasets)",
                  "", "| | Δ [95% CI] | Verdict |", "|---|---|---|"]
        lines += [f"| {name} | {_delta(avg[key])} | {in_words(avg[key])} |"
                  for key, name in (("base", "ΔBase"), ("new", "ΔNew"), ("hm", "ΔHM"))]
        if p["only_a"] or p["only_b"]:
            lines += ["", f"Datasets of only one method, not in the average: {', '.join(p['only_a'] + p['only_b'])}."]
        lines.append("")
    if pairs:
        datasets = sorted({d for p in pairs for d in p["per_dataset"]})
        lines += ["Per-dataset ΔHM [95% CI] (* distinguishable from zero):", "",
                  "| Pair | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        for p in pairs:
            cells = [(_delta(p["per_dataset"][d]["hm"]) + ("*" if p["per_dataset"][d]["hm"]["verdict"] != NULL else ""))
                     if d in p["per_dataset"] else "-" for d in datasets]
            lines.append(f"| {p['a']} vs {p['b']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {f['a']} vs {f['b']}: not compared — {f['reason']}" for f in failed]
    return lines + ([""] if failed else [])


def _shot_report(label: str, root: Path, pairs: Sequence[tuple[str, str]], method_order: Sequence[str],
                 B: int, seed: int) -> dict:
    """Summaries and paired differences of one runs tree."""
    table = stats.load_runs(root)
    present = table.methods()
    methods = [m for m in method_order if m in present]
    rep = stats.bootstrap(table, methods, B, seed)
    summaries = {m: stats.method_summary(table, m, replicates=rep) for m in methods}
    done, failed = [], []
    for a, b in pairs:
        absent = [m for m in (a, b) if m not in methods]
        if absent:
            failed.append({"a": a, "b": b, "reason": f"no runs of {', '.join(absent)} under {root}"
                           + (" (or not in method_order)" if any(m in present for m in absent) else "")})
            continue
        try:
            done.append(stats.paired_difference(table, a, b, replicates=rep))
        except stats.NotPairable as e:  # the rest of the report stays valid; the reason is printed
            failed.append({"a": a, "b": b, "reason": str(e)})
    return {"label": label, "root": str(root), "methods": methods, "datasets": table.datasets(),
            "not_run": [m for m in method_order if m not in present],
            "not_in_order": [m for m in present if m not in method_order],
            "skipped_files": table.skipped, "summaries": summaries, "pairs": done, "not_compared": failed}


def suite_report(run_roots: Mapping[str, str | Path], out_dir: str | Path, pairs: Sequence[tuple[str, str]],
                 families: Mapping[str, Sequence[str]], method_order: Sequence[str], B: int = 2000,
                 seed: int = 0) -> dict:
    """Write ``table.md``, ``paired.md``, ``summary.json`` and the figures for the runs trees
    ``run_roots`` (shot-count label -> runs root) into ``out_dir``; returns what ``summary.json`` holds,
    including ``sentences`` (plain-language statements of every comparison) and ``files``.

    Rows follow ``method_order`` (methods of a tree not in it are listed, not shown); ``pairs`` are
    ``(a, b)`` comparisons of a − b; ``families`` map a figure's question to its methods. A pair whose
    runs are not pairable (other seeds or test images) is listed under ``not_compared`` with the reason.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = {label: _shot_report(label, Path(root), pairs, method_order, B, seed) for label, root in run_roots.items()}
    intro = (f"Mean over seeds with a 95% bootstrap interval [low, high] over seeds and held-out images "
             f"(B={B} replicates, seed={seed}); HM is the harmonic mean of the mean base and mean new, the "
             "average over datasets the HM of the mean base and mean new over datasets.")
    table_md, paired_md, sentences = ["# Base-to-new accuracy", "", intro, ""], ["# Paired comparisons", "",
        "Δ = first − second method in percentage points, with a paired 95% bootstrap interval (the same "
        "seed and test-image resamples for both); a difference is distinguishable from zero when the "
        "interval excludes 0. Each interval covers one comparison on its own (no correction for making many): "
        "among 20 comparisons with no true difference, about one is expected to exclude 0 by chance.", ""], []
    for label, r in shots.items():
        table_md += table_markdown(label, r["summaries"], r["datasets"])
        for what, names in (("not run", r["not_run"]), ("not in method_order", r["not_in_order"])):
            if names:
                table_md += [f"Methods {what}: {', '.join(names)}.", ""]
        if r["skipped_files"]:
            table_md += [f"{len(r['skipped_files'])} results files skipped: "
                         + "; ".join(f"{p}: {why}" for p, why in r["skipped_files"]), ""]
        paired_md += paired_markdown(label, r["pairs"], r["not_compared"])
        for p in r["pairs"]:
            sentences += pair_sentences(label, p)
        sentences += [f"{label}: {f['a']} vs {f['b']}: not compared — {f['reason']}" for f in r["not_compared"]]
    files = [atomic_write_text(out / "table.md", "\n".join(table_md) + "\n"),
             atomic_write_text(out / "paired.md", "\n".join(paired_md) + "\n")]
    summaries = {label: r["summaries"] for label, r in shots.items()}
    files += plots.plot_families(summaries, families, out)
    files.append(plots.plot_forest({label: r["pairs"] for label, r in shots.items()}, out / "forest_hm.png"))
    result = {"B": B, "seed": seed, "level": stats.LEVEL, "method_order": list(method_order),
              "families": {k: list(v) for k, v in families.items()}, "shots": shots, "sentences": sentences,
              "files": [str(f) for f in files] + [str(out / "summary.json")]}
    atomic_write_json(out / "summary.json", result)
    return result
