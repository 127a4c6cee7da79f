"""One-command GPU check: gpu tests, ViT-B/16 bf16 meta benchmark, a short stage 1 (plain and under the
DeepSpeed launcher config) and a short stage 2 from its artifact, with a summary file.

    make gpu-check                                  # = python bench/gpu_check.py --doc docs/BENCHMARKS.md
    python bench/gpu_check.py --dry-run             # the same steps on the CPU at toy sizes (tests use it)

Every step runs in its own subprocess with its own timeout, inside an overall deadline (8 minutes by
default), so a hang costs one step, not the machine. A step whose prerequisite failed is not run. The
summary (``<out>/gpu_check.json`` and ``<out>/gpu_check.md``) lists each step's status, wall time, the
tail of a failing step's output, and only figures parsed from what the step itself wrote (JSON or
``metrics.jsonl``); a figure a step did not produce is absent, never filled in. With ``--doc`` the
markdown also replaces the ``gpu-check`` block of docs/BENCHMARKS.md (``bench/run_all.py`` does the same
when it runs this script as its ``gpu-check`` benchmark). The exit status is 0 only when every step passed.

GPU mode: ViT-B-16 with random weights (``pretrained=""``: nothing to download), IVLP 4+4 tokens at depth 9,
``mixed_precision=bf16``; data generated on the fly (coloured-image shards with a planted clustering for
stage 1, a 5-class CoOp-layout dataset for stage 2). Dry run: the tiny in-repo ``tiny-vit-s`` on the CPU,
depth 2, the same commands otherwise. The dry run cannot measure GPU memory and does not pretend to.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DEADLINE_S = 480.0
"""The whole check, all steps together (8 minutes)."""


@dataclass(frozen=True)
class Mode:
    """Sizes and devices of one mode (GPU or dry run)."""

    name: str
    arch: str
    cpu: bool
    depth: int
    mixed_precision: str
    bench_args: tuple[str, ...]
    stage1_steps: int
    stage2_epochs: int


GPU = Mode("gpu", "ViT-B-16", False, 9, "bf16",
           ("--device", "cuda", "--arch", "ViT-B-16", "--autocast", "bf16", "--iters", "10", "--warmup", "2",
            "--classes", "50", "--batch", "4", "--flops"), stage1_steps=10, stage2_epochs=2)
DRY = Mode("dry-run", "tiny-vit-s", True, 2, "no",
           ("--device", "cpu", "--arch", "tiny-vit", "--iters", "1", "--warmup", "0", "--classes", "6",
            "--batch", "4", "--flops", "--no-memory"), stage1_steps=2, stage2_epochs=1)


@dataclass
class Step:
    """One check: a command, its timeout, what it needs, and how its figures are read back."""

    name: str
    what: str
    cmd: list[str]
    timeout_s: float
    figures: Callable[[], dict] = lambda: {}
    needs: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    """Where the step's stdout and stderr go (for figures read from what the run printed)."""


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def stage1_overrides(mode: Mode, data: dict, run_dir: Path) -> list[str]:
    """Dotted overrides of a short stage-1 run on the generated task data."""
    return [
        f"run_dir={run_dir}", f"data.urls={data['urls']}", f"data.clusters_dir={data['clusters_dir']}",
        "data.workers=0", "data.shuffle_buffer=16", "data.shuffle_initial=4", "data.epoch_steps=5",
        f"model.backbone.arch={mode.arch}", "model.backbone.pretrained=", f"model.prompts.depth_text={mode.depth}",
        f"model.prompts.depth_vision={mode.depth}", "episodes.n_way=2", "episodes.k_shot=2", "episodes.q_query=2",
        "episodes.buffer_per_concept=8", "tasks_per_step=2", f"optim.steps={mode.stage1_steps}",
        "optim.warmup_steps=1", f"checkpoint.every={mode.stage1_steps}", "tracking.wandb_mode=disabled",
        "tracking.log_every=1", f"cpu={str(mode.cpu).lower()}", "threads=1" if mode.cpu else "threads=0",
        *([f"mixed_precision={mode.mixed_precision}"] if mode.mixed_precision != "no" else []),
    ]


