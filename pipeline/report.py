"""Aggregate a tree of stage-2 runs into the standard base-to-new table, a CSV and plots.

    python -m pipeline.report <runs_root> [--out DIR] [--references]

Reads every ``results.json`` under ``runs_root`` (datasets x methods x seeds, any layout). A file that
cannot be used (truncated or invalid JSON, not an object, a missing or mistyped field) is skipped, named
in a warning line on stderr and counted in the printed summary and in ``report.md``; when no file is
usable the report fails. Per dataset
and method: mean +- std over seeds of base and new accuracy, and HM = 2BN/(B+N) of the two means.
Overall per method (datasets it has base and new results for): HM of the mean base and the mean new
over datasets (docs/ARCHITECTURE.md section 6). Other-dataset targets (domain generalization, cross-dataset) get
their own table of means. Writes ``report.md``, ``report.csv``, ``report_accuracy.png`` and
``report_curves.png`` (training curves from each run's ``metrics.jsonl``). With ``--references`` the
report adds the papers' published 11-dataset averages (``pipeline/references/published_base_to_new.json``)
beside this tree's own 11-dataset averages, or alone and marked not comparable when the tree does not
cover the 11 base-to-new datasets.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.datasets_meta import BASE_TO_NEW

# reading results.json lives next to writing it (pipeline.evaluation); re-exported here for old imports
from pipeline.evaluation import (  # noqa: F401
    DEFAULT_SUBSETS,
    RESULTS_FILE,
    SUBSETS,
    MalformedResults,
    harmonic_mean,
    parse_results,
    read_results,
)
from pipeline.fileio import atomic_write, atomic_write_text

REFERENCES_FILE = Path(__file__).parent / "references" / "published_base_to_new.json"
"""Published 11-dataset base-to-new averages of other methods, with their sources."""
REFERENCE_BACKBONE, REFERENCE_SHOTS = "ViT-B/16", 16


class NoResults(ConfigError, FileNotFoundError):
    """``runs_root`` holds no usable ``results.json`` (none at all, or every one was skipped)."""


def collect(root: str | Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rows (one per usable ``results.json``: dataset, name, seed, base/new/all accuracy, targets, run dir)
    and the skipped files as ``(path, reason)``; each skip is also a warning line on stderr."""
    rows, skipped = [], []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        try:
            rows.append(read_results(path))
        except MalformedResults as e:
            skipped.append((str(path), str(e)))
            print(f"warning: results file skipped: {path}: {e}", file=sys.stderr, flush=True)
    return rows, skipped


