"""Stage-1 pretraining as users run it: data wait, throughput, and 1 vs 2 processes (docs/ARCHITECTURE.md section 8).

Every run is a real ``pipeline/pretrain.py`` run on the bundled digits demo (real images, the demo
backbone trained by open_clip_train, tasks from the clustering; built on first use, ~90 s), started
through ``accelerate launch`` and read back from its ``metrics.jsonl`` (one line per step here).

* ``datawait``: one process, the demo config; per step the fraction of the step spent getting the
  step's tasks from the streams (``data_wait_fraction``) and ``samples_per_s``, min / median / max over
  the steps after ``--skip`` warm-up steps.
* ``scaling``: the same global batch (``--tasks`` tasks per outer step) on 1 process and on 2
  processes (``launch/accelerate/cpu_2proc.yaml``, gloo), each process with ``--threads`` intra-op
  threads, and one process with ``2 * threads`` threads (the best a single process can do with the
  same cores). Throughput = samples of the steps after warm-up / their wall time (from the metrics
  timestamps); runs repeat ``--reps`` times, alternating configurations.

    python bench/bench_pretrain.py datawait --steps 60
    python bench/bench_pretrain.py scaling --steps 40 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import cli, spread  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "pretrain" / "demo.yaml"
LAUNCH = ROOT / "launch" / "accelerate"


def demo_inputs() -> str:
    """Shard URLs of the demo (builds data, backbone, features and clusters when missing)."""
    from pipeline.digits_demo.inputs import build_pretrain_inputs

    return build_pretrain_inputs()["urls"]


def launch(urls: str, run_dir: Path, processes: int, threads: int, steps: int, extra: list[str]) -> list[dict]:
    """One pretraining run through ``accelerate launch``; returns its metrics lines."""
    config = LAUNCH / ("cpu_2proc.yaml" if processes == 2 else "cpu_1proc.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           str(ROOT / "pipeline" / "pretrain.py"), "--config", str(DEMO_CONFIG), f"data.urls={urls}",
           f"run_dir={run_dir}", f"optim.steps={steps}", "tracking.log_every=1", "tracking.wandb_mode=disabled",
           f"checkpoint.every={steps}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pretrain run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def throughput(lines: list[dict], skip: int, samples_per_step: int) -> float:
    """Samples per second over the steps after ``skip`` (from the logged timestamps)."""
    kept = [x for x in lines if x["step"] >= skip]
    if len(kept) < 2:
        raise ValueError(f"need at least 2 logged steps after step {skip}; got {len(kept)}")
    steps = kept[-1]["step"] - kept[0]["step"]
    return steps * samples_per_step / (kept[-1]["time"] - kept[0]["time"])


def _demo_tasks() -> int:
    from pipeline.config import load_config
    from pipeline.pretrain import PretrainConfig

    return load_config(PretrainConfig, DEMO_CONFIG, []).tasks_per_step


def samples_per_step(tasks: int) -> int:
    from pipeline.config import load_config
    from pipeline.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, DEMO_CONFIG, [])
    return tasks * cfg.episodes.n_way * (cfg.episodes.k_shot + cfg.episodes.q_query)


def data_path_rate(urls: str, tasks: int, steps: int) -> float:
    """Images/s the task streams deliver on one core with no training (decoding, augmentation and
    episode assembly in the calling process, ``data.workers=0``): the CPU cost of the data path."""
    import torch

    from pipeline.backbone import load_backbone
    from pipeline.config import load_config
    from pipeline.data.task_stream import slot_loader
    from pipeline.pretrain import PretrainConfig

    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, DEMO_CONFIG, [f"data.urls={urls}", "data.workers=0"])
    preprocess = load_backbone(cfg.model.backbone).preprocess_train
    streams = [slot_loader(cfg.data, cfg.episodes, preprocess, cfg.seed, 0, slot) for slot in range(tasks)]
    for it in streams:  # fill the concept buffers first, as a running job has
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        for it in streams:
            next(it)
    return steps * samples_per_step(tasks) / (time.perf_counter() - t0)


def run_datawait(args) -> dict:
    urls = demo_inputs()
    samples_per_step_demo = samples_per_step(_demo_tasks())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lines = launch(urls, Path(tmp) / "run", 1, args.threads, args.steps, [])
        wall = time.perf_counter() - t0
    kept = [x for x in lines if x["step"] > args.skip]
    step_s = [samples_per_step_demo / x["samples_per_s"] for x in kept]
    waited = sum(x["data_wait_fraction"] * t for x, t in zip(kept, step_s))
    return {"run_fraction": waited / sum(step_s),
        "args": vars(args), "wall_s": wall, "steps": len(lines),
        "data_wait_fraction": spread([x["data_wait_fraction"] for x in kept]),
        "samples_per_s": spread([x["samples_per_s"] for x in kept]),
        "allreduce_bytes": kept[-1].get("allreduce_bytes"),
    }


def run_scaling(args) -> dict:
    urls = demo_inputs()
    per_step = samples_per_step(args.tasks)
    configs = {"1 process x {t} thread(s)": (1, args.threads), "2 processes x {t} thread(s)": (2, args.threads),
               "1 process x {t2} thread(s)": (1, 2 * args.threads)}
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = list(configs.items()) if rep % 2 == 0 else list(configs.items())[::-1]
            for name, (procs, threads) in order:
                run_dir = Path(tmp) / f"{rep}-{procs}-{threads}"
                lines = launch(urls, run_dir, procs, threads, args.steps, [f"tasks_per_step={args.tasks}"])
                label = name.format(t=args.threads, t2=2 * args.threads)
                rates.setdefault(label, []).append(throughput(lines, args.skip, per_step))
    labels = list(rates)
    base = statistics.median(rates[labels[0]])
    data_rate = data_path_rate(urls, args.tasks, args.steps)
    return {"args": vars(args), "samples_per_step": per_step, "data_path_per_core": data_rate,
            # 1 process computes on one core while its loader workers decode on the other; 2 processes
            # must also fit the decoding into the same 2 cores: 2 / (1/compute + 1/decode) images/s
            "ceiling_x_1_process": 2 / (1 + base / data_rate),
            "configs": {k: {**spread(v), "x_1_process": statistics.median(v) / base} for k, v in rates.items()}}


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("datawait", "scaling"))
    p.add_argument("--steps", type=int, default=60, help="outer steps per run")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out")
    p.add_argument("--tasks", type=int, default=4, help="scaling: tasks per outer step over all ranks")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--reps", type=int, default=2, help="scaling: repetitions of every configuration")
    args = p.parse_args(argv)
    return run_datawait(args) if args.mode == "datawait" else run_scaling(args)


def markdown(result: dict) -> str:
    a = result["args"]
    if a["mode"] == "datawait":
        w, s = result["data_wait_fraction"], result["samples_per_s"]
        return "\n".join([
            f"{result['steps']} outer steps of `configs/pretrain/demo.yaml` (1 process, {a['threads']} thread(s)), "
            f"steps after {a['skip']} left out; run wall time {result['wall_s']:.0f} s including start-up.",
            "", "| metric (per step) | min | median | max |", "|---|---:|---:|---:|",
            f"| data wait / step time | {100 * w['min']:.1f}% | **{100 * w['median']:.1f}%** | {100 * w['max']:.1f}% |",
            f"| samples/s | {s['min']:.0f} | {s['median']:.0f} | {s['max']:.0f} |",
            "", f"Whole run (steps after warm-up; the data wait of each step weighted by its duration): "
                f"**{100 * result['run_fraction']:.1f}%** of the time waiting for data.",
        ])
    lines = [f"{a['steps']} outer steps x {a['reps']} repetitions per configuration, {a['tasks']} tasks "
             f"({result['samples_per_step']} images) per outer step over all ranks, steps after {a['skip']} timed.",
             "", "| configuration | samples/s min | median | max | x 1 process (medians) |", "|---|---:|---:|---:|---:|"]
    for name, c in result["configs"].items():
        lines.append(f"| {name} | {c['min']:.1f} | {c['median']:.1f} | {c['max']:.1f} | **{c['x_1_process']:.2f}** |")
    if "data_path_per_core" in result:
        lines += ["", f"Data path alone (decode, augment, assemble episodes; no training), one core: "
                      f"{result['data_path_per_core']:.0f} images/s. Ceiling for 2 processes on these 2 cores, "
                      f"which must also do that decoding: 2 / (1 + compute rate / data rate) = "
                      f"**{result['ceiling_x_1_process']:.2f}x** one process."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cli(run, markdown, argv)


if __name__ == "__main__":
    main()