def stage2_overrides(mode: Mode, data_root: Path, run_root: Path, artifact: Path) -> list[str]:
    """Dotted overrides of a short stage-2 ProMetaR run from the stage-1 artifact."""
    return [
        f"run_root={run_root}", "data.dataset=OxfordPets", f"data.root={data_root}",
        f"data.shot_cache_dir={run_root}/shots", "data.k_shot=2", f"model.backbone.arch={mode.arch}",
        "model.backbone.pretrained=", f"model.prompts.depth_text={mode.depth}",
        f"model.prompts.depth_vision={mode.depth}", "method=prometar", "init=artifact", f"artifact={artifact}",
        f"optim.epochs={mode.stage2_epochs}", "optim.batch_size=4", "tracking.wandb_mode=disabled",
        "tracking.log_every=1", f"cpu={str(mode.cpu).lower()}", "eval.batch_size=16",
        "threads=1" if mode.cpu else "threads=0",
    ]


def _stage1_figures(run_dir: Path) -> Callable[[], dict]:
    def read() -> dict:
        rows = [r for r in _metrics(run_dir) if "samples_per_s" in r]
        if not rows or not (run_dir / "artifact.pt").exists():
            raise RuntimeError(f"no metrics or no artifact in {run_dir}")
        later = rows[1:] or rows  # the first step includes the model's warm-up
        rates = sorted(r["samples_per_s"] for r in later)
        return {"steps": rows[-1].get("step", len(rows)), "samples_per_s_median": round(rates[len(rates) // 2], 1),
                "outer_loss_last": rows[-1].get("outer_loss"), "allreduce_bytes": rows[-1].get("allreduce_bytes")}
    return read


def _stage2_figures(run_root: Path) -> Callable[[], dict]:
    def read() -> dict:
        found = sorted(run_root.rglob("results.json"))
        if not found:
            raise RuntimeError(f"no results.json under {run_root}")
        res = json.loads(found[0].read_text())
        out = {"results": str(found[0].relative_to(run_root))}
        for key in ("base", "new"):  # top-1 (percent) of the subsets results.json records
            value = _find(res, key)
            if isinstance(value, dict) and "accuracy" in value:
                out[f"accuracy_{key}"] = round(value["accuracy"], 2)
        hm = _find(res, "hm")
        if isinstance(hm, (int, float)):
            out["accuracy_hm"] = round(hm, 2)
        out["prompts_from_artifact"] = _find(res, "prompts_from_artifact")
        if out["prompts_from_artifact"] is not True:
            raise RuntimeError(f"{found[0]}: the run did not start from the stage-1 artifact")
        return out
    return read


def _find(obj, key):
    """The first value of ``key`` anywhere in a nested dict (results.json layouts differ by protocol)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            hit = _find(v, key)
            if hit is not None:
                return hit
    return None


def _bench_figures(path: Path) -> Callable[[], dict]:
    def read() -> dict:
        result = json.loads(path.read_text())
        out = {"device_name": result["device_name"]}
        for name, e in result["variants"].items():
            out[name] = {"time_ms_median": 1000 * e["time_s"]["median"], "x_plain_median": e["ratio"]["median"],
                         "samples_per_s": e["samples_per_s"]}
            for key in ("gflop", "flop_ratio", "peak_mib", "memory_ratio"):
                if key in e:
                    out[name][key] = e[key]
        return out
    return read


def _pytest_figures(xml: Path, mode: Mode) -> Callable[[], dict]:
    def read() -> dict:
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        if mode is GPU and (n["skipped"] or not n["passed"]):  # on a GPU machine a skipped gpu test is a failure
            raise RuntimeError(f"gpu tests skipped or none passed on a GPU machine: {n}")
        return n
    return read


def _deepspeed_figures(log: Path, run_dir: Path) -> Callable[[], dict]:
    def read() -> dict:
        text = log.read_text()
        out = _stage1_figures(run_dir)()
        # what the run itself said about the launcher config (pipeline.distributed.Distributed.check_backend)
        out["deepspeed_plugin_active"] = "DeepSpeed ZeRO-" in text and "stays replicated" in text
        out["deepspeed_dropped_by_accelerate"] = "asks for DeepSpeed but accelerate runs without it" in text
        return out
    return read


def plan(mode: Mode, work: Path) -> list[Step]:
    """The steps of one check, in order; data generation happens before (in this process)."""
    from tests.helpers.fewshot_data import make_coop_dataset
    from tests.helpers.tasks import make_task_data

    py = sys.executable
    data = make_task_data(work / "task_data")
    coop = make_coop_dataset(work / "coop")
    s1, s1_ds, s2 = work / "stage1", work / "stage1_deepspeed", work / "stage2"
    xml, bench_json, ds_log = work / "pytest_gpu.xml", work / "bench_meta.json", work / "stage1_deepspeed.log"
    accelerate = str(Path(py).with_name("accelerate"))
    ds_cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch/accelerate/deepspeed.yaml"),
              "--num_processes", "1", "--mixed_precision", mode.mixed_precision, str(ROOT / "pipeline/pretrain.py"),
              *stage1_overrides(mode, data, s1_ds)]
    return [
        Step("pytest-gpu", "tests marked gpu", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                                 f"--junitxml={xml}", str(ROOT / "tests")], 150,
             _pytest_figures(xml, mode)),
        Step("bench-meta", "bench_meta.py: ProMetaR vs plain IVLP iteration",
             [py, str(ROOT / "bench/bench_meta.py"), *mode.bench_args, "--json-out", str(bench_json)], 200,
             _bench_figures(bench_json)),
        Step("stage1", "python -m pipeline.pretrain (short run)",
             [py, "-m", "pipeline.pretrain", *stage1_overrides(mode, data, s1)], 150, _stage1_figures(s1)),
        Step("stage1-deepspeed", "stage 1 through launch/accelerate/deepspeed.yaml",
             ds_cmd, 150, _deepspeed_figures(ds_log, s1_ds), log=ds_log),
        Step("stage2", "python -m pipeline.finetune from the stage-1 artifact",
             [py, "-m", "pipeline.finetune", *stage2_overrides(mode, coop, s2, s1 / "artifact.pt")], 150,
             _stage2_figures(s2), needs=("stage1",)),
    ]


def run_steps(steps: list[Step], deadline_s: float, log=print) -> list[dict]:
    """Run ``steps`` in order; each entry: name, status (passed | failed | timeout | not run), wall
    seconds, figures (only when passed) and the output tail when not."""
    start = time.perf_counter()
    out: list[dict] = []
    status: dict[str, str] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for step in steps:
        entry: dict = {"name": step.name, "what": step.what, "command": shlex.join(step.cmd)}
        missing = [n for n in step.needs if status.get(n) != "passed"]
        left = deadline_s - (time.perf_counter() - start)
        if missing or left < 5:
            entry.update(status="not run", reason=f"needs {missing}" if missing else "overall deadline reached")
        else:
            timeout = min(step.timeout_s, left)
            log(f"[gpu-check] {step.name}: {step.what} (timeout {timeout:.0f} s)", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(step.cmd, cwd=ROOT, env={**env, **step.env}, capture_output=True, text=True,
                                      timeout=timeout)
                entry["wall_s"] = round(time.perf_counter() - t0, 1)
                if step.log is not None:
                    step.log.write_text(proc.stdout + proc.stderr)
                if proc.returncode:
                    entry.update(status="failed", reason=f"exit status {proc.returncode}",
                                 tail=(proc.stdout + proc.stderr)[-3000:])
                else:
                    try:
                        entry.update(status="passed", figures=step.figures())
                    except Exception as e:  # the step ran but did not produce what it should have
                        entry.update(status="failed", reason=f"output unreadable: {e}",
                                     tail=(proc.stdout + proc.stderr)[-3000:])
            except subprocess.TimeoutExpired as e:
                entry.update(status="timeout", wall_s=round(time.perf_counter() - t0, 1),
                             reason=f"killed after {timeout:.0f} s",
                             tail=((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                                   else (e.stdout or ""))[-3000:])
            log(f"[gpu-check] {step.name}: {entry['status']} {entry.get('reason', '')}", flush=True)
        status[step.name] = entry["status"]
        out.append(entry)
    return out


def machine() -> str:
    from run_all import machine as describe

    return describe()


def markdown(summary: dict) -> str:
    """The summary as the ``gpu-check`` block: one row per step, then the figures per passed step."""
    lines = [f"`{summary['command']}`{' (dry run: CPU, toy sizes)' if summary['mode'] != 'gpu' else ''}", "",
             f"{summary['machine']}; {summary['date']}; {summary['wall_s']:.0f} s in all "
             f"(deadline {summary['deadline_s']:.0f} s).", "",
             f"**{'all steps passed' if summary['ok'] else 'FAILED: ' + ', '.join(summary['failed'])}**", "",
             "| step | what | status | wall (s) |", "|---|---|---|---:|"]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['what']} | {s['status']}{' (' + s['reason'] + ')' if 'reason' in s else ''} "
                     f"| {s.get('wall_s', '')} |")
    for s in summary["steps"]:
        if s["status"] != "passed" or not s.get("figures"):
            continue
        lines += ["", f"{s['name']}:", ""]
        figs = s["figures"]
        if s["name"] == "bench-meta":
            lines += ["| iteration | median (ms) | x plain | samples/s | GFLOP | FLOP x plain | peak (MiB) | x plain |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name, e in figs.items():
                if not isinstance(e, dict):
                    continue
                cells = [f"{e['time_ms_median']:.1f}", f"{e['x_plain_median']:.2f}", f"{e['samples_per_s']:.1f}"]
                cells += [f"{e[k]:.2f}" if k in e else "not measured"
                          for k in ("gflop", "flop_ratio", "peak_mib", "memory_ratio")]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append(f"\ndevice: {figs['device_name']}" + ("; peak = torch.cuda.max_memory_allocated over 3 "
                                                            "iterations, over the allocation before them"
                                                            if "peak_mib" in figs.get("plain", {}) else ""))
        else:
            lines += [f"- {k}: {v}" for k, v in figs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    p.add_argument("--out", default="", help="folder for gpu_check.json / gpu_check.md (default runs/gpu_check)")
    p.add_argument("--doc", default="", help="also replace the gpu-check block of this markdown file")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S)
    p.add_argument("--markdown-out", default="", help="also write the markdown here (bench/run_all.py)")
    p.add_argument("--json-out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    import torch

    mode = DRY if args.dry_run else GPU
    if mode is GPU and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing measured. "
              "Use --dry-run to check the machinery on the CPU.", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        steps = run_steps(plan(mode, Path(work)), args.deadline_s)
    failed = [s["name"] for s in steps if s["status"] != "passed"]
    summary = {"mode": mode.name, "ok": not failed, "failed": failed, "steps": steps,
               "command": "python bench/gpu_check.py" + (" --dry-run" if args.dry_run else ""),
               "machine": machine(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "wall_s": time.perf_counter() - t0, "deadline_s": args.deadline_s}
    text = markdown(summary)
    for path in filter(None, [out / "gpu_check.json", args.json_out]):
        Path(path).write_text(json.dumps(summary, indent=1))
    for path in filter(None, [out / "gpu_check.md", args.markdown_out]):
        Path(path).write_text(text + "\n")
    if args.doc:
        from run_all import replace_section

        doc = Path(args.doc)
        doc.write_text(replace_section(doc.read_text(), "gpu-check", text, "GPU check (`make gpu-check`)"))
    print(text)
    print(f"\ngpu-check: {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}; summary in {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
