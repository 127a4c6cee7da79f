"""The suite's grid: data -> stage 1 (matched, clean-only, multitask control) -> stage 2 rows x shots x seeds.

    python -m pipeline.suite [--preset full|demo|ci] [--split test|val] [--jobs 2] [--force]

Every step is cached or resumable, so a second call redoes nothing that finished and an interrupted one
(Ctrl-C, a killed job) picks up where it stopped: the suite's data and backbone are cached by
:mod:`pipeline.suite.data`; feature extraction and clustering skip finished shards; a stage-1 run resumes
from its last checkpoint; a stage-2 run whose ``results.json`` was made by the same config is skipped
(:func:`pipeline.finetune_loop.run`). Stage-1 and stage-2 runs execute in a pool of ``--jobs`` processes
with one intra-op thread each (on a small CPU, processes scale and threads do not).

``--split val`` evaluates on the validation split into its own run tree: hyperparameters are chosen
there, frozen in this file's presets, and the test split is evaluated once (docs/RESULTS.md).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import cluster, extract
from pipeline.config import ConfigError, load_config
from pipeline.fileio import atomic_write_text
from pipeline.suite.data import SuiteDataConfig, build_suite_data
from pipeline.tracking import cpu_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Stage1Variant:
    """One stage-1 run of the grid: a corpus and the overrides that make it a treatment or a control."""

    name: str
    corpus: str
    """``matched`` (several styles, some like the downstream one) or ``clean`` (same concepts, no style)."""
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    """One stage-2 row of the table: a method preset and, for ``init=artifact`` rows, the stage-1 run."""

    name: str
    overrides: tuple[str, ...]
    stage1: str = ""
    """Name of the :class:`Stage1Variant` whose artifact initialises the run; empty = no stage 1."""
    question: str = ""
    """What the row answers (printed in the report's legend)."""


STAGE1 = {
    v.name: v
    for v in (
        Stage1Variant("matched", "matched"),
        Stage1Variant("clean", "clean"),
        # the multitask control: the same corpus and steps, inner learning rate 0, so the prompts are trained on
        # the query loss at the unadapted prompts and the regulator gets no meta-gradient
        Stage1Variant("matched_inner0", "matched", ("meta.inner_lr=0.0",)),
    )
}

ROWS = {
    r.name: r
    for r in (
        Row("zeroshot", ("method=zeroshot",), question="frozen CLIP"),
        Row("coop", ("method=coop",), question="shallow text prompts, cross-entropy"),
        Row("ivlp", ("method=ivlp",), question="deep prompts, cross-entropy"),
        Row("promptsrc_lite", ("method=promptsrc_lite",), question="fixed consistency regularizer"),
        Row("prometar", ("method=prometar",), question="meta-regularization from words"),
        Row("prometar_step_matched", ("method=prometar_step_matched",),
            question="as many updates, no meta-gradient"),
        Row("prometar_s1_matched", ("method=prometar", "init=artifact"), "matched",
            question="stage 1 on a style-matched corpus"),
        Row("prometar_s1_clean", ("method=prometar", "init=artifact"), "clean",
            question="stage 1 on a clean-only corpus"),
        Row("prometar_s1_multitask", ("method=prometar", "init=artifact"), "matched_inner0",
            question="stage 1 without adaptation (inner lr 0)"),
        Row("prometar_s1_frozen_reg", ("method=prometar", "init=artifact", "init_parts=prompts+frozen_regulator"),
            "matched", question="stage-1 regulator, frozen"),
        Row("prometar_s1_prompts", ("method=prometar", "init=artifact", "init_parts=prompts"), "matched",
            question="stage-1 prompts only"),
    )
}
"""Every row the suite knows; a preset picks some."""

PAIRS = (
    ("prometar", "ivlp"), ("promptsrc_lite", "ivlp"), ("coop", "ivlp"), ("zeroshot", "ivlp"),
    ("prometar", "promptsrc_lite"), ("prometar", "prometar_step_matched"),
    ("prometar_s1_matched", "prometar"), ("prometar_s1_clean", "prometar"),
    ("prometar_s1_matched", "prometar_s1_clean"), ("prometar_s1_matched", "prometar_s1_multitask"),
    ("prometar_s1_frozen_reg", "prometar_s1_matched"), ("prometar_s1_prompts", "prometar_s1_matched"),
    ("prometar_s1_matched", "ivlp"),
    # added after the first full report: the best stage-1 row against the best row without stage 1
    ("prometar_s1_matched", "promptsrc_lite"),
)
"""(a, b) pairs whose paired difference a - b the report states (each method vs IVLP and vs ProMetaR;
stage 1 matched vs clean-only vs none; the controls)."""

FAMILIES = {
    "Which method? (from words)": ["zeroshot", "coop", "ivlp", "promptsrc_lite", "prometar",
                                   "prometar_step_matched"],
    "Does stage 1 help?": ["prometar", "prometar_s1_matched", "prometar_s1_clean", "prometar_s1_multitask"],
    "Which part of stage 1 carries over?": ["prometar", "prometar_s1_matched", "prometar_s1_frozen_reg",
                                            "prometar_s1_prompts"],
}
"""One figure per question (methods absent from a preset are dropped)."""


@dataclass(frozen=True)
class Preset:
    """Sizes of one grid: which rows, datasets, shot counts and seeds, and the stage-1 length."""

    rows: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    datasets: tuple[str, ...] = ()
    """Downstream datasets of the suite's data to use; empty = all that were built."""
    stage1_steps: int = 200
    stage2: tuple[str, ...] = ()
    """Extra overrides of every stage-2 run (on top of ``configs/finetune/suite.yaml``)."""
    data: dict = field(default_factory=dict)
    """:class:`pipeline.suite.data.SuiteDataConfig` fields that differ from its defaults."""
    bootstrap: int = 2000


PRESETS = {
    # the full grid (about 40 minutes on 2 cores with the data cached): 16 shots would double it
    "full": Preset(rows=tuple(ROWS), shots=(4, 8), seeds=(1, 2, 3, 4, 5)),
    # make demo: a reduced grid on the same data and backbone (<= 10 minutes on 2 cores from a fresh clone)
    "demo": Preset(rows=("zeroshot", "ivlp", "promptsrc_lite", "prometar", "prometar_s1_matched",
                         "prometar_s1_clean"),
                   shots=(8,), seeds=(1, 2), datasets=("SuiteGlyphsA", "SuiteDigits", "SuiteFashion"),
                   stage1_steps=60, bootstrap=1000),
    # choosing settings: the learned-prompt methods on the validation split (run with --split val)
    "pilot": Preset(rows=("zeroshot", "ivlp", "promptsrc_lite", "prometar"), shots=(8,), seeds=(1, 2),
                    bootstrap=1000),
    # CI: checks the machinery on tiny data, not the conclusion
    "ci": Preset(rows=("zeroshot", "ivlp", "prometar", "prometar_s1_matched", "prometar_s1_clean"),
                 shots=(2,), seeds=(1, 2), datasets=("SuiteGlyphsA", "SuiteDigits"), stage1_steps=4,
                 stage2=("optim.epochs=1",), bootstrap=200,
                 data={"cache_dir": "cache/suite-ci", "corpus_renders_per_font": 1, "corpus_digits_per_class": 8,
                       "corpus_fashion_per_class": 0, "epochs": 1, "stage1_samples": 600, "train_per_class": 4,
                       "val_per_class": 3, "test_per_class": 5, "samples_per_shard": 300, "fashion_dir": ""}),
}


def stage1_needed(rows: tuple[str, ...]) -> list[str]:
    """Stage-1 variants the chosen rows start from, in :data:`STAGE1` order."""
    want = {ROWS[r].stage1 for r in rows if ROWS[r].stage1}
    return [v for v in STAGE1 if v in want]


# --- the jobs (module-level so the process pool can pickle them) ---------------------------------------

def _worker_init() -> None:
    """Pool workers get SIGTERM when the runner dies, even by SIGKILL (Linux): a stage-1 run saves a checkpoint
    and stops, a stage-2 run stops, and no orphan keeps holding a run folder's lock."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_pretrain(overrides: list[str]) -> dict:
    """One stage-1 run (resumes a started one; a finished one returns at once)."""
    from pipeline import pretrain

    _one_thread()
    t0 = time.time()
    code = pretrain.main(["--config", str(CONFIGS / "pretrain" / "suite.yaml"), *overrides])
    if code != 0:
        raise RuntimeError(f"stage 1 exited with status {code} ({' '.join(overrides)})")
    return {"seconds": time.time() - t0}


def run_finetune(overrides: list[str]) -> dict:
    """One stage-2 run (skipped when its results exist for the same config)."""
    from pipeline import finetune

    _one_thread()
    t0 = time.time()
    cfg = finetune.load_finetune_config(CONFIGS / "finetune" / "suite.yaml", overrides)
    res = finetune.run(cfg)
    return {"seconds": time.time() - t0, "skipped": bool(res.get("skipped")), "hm": res.get("hm"),
            "base": res.get("base", {}).get("accuracy"), "new": res.get("new", {}).get("accuracy")}


# --- the grid ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    """A unit of work for the pool."""

    label: str
    fn: str
    overrides: list[str]


def stage1_paths(root: Path, corpus: str) -> tuple[Path, Path]:
    return root / "stage1" / corpus / "features", root / "stage1" / corpus / "clusters"


def prepare_corpus(root: Path, info: dict, corpus: str) -> Path:
    """Extract features of one stage-1 corpus with the suite backbone and cluster them (both cached)."""
    feats, clusters = stage1_paths(root, corpus)
    ext = load_config(extract.ExtractConfig, CONFIGS / "extract" / "suite.yaml", [
        f"urls={info['stage1'][corpus]}", f"out_dir={feats}", f"backbone.arch={info['arch']}",
        f"backbone.pretrained={info['backbone']}"])
    report = extract.run(ext)
    if not (clusters / "concepts.json").exists() or report["extracted"]:
        cluster.main(["--config", str(CONFIGS / "cluster" / "suite.yaml"), f"features_dir={feats}",
                      f"out_dir={clusters}"])
    return clusters


def stage1_jobs(root: Path, info: dict, preset: Preset, variants: list[str]) -> list[Job]:
    jobs = []
    for name in variants:
        v = STAGE1[name]
        _, clusters = stage1_paths(root, v.corpus)
        jobs.append(Job(f"stage1 {name}", "run_pretrain", [
            f"run_dir={root / 'stage1' / 'runs' / name}", f"data.urls={info['stage1'][v.corpus]}",
            f"data.clusters_dir={clusters}", f"model.backbone.arch={info['arch']}",
            f"model.backbone.pretrained={info['backbone']}", f"optim.steps={preset.stage1_steps}",
            f"checkpoint.every={max(1, preset.stage1_steps // 4)}", *v.overrides]))
    return jobs


def artifact_of(root: Path, variant: str) -> Path:
    return root / "stage1" / "runs" / variant / "artifact.pt"


def run_root(root: Path, split: str, shots: int) -> Path:
    """Stage-2 runs of one split and shot count (``<root>/<split>/k<shots>/<dataset>/<row>/seed_<s>``)."""
    return root / split / f"k{shots}"


def stage2_jobs(root: Path, info: dict, preset: Preset, split: str, datasets: list[str]) -> list[Job]:
    jobs = []
    for shots in preset.shots:
        for dataset in datasets:
            d = info["datasets"][dataset]
            for seed in preset.seeds:
                for name in preset.rows:
                    row = ROWS[name]
                    extra = [f"artifact={artifact_of(root, row.stage1)}"] if row.stage1 else []
                    jobs.append(Job(f"k{shots} {dataset} {name} seed {seed}", "run_finetune", [
                        *row.overrides, *extra, f"name={name}", f"seed={seed}",
                        f"run_root={run_root(root, split, shots)}", f"data.dataset={d['dataset']}",
                        f"data.root={d['root']}", f"data.k_shot={shots}", f"eval.split={split}",
                        f"data.shot_cache_dir={root / 'shots'}", f"model.backbone.arch={info['arch']}",
                        f"model.backbone.pretrained={info['backbone']}", *preset.stage2]))
    return jobs


def execute(jobs: list[Job], n_jobs: int, what: str) -> tuple[list[str], int]:
    """Run ``jobs`` in a pool of ``n_jobs`` processes with a progress line per finished job; returns the
    labels of failed jobs (each failure is printed with its error; the others still run) and how many jobs
    found their results from an earlier call (not re-run, so not in this call's timings)."""
    if not jobs:
        return [], 0
    fns = {"run_pretrain": run_pretrain, "run_finetune": run_finetune}
    failed, done, reused, t0 = [], 0, 0, time.time()
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools or locks
    with cf.ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(fns[j.fn], j.overrides): j for j in jobs}
        try:
            for fut in cf.as_completed(futures):
                job, done = futures[fut], done + 1
                elapsed = time.time() - t0
                eta = elapsed / done * (len(jobs) - done)
                try:
                    r = fut.result()
                except Exception as e:  # reported, counted, and the grid exits non-zero at the end
                    failed.append(job.label)
                    print(f"{what} [{done}/{len(jobs)}] FAILED {job.label}: {type(e).__name__}: {e}", flush=True)
                    continue
                reused += bool(r.get("skipped"))
                hm = f" HM {r['hm']:.1f}" if r.get("hm") is not None else ""
                tag = " (done before)" if r.get("skipped") else f" ({r['seconds']:.0f} s)"
                print(f"{what} [{done}/{len(jobs)}] {job.label}{hm}{tag}; elapsed {elapsed:.0f} s, "
                      f"ETA {eta:.0f} s", flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            print(f"{what}: interrupted; finished runs are kept, rerun the same command to continue", flush=True)
            raise
    return failed, reused


def run_grid(preset_name: str, split: str = "test", n_jobs: int = 2, out: Path | None = None,
             root: Path | None = None, preset: Preset | None = None, report_only: bool = False) -> dict:
    """Build the data, run stage 1 and the stage-2 grid, and write the report; returns timings and paths.

    ``report_only`` runs nothing: the report is rebuilt from the ``results.json`` files already there."""
    preset = preset or PRESETS[preset_name]
    if split not in ("test", "val"):
        raise ConfigError(f"--split {split!r}: expected test or val")
    root = Path(root or f"runs/suite/{preset_name}")
    timings, t0 = {}, time.time()
    data_cfg = dataclasses.replace(SuiteDataConfig(), **preset.data)
    info = build_suite_data(data_cfg)
    timings["data_s"] = time.time() - t0
    datasets = list(preset.datasets or info["datasets"])
    unknown = [d for d in datasets if d not in info["datasets"]]
    if unknown:
        raise ConfigError(f"datasets {unknown} are not in the suite's data (built: {sorted(info['datasets'])})")
    print(f"suite: {len(datasets)} datasets {datasets}, rows {list(preset.rows)}, shots {list(preset.shots)}, "
          f"seeds {list(preset.seeds)} ({split} split); data ready in {timings['data_s']:.0f} s", flush=True)

    t1 = time.time()
    variants = stage1_needed(preset.rows)
    if not report_only:
        for corpus in dict.fromkeys(STAGE1[v].corpus for v in variants):
            prepare_corpus(root, info, corpus)
        failed, _ = execute(stage1_jobs(root, info, preset, variants), n_jobs, "stage 1")
        if failed:
            raise RuntimeError(f"stage-1 runs failed: {failed}; fix and rerun (finished runs are kept)")
    timings["stage1_s"] = time.time() - t1

    t2 = time.time()
    jobs = stage2_jobs(root, info, preset, split, datasets)
    failed, reused = execute(jobs, n_jobs, "stage 2") if not report_only else ([], len(jobs))
    timings["report_only"] = report_only
    timings["stage2_s"] = time.time() - t2
    timings["stage2_runs"], timings["stage2_reused"] = len(jobs), reused
    if failed:
        raise RuntimeError(f"{len(failed)} stage-2 runs failed (first: {failed[0]}); rerun to retry them")

    from pipeline.suite.report import suite_report

    t3 = time.time()
    out = Path(out or root / f"report_{split}")
    rows = list(preset.rows)
    families = {q: [m for m in ms if m in rows] for q, ms in FAMILIES.items()}
    families = {q: ms for q, ms in families.items() if len(ms) > 1}
    pairs = [p for p in PAIRS if p[0] in rows and p[1] in rows]
    report = suite_report({f"{k}-shot": run_root(root, split, k) for k in preset.shots}, out, pairs, families,
                          rows, B=preset.bootstrap)
    timings["report_s"] = time.time() - t3
    timings["total_s"] = time.time() - t0
    # every call's timings are kept, so a report regenerated later (all runs reused) still shows the wall
    # time of the call that did the work
    history = []
    if (out / "grid.json").is_file():
        old = json.loads((out / "grid.json").read_text())
        history = old.get("history") or [{**old["timings"], "when": "an earlier call"}]
    history.append({**timings, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))})
    summary = {"preset": preset_name, "split": split, "datasets": datasets, "rows": rows,
               "shots": list(preset.shots), "seeds": list(preset.seeds), "timings": timings, "history": history,
               "zero_shot_pilot": info.get("zero_shot"), "report": str(out), "data": info}
    atomic_write_text(out / "grid.json", json.dumps(summary, indent=1, default=str))
    markdown = (out / "table.md").read_text() + "\n" + "\n".join(f"- {x}" for x in report["sentences"])
    return {**summary, "markdown": markdown}


