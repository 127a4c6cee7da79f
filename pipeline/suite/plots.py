"""Figures of the suite report: one per question (a family of methods) and a forest plot of paired ΔHM.

A family figure has one row of panels per shot count and one column per metric (HM, base, new); in each
panel the average over datasets and every dataset are rows, each method a coloured point with its 95%
interval as whiskers. The x axis is zoomed to the intervals (not drawn from 0), so differences of a point
stay visible; the legend sits below the panels, outside the plotting area. A panel holds at most
:data:`MAX_SERIES` methods: :func:`plot_family` refuses more and :func:`plot_families` splits a larger
family into several figures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.fileio import atomic_write

MAX_SERIES = 8
"""Most methods in one panel: beyond this colours and offsets stop being readable."""
METRICS = (("hm", "HM"), ("base", "Base"), ("new", "New"))
AVERAGE = "Average"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    """A file-name-safe lower-case form of ``text`` (``Does stage 1 help?`` -> ``does_stage_1_help``)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "figure"


def _zoom(ax, lows: Sequence[float], highs: Sequence[float]) -> None:
    """x limits around the intervals with a margin, instead of from 0."""
    lo, hi = min(lows), max(highs)
    pad = max(0.5, 0.08 * (hi - lo))
    ax.set_xlim(lo - pad, hi + pad)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def plot_family(summaries: Mapping[str, Mapping[str, dict]], title: str, methods: Sequence[str],
                path: str | Path) -> Path:
    """One figure for one question: ``summaries[label][method]`` (from
    :func:`pipeline.suite.stats.method_summary`) of ``methods``, one row of panels per shot-count label.

    Methods missing at a shot count are left out of its row. :class:`ValueError` for more than
    :data:`MAX_SERIES` methods (use :func:`plot_families` to split).
    """
    if len(methods) > MAX_SERIES:
        raise ValueError(f"figure {title!r}: {len(methods)} methods, more than {MAX_SERIES} per panel; split it")
    plt = _pyplot()
    labels = list(summaries)
    datasets = sorted({d for by_m in summaries.values() for m in methods if m in by_m
                       for d in by_m[m]["per_dataset"]})
    rows = [AVERAGE, *datasets]
    colours = plt.get_cmap("tab10").colors
    panel_height = 1.0 + 0.12 * len(rows) * max(2, len(methods))  # ~0.12 inch per point drawn
    fig, axes = plt.subplots(len(labels), len(METRICS), squeeze=False,
                             figsize=(4.2 * len(METRICS), 0.9 + panel_height * len(labels)))
    step = 0.8 / max(1, len(methods))
    for i, label in enumerate(labels):
        present = [m for m in methods if m in summaries[label]]
        for j, (key, name) in enumerate(METRICS):
            ax, lows, highs = axes[i][j], [], []
            for k, m in enumerate(present):
                s = summaries[label][m]
                parts = {AVERAGE: s["average"], **s["per_dataset"]}
                ys, xs, err = [], [], [[], []]
                for r, row in enumerate(rows):
                    if row in parts:
                        ci = parts[row][key]
                        ys.append(r + (k - (len(methods) - 1) / 2) * step)
                        xs.append(ci["mean"])
                        err[0].append(ci["mean"] - ci["low"])
                        err[1].append(ci["high"] - ci["mean"])
                        lows.append(ci["low"])
                        highs.append(ci["high"])
                ax.errorbar(xs, ys, xerr=err, fmt="o", ms=4, capsize=2, lw=1.2,
                            color=colours[methods.index(m) % len(colours)], label=m)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_ylim(len(rows) - 0.5, -0.5)  # average on top
            ax.axhline(0.5, color="0.8", lw=0.8)
            ax.grid(axis="x", color="0.9")
            if lows:
                _zoom(ax, lows, highs)
            ax.set_title(f"{label}: {name}", fontsize=10)
            ax.set_xlabel("accuracy (%), 95% CI" if key != "hm" else "HM (%), 95% CI", fontsize=8)
    handles, names = [], []
    for ax in axes.flat:  # one legend entry per method, whichever panel drew it first
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.suptitle(title, fontsize=12)
    # marginal intervals: overlap is not evidence of no difference, which only the paired test can judge
    fig.text(0.5, 0.955, "each method's own 95% interval; compare methods with the paired differences "
             "(paired.md, forest_hm.png)", ha="center", va="top", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.06, 1, 0.94))
    fig.legend(handles, names, loc="lower center", ncol=max(1, len(names)), fontsize=8,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    return _save(fig, Path(path))


def family_chunks(methods: Sequence[str], max_series: int = MAX_SERIES) -> list[list[str]]:
    """``methods`` in consecutive groups of at most ``max_series``, as even in size as possible."""
    n = max(1, -(-len(methods) // max_series))
    size = -(-len(methods) // n)
    return [list(methods[i:i + size]) for i in range(0, len(methods), size)]


def plot_families(summaries: Mapping[str, Mapping[str, dict]], families: Mapping[str, Sequence[str]],
                  out_dir: str | Path) -> list[Path]:
    """``family_<slug>.png`` per family (``title -> methods``); a family of more than :data:`MAX_SERIES`
    methods becomes ``family_<slug>_1.png``, ``_2``, ... titled ``(part i of n)``."""
    paths = []
    for title, methods in families.items():
        chunks = family_chunks(methods)
        for i, chunk in enumerate(chunks, start=1):
            name = f"family_{slug(title)}" + (f"_{i}" if len(chunks) > 1 else "")
            shown = title + (f" (part {i} of {len(chunks)})" if len(chunks) > 1 else "")
            paths.append(plot_family(summaries, shown, chunk, Path(out_dir) / f"{name}.png"))
    return paths


def plot_forest(pairs: Mapping[str, Sequence[dict]], path: str | Path, key: str = "hm") -> Path:
    """Forest plot of the paired difference ``key`` (average over datasets) of every pair, one panel per
    shot-count label; ``pairs[label]`` holds :func:`pipeline.suite.stats.paired_difference` results.
    A vertical line marks 0; filled points are distinguishable from zero, open ones are not."""
    plt = _pyplot()
    labels = list(pairs)
    n = max([len(v) for v in pairs.values()] + [1])
    fig, axes = plt.subplots(1, len(labels), squeeze=False, sharey=False,
                             figsize=(4.5 * len(labels) + 2.5, 0.9 + 0.4 * n))
    for ax, label in zip(axes[0], labels):
        rows = list(pairs[label])
        lows, highs = [0.0], [0.0]
        for y, p in enumerate(rows):
            d = p["average"][key]
            sig = d["verdict"] == "distinguishable from zero"
            ax.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                        ms=5, capsize=3, color="tab:blue" if sig else "0.35", mfc="tab:blue" if sig else "white")
            lows.append(d["low"])
            highs.append(d["high"])
        ax.axvline(0.0, color="tab:red", lw=1)
        ax.set_yticks(range(len(rows)), [f"{p['a']} − {p['b']}" for p in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(axis="x", color="0.9")
        _zoom(ax, lows, highs)
        ax.set_title(f"{label}: Δ{key.upper() if key == 'hm' else key} (points), 95% paired CI", fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if n < 4 else 0.06, 1, 1))
    fig.text(0.5, 0.0, "filled: interval excludes 0 (distinguishable from zero); open: it does not",
             ha="center", va="bottom", fontsize=8)
    return _save(fig, Path(path))