def skipped_summary(skipped: list[tuple[str, str]]) -> list[str]:
    """``N results file(s) skipped:`` and one ``<path>: <reason>`` line per file; empty when none."""
    if not skipped:
        return []
    head = f"{len(skipped)} results file{'s' if len(skipped) != 1 else ''} skipped:"
    return [head, *(f"{path}: {reason}" for path, reason in skipped)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict]) -> dict:
    """``{"per_dataset": {(dataset, name): stats}, "overall": {name: stats}, "targets": {name: {t: mean}}}``."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["name"])].append(r)
    per_dataset = {}
    for key, rs in sorted(groups.items()):
        stats = {"seeds": sorted(r["seed"] for r in rs)}
        for s in ("base", "new", "all"):
            vals = [r[s] for r in rs if s in r]
            if vals:
                stats[s], stats[f"{s}_std"] = _mean_std(vals)
        if "base" in stats and "new" in stats:
            stats["hm"] = harmonic_mean(stats["base"], stats["new"])
        per_dataset[key] = stats
    overall = {}
    for name in sorted({n for _, n in per_dataset}):
        parts = [(v["base"], v["new"]) for (d, n), v in per_dataset.items() if n == name and "hm" in v]
        if parts:
            overall[name] = overall_average(parts)
    targets: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for t, acc in r["targets"].items():
            targets[r["name"]][t].append(acc)
    return {"per_dataset": per_dataset, "overall": overall,
            "targets": {n: {t: statistics.fmean(v) for t, v in ts.items()} for n, ts in targets.items()}}


def overall_average(parts: list[tuple[float, float]]) -> dict:
    """Protocol average over datasets from per-dataset (mean base, mean new): HM of the two means."""
    base = statistics.fmean(b for b, _ in parts)
    new = statistics.fmean(n for _, n in parts)
    return {"base": base, "new": new, "hm": harmonic_mean(base, new), "datasets": len(parts)}


def _pm(stats: dict, key: str) -> str:
    return f"{stats[key]:.2f} ± {stats[key + '_std']:.2f}" if key in stats else "-"


def markdown(agg: dict) -> str:
    lines = ["| Dataset | Method | Seeds | Base | New | HM | All |", "|---|---|---|---|---|---|---|"]
    for (dataset, name), s in agg["per_dataset"].items():
        hm = f"{s['hm']:.2f}" if "hm" in s else "-"
        lines.append(f"| {dataset} | {name} | {len(s['seeds'])} | {_pm(s, 'base')} | {_pm(s, 'new')} | {hm} "
                     f"| {_pm(s, 'all')} |")
    if agg["overall"]:
        lines += ["", "Average over datasets (HM of the mean base and mean new accuracy):", "",
                  "| Method | Datasets | Base | New | HM |", "|---|---|---|---|---|"]
        for name, o in agg["overall"].items():
            lines.append(f"| {name} | {o['datasets']} | {o['base']:.2f} | {o['new']:.2f} | {o['hm']:.2f} |")
    if agg["targets"]:
        names = sorted({t for ts in agg["targets"].values() for t in ts})
        lines += ["", "Other datasets (mean over seeds):", "", "| Method | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for name, ts in agg["targets"].items():
            lines.append(f"| {name} | " + " | ".join(f"{ts[t]:.2f}" if t in ts else "-" for t in names) + " |")
    return "\n".join(lines) + "\n"


def write_csv(agg: dict, path: Path) -> None:
    keys = ["base", "base_std", "new", "new_std", "hm", "all", "all_std"]
    buf = io.StringIO(newline="")  # csv writes its own \r\n line ends; no translation, as with newline=""
    w = csv.writer(buf)
    w.writerow(["dataset", "method", "seeds", *keys])
    for (dataset, name), s in agg["per_dataset"].items():
        w.writerow([dataset, name, " ".join(map(str, s["seeds"])),
                    *[f"{s[k]:.4f}" if k in s else "" for k in keys]])
    for name, o in agg["overall"].items():
        w.writerow(["AVERAGE", name, "", f"{o['base']:.4f}", "", f"{o['new']:.4f}", "", f"{o['hm']:.4f}",
                    "", ""])
    atomic_write_text(path, buf.getvalue(), encoding="utf-8")


def plot_accuracy(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for d, _ in agg["per_dataset"]})
    names = sorted({n for _, n in agg["per_dataset"]})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 + 3 * len(datasets), 3.5), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, dataset in zip(axes[0], datasets):
        for i, name in enumerate(names):
            s = agg["per_dataset"].get((dataset, name), {})
            vals = [s.get(k, 0.0) for k in ("base", "new", "hm")]
            errs = [s.get(f"{k}_std", 0.0) for k in ("base", "new")] + [0.0]
            ax.bar([x + i * width for x in range(3)], vals, width, yerr=errs, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(3)], ["base", "new", "HM"])
        ax.set_title(dataset)
        ax.set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path, metric: str = "reg_step/task") -> bool:
    """Training loss per step of every run with a ``metrics.jsonl`` (one line per run); False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for r in rows:
        f = Path(r["run_dir"]) / "metrics.jsonl"
        if f.exists():
            try:
                pts = [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
            except (ValueError, OSError) as e:  # e.g. a line cut by a killed run: the table does not need it
                print(f"warning: training curve skipped: {f}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            pts = [(p["step"], p[metric]) for p in pts if isinstance(p, dict) and "step" in p and metric in p]
            if pts:
                series.append((f"{r['dataset']}/{r['name']}/seed{r['seed']}", pts))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series:
        ax.plot(*zip(*pts), label=label, linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def load_references(path: str | Path = REFERENCES_FILE) -> dict:
    """The published-averages data file, checked: every method has numeric ``base``/``new``/``hm`` (HM the
    harmonic mean of base and new within 0.01), ``backbone``, ``shots`` and a ``source`` with ``paper``,
    ``venue`` and ``table``; :class:`ConfigError` names what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        methods = data["methods"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"references: {path} is not a readable references file ({type(e).__name__}: {e})") from None
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"references: {path}: 'methods' is not a non-empty object")
    for name, m in methods.items():
        where = f"references: {path}: {name}"
        if not isinstance(m, dict):
            raise ConfigError(f"{where} is not an object")
        for key in ("base", "new", "hm"):
            if isinstance(m.get(key), bool) or not isinstance(m.get(key), int | float):
                raise ConfigError(f"{where}: {key}={m.get(key)!r} is not a number")
        if abs(harmonic_mean(m["base"], m["new"]) - m["hm"]) > 0.01:
            raise ConfigError(f"{where}: hm={m['hm']} is not the harmonic mean of base={m['base']} and "
                              f"new={m['new']} ({harmonic_mean(m['base'], m['new']):.2f})")
        if not isinstance(m.get("backbone"), str) or not isinstance(m.get("shots"), int):
            raise ConfigError(f"{where}: needs 'backbone' (text) and 'shots' (integer)")
        src = m.get("source")
        if not isinstance(src, dict) or not all(isinstance(src.get(k), str) and src[k] for k in ("paper", "venue", "table")):
            raise ConfigError(f"{where}: 'source' needs 'paper', 'venue' and 'table'")
    return data


def _run_settings(rows: list[dict], name: str) -> str:
    """``<shots> shots, <backbone>`` of a method's runs, as recorded in their ``results.json``."""
    shots, backbones = set(), set()
    for r in rows:
        if r["name"] != name:
            continue
        try:
            raw = json.loads((Path(r["run_dir"]) / RESULTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        cfg = raw.get("config") if isinstance(raw.get("config"), dict) else {}
        model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
        shots.add(str(raw.get("k_shot", "?")))
        backbones.add(str(model.get("backbone", "?")))
    return f"{'/'.join(sorted(shots))} shots, {'/'.join(sorted(backbones))}"


def references_markdown(agg: dict, rows: list[dict], refs: dict) -> str:
    """The published 11-dataset averages beside this tree's own averages over the same 11 datasets.

    A method of the tree is shown ("this run") only when it has base and new results on every one of the
    11 base-to-new datasets (:data:`BASE_TO_NEW`), averaged over exactly those; when none has, one line
    says so and the published table stands alone, labelled as not comparable.
    """
    per_dataset = agg["per_dataset"]
    names = sorted({n for _, n in per_dataset})
    covered = {n: [d for d in BASE_TO_NEW if "hm" in per_dataset.get((d, n), {})] for n in names}
    full = [n for n in names if len(covered[n]) == len(BASE_TO_NEW)]
    title = f"Published {len(BASE_TO_NEW)}-dataset averages ({REFERENCE_BACKBONE}, {REFERENCE_SHOTS} shots)"
    lines = []
    if full:
        lines += [f"{title}, beside this run's averages over the same {len(BASE_TO_NEW)} datasets:", ""]
    else:
        best = max(names, key=lambda n: len(covered[n]))
        missing = [d for d in BASE_TO_NEW if d not in covered[best]]
        lines += [f"This run does not cover the {len(BASE_TO_NEW)} base-to-new datasets (the most complete "
                  f"method, {best}, has {len(covered[best])} of them; missing: {', '.join(missing)}), so its "
                  "averages are not comparable with the published ones.", "",
                  f"{title}, for reference only (not comparable with this run):", ""]
    lines += ["| Method | Base | New | HM | Source |", "|---|---|---|---|---|"]
    for n in full:
        o = overall_average([(per_dataset[(d, n)]["base"], per_dataset[(d, n)]["new"]) for d in BASE_TO_NEW])
        lines.append(f"| {n} (this run) | {o['base']:.2f} | {o['new']:.2f} | {o['hm']:.2f} "
                     f"| this run: {_run_settings(rows, n)} |")
    for n, m in refs["methods"].items():
        src = m["source"]
        lines.append(f"| {n} | {m['base']:.2f} | {m['new']:.2f} | {m['hm']:.2f} "
                     f"| {src['paper']}, {src['venue']}, {src['table']}; {m['shots']} shots, {m['backbone']} |")
    partial = [n for n in names if n not in full and covered[n]] if full else []
    if partial:
        lines += ["", f"Not shown (fewer than {len(BASE_TO_NEW)} base-to-new datasets): "
                  + ", ".join(f"{n} ({len(covered[n])})" for n in partial) + "."]
    if refs.get("note"):
        lines += ["", refs["note"]]
    return "\n".join(lines) + "\n"


def report(root: str | Path, out: str | Path | None = None, references: bool = False) -> dict:
    """Write the report files for the runs under ``root``; returns paths and the aggregate.

    ``references``: add the published 11-dataset averages (:func:`references_markdown`)."""
    if not Path(root).is_dir():
        raise NoResults(f"runs_root: {root} is not a folder")
    rows, skipped = collect(root)
    if not rows:
        why = f"; all {len(skipped)} were skipped: " + "; ".join(skipped_summary(skipped)[1:]) if skipped else ""
        raise NoResults(f"no usable {RESULTS_FILE} under {root}{why}")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    text = markdown(agg)
    if references:
        text += "\n" + references_markdown(agg, rows, load_references())
    doc = f"# Results under {root}\n\n{text}"
    if skipped:  # in the report itself, so a table that lacks runs says so
        doc += "\n" + skipped_summary(skipped)[0] + "\n\n" + "".join(f"- `{path}`: {reason}\n"
                                                                   for path, reason in skipped)
    atomic_write_text(out / "report.md", doc, encoding="utf-8")
    write_csv(agg, out / "report.csv")
    plot_accuracy(agg, out / "report_accuracy.png")
    curves = plot_curves(rows, out / "report_curves.png")
    return {"markdown": text, "aggregate": agg, "runs": len(rows), "out": str(out), "curves": curves,
            "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    ap.add_argument("runs_root", help="folder holding run folders with results.json")
    ap.add_argument("--out", default=None, help="where to write the report (default: runs_root)")
    ap.add_argument("--references", action="store_true",
                    help="add the papers' published 11-dataset averages (ViT-B/16, 16 shots) with sources")
    args = ap.parse_args(argv)
    result = report(args.runs_root, args.out, references=args.references)
    print(result["markdown"])
    print(f"report: {result['runs']} runs -> {result['out']}/report.md, report.csv, report_*.png")
    for line in skipped_summary(result["skipped"]):
        print(f"report: {line}")
    return 0


if __name__ == "__main__":
    from pipeline.config import run_main  # user errors: one line on stderr, exit status 2

    raise SystemExit(run_main(main))
