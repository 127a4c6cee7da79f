"""bench/gpu_check.py: the dry run executes every step of the GPU check on the CPU and writes its summary;
failures, timeouts and skipped prerequisites are reported as such, never with figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

STEPS = ["pytest-gpu", "bench-meta", "stage1", "stage1-deepspeed", "stage2"]


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\nprose\n\n<!-- bench:gpu-check -->\nold\n<!-- /bench:gpu-check -->\n")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--doc", str(doc)]) == 0
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["mode"] == "dry-run" and summary["ok"] and summary["failed"] == []
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS and all(s["status"] == "passed" for s in steps.values())
    # the gpu test exists and is collected; without CUDA it skips (on a GPU machine a skip fails the step)
    assert steps["pytest-gpu"]["figures"]["tests"] >= 1
    bench = steps["bench-meta"]["figures"]
    assert bench["device_name"] == "cpu" and bench["plain"]["flop_ratio"] == 1.0
    assert bench["prometar"]["gflop"] > bench["plain"]["gflop"] > 0
    assert all("peak_mib" not in bench[v] for v in ("plain", "prometar"))  # not measured in a dry run: absent
    s1 = steps["stage1"]["figures"]
    assert s1["steps"] == gpu_check.DRY.stage1_steps and s1["samples_per_s_median"] > 0 and s1["allreduce_bytes"] > 0
    ds = steps["stage1-deepspeed"]["figures"]
    # on the CPU accelerate drops the DeepSpeed plugin; the run says so and the check records it
    assert ds["deepspeed_dropped_by_accelerate"] and not ds["deepspeed_plugin_active"]
    s2 = steps["stage2"]["figures"]
    assert s2["prompts_from_artifact"] is True and 0 <= s2["accuracy_base"] <= 100
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "**all steps passed**" in md and "| prometar |" in md and "not measured" in md
    text = doc.read_text()
    assert "prose" in text and "old" not in text and "`python bench/gpu_check.py --dry-run`" in text


def test_failures_timeouts_and_prerequisites_are_reported_without_figures(tmp_path):
    py = sys.executable
    steps = [
        gpu_check.Step("ok", "passes", [py, "-c", "print(1)"], 30, lambda: {"x": 1}),
        gpu_check.Step("bad", "exits 3", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30, lambda: {"x": 2}),
        gpu_check.Step("slow", "hangs", [py, "-c", "import time; time.sleep(30)"], 1, lambda: {"x": 3}),
        gpu_check.Step("after", "needs bad", [py, "-c", "print(1)"], 30, lambda: {"x": 4}, needs=("bad",)),
        gpu_check.Step("empty", "no output", [py, "-c", "print(1)"], 30, lambda: json.loads("")),
    ]
    out = {s["name"]: s for s in gpu_check.run_steps(steps, deadline_s=120, log=lambda *a, **k: None)}
    assert out["ok"]["status"] == "passed" and out["ok"]["figures"] == {"x": 1}
    assert out["bad"]["status"] == "failed" and "exit status 3" in out["bad"]["reason"] and "boom" in out["bad"]["tail"]
    assert out["slow"]["status"] == "timeout"
    assert out["after"]["status"] == "not run" and "bad" in out["after"]["reason"]
    assert out["empty"]["status"] == "failed" and "output unreadable" in out["empty"]["reason"]
    assert all("figures" not in s for n, s in out.items() if n != "ok")
    summary = {"mode": "gpu", "ok": False, "failed": ["bad", "slow", "after", "empty"], "steps": list(out.values()),
               "command": "python bench/gpu_check.py", "machine": "m", "date": "d", "wall_s": 1.0, "deadline_s": 120}
    md = gpu_check.markdown(summary)
    assert "FAILED: bad, slow, after, empty" in md and "| slow | hangs | timeout" in md


def test_gpu_mode_without_cuda_measures_nothing(tmp_path):
    if torch.cuda.is_available():
        return  # on a GPU machine the real check runs through `make gpu-check`
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert not (tmp_path / "gpu_check.json").exists()