def doc_block(res: dict, command: str, figures_dir: Path | None = None, doc_dir: Path | None = None,
              tag: str = "") -> str:
    """The generated markdown of one grid: command, machine, date, wall times, the pilot's zero-shot
    accuracies, the table with CIs, the paired differences in words and the figures."""
    import datetime as dt
    import platform
    import shutil

    out = Path(res["report"])

    def wall(t: dict) -> str:
        if t.get("report_only"):
            return f"report only, from the runs' results files ({t['total_s']:.0f} s)"
        reused = t.get("stage2_reused", 0)
        return (f"{t['total_s'] / 60:.1f} min (data and backbone {t['data_s']:.0f} s, stage 1 {t['stage1_s']:.0f} s, "
                f"stage 2 {t['stage2_runs']} runs {t['stage2_s']:.0f} s" + (f", {reused} of them reused" if reused else "")
                + f", report {t['report_s']:.0f} s)")

    cpu = cpu_model()
    calls = res.get("history") or [res["timings"]]
    lines = [f"Command: `{command}`  ", f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores "
             f"({cpu or 'unknown CPU'}), {platform.system()}; date {dt.date.today()}  ",
             "Wall time: " + "; ".join(f"{c.get('when', 'this call')}: {wall(c)}"
                                       for c in calls if not c.get("report_only"))
             + " (a call reuses every run an earlier one finished)"
             + (f"; this block was rebuilt from the results files ({calls[-1].get('when', 'now')})"
                if calls[-1].get("report_only") else "") + "  ",
             f"Grid: {len(res['datasets'])} datasets ({', '.join(res['datasets'])}), {len(res['rows'])} rows, "
             f"shots {res['shots']}, seeds {res['seeds']}, evaluated on the {res['split']} split", ""]
    zs = (res.get("zero_shot_pilot") or {}).get("val", {})  # fractions, measured by pipeline.suite.data
    if zs:
        lines += ["Zero-shot top-1 (%) of the backbone on the validation split, with the dataset's template (the "
                  "check that there is headroom; target 40-75% on base and on new):", "",
                  "| dataset | base | new |", "|---|---|---|"]
        lines += [f"| {d} | {100 * v['base']:.1f} | {100 * v['new']:.1f} |" for d, v in zs.items()]
        lines.append("")
    for name in ("table.md", "paired.md"):
        if (out / name).is_file():
            lines += [(out / name).read_text().strip(), ""]
    if figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        for png in sorted(out.glob("*.png")):
            dest = figures_dir / f"{tag or res['preset']}_{png.name}"
            shutil.copyfile(png, dest)
            rel = os.path.relpath(dest, doc_dir or figures_dir.parent)
            lines.append(f"![{png.stem}]({rel})")
        lines.append("")
    return "\n".join(lines).strip() + "\n"


def write_doc_block(doc: Path, name: str, body: str) -> None:
    """Replace the block between ``<!-- suite:NAME -->`` and ``<!-- /suite:NAME -->`` in ``doc`` (appended
    when missing); the prose around it is left alone."""
    start, end = f"<!-- suite:{name} -->", f"<!-- /suite:{name} -->"
    text = doc.read_text() if doc.is_file() else ""
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    atomic_write_text(doc, text)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m pipeline.suite", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="evaluate on test (the final run) or val (choosing hyperparameters)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process and one thread each")
    ap.add_argument("--root", default="", help="folder of the runs (default runs/suite/<preset>)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing; rebuild the report (and --doc block) from the results already there")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="extra overrides of every stage-2 run (e.g. optim.lr=0.02 when choosing settings)")
    ap.add_argument("--doc", default="", help="also write the results into the <!-- suite:<preset> --> block "
                                              "of this markdown file (figures next to it under figures/)")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, stage2=(*preset.stage2, *args.set))
    res = run_grid(args.preset, args.split, args.jobs, root=Path(args.root) if args.root else None, preset=preset,
                   report_only=args.report_only)
    print(res["markdown"])
    if args.doc:
        doc = Path(args.doc)
        command = "python -m pipeline.suite " + " ".join(argv)
        # figures live under docs/figures whichever document shows them (README.md or docs/RESULTS.md)
        block = f"{args.preset}-{args.split}" + (f"-{Path(args.root).name}" if args.root else "")
        body = doc_block(res, command, CONFIGS.parent / "docs" / "figures", doc.resolve().parent, tag=block)
        write_doc_block(doc, block, body)
        print(f"suite: wrote the results into {doc}")
    t = res["timings"]
    print(f"suite: data {t['data_s']:.0f} s, stage 1 {t['stage1_s']:.0f} s, stage 2 ({t['stage2_runs']} runs) "
          f"{t['stage2_s']:.0f} s, report {t['report_s']:.0f} s, total {t['total_s']:.0f} s; "
          f"report in {res['report']}")
    return 0
