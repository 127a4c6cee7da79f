"""Runtime faults: NaNs injected into losses and gradients, a rank killed or hung in a 2-process run.

What must hold (docs/ARCHITECTURE.md section 9): a non-finite step is skipped on every rank and counted, the run
aborts with a clear message after ``max_nonfinite`` in a row; a dead or stuck rank ends the whole job
with an error naming the failure (never a hang), and the last complete checkpoint stays loadable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pipeline.meta.prometar as prometar_module
import pipeline.meta.step as step_module
import pipeline.pretrain_loop as loop
from pipeline import finetune, pretrain
from pipeline.checkpoint import latest_checkpoint, list_checkpoints, load_artifact, load_checkpoint

from .conftest import require
from .helpers.fewshot_data import finetune_overrides, make_coop_dataset
from .helpers.tasks import make_task_data, pretrain_overrides

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("tasks"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class _NaNOnCalls:
    """Wraps a loss function; multiplies its value by NaN on the given (1-based) call numbers."""

    def __init__(self, fn, calls):
        self.fn, self.calls, self.n = fn, set(calls), 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        out = self.fn(*args, **kwargs)
        return out * float("nan") if self.n in self.calls else out


def test_pretrain_skips_and_counts_nan_loss_and_nan_gradients(task_data, tmp_path, monkeypatch):
    # 2 tasks per step: outer-loss calls 3-4 are step 2; a NaN in one task's loss poisons the step
    nan_loss = _NaNOnCalls(step_module.mixup_cross_entropy, calls={3})
    monkeypatch.setattr(step_module, "mixup_cross_entropy", nan_loss)
    real_step, seen = loop.meta_step, {"n": 0}

    def nan_gradient_on_step_4(*args, **kwargs):  # a finite loss whose meta-gradient is not finite
        result = real_step(*args, **kwargs)
        seen["n"] += 1
        if seen["n"] == 7:
            result.regulator_grads[next(iter(result.regulator_grads))][0] = float("inf")
        return result

    monkeypatch.setattr(loop, "meta_step", nan_gradient_on_step_4)
    run = tmp_path / "run"
    assert pretrain.main(pretrain_overrides(task_data, run, steps=5, extra=("max_nonfinite=2",))) == 0
    lines = _metrics(run)
    assert [x["nonfinite_steps"] for x in lines] == [0, 1, 1, 2, 2]
    assert [math.isnan(x["regulator_update"]) for x in lines] == [False, True, False, True, False]
    art = load_artifact(run / "artifact.pt")  # the skipped steps left nothing non-finite behind
    assert all(torch.isfinite(v).all() for v in art.prompts.values())
    assert all(torch.isfinite(v).all() for v in art.regulator_state.values())


def test_pretrain_aborts_after_max_nonfinite_in_a_row(task_data, tmp_path, monkeypatch):
    monkeypatch.setattr(step_module, "mixup_cross_entropy", _NaNOnCalls(step_module.mixup_cross_entropy,
                                                                        calls=range(3, 100)))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"3 consecutive outer steps had a non-finite loss.*max_nonfinite=3"):
        pretrain.main(pretrain_overrides(task_data, run, steps=8, extra=("max_nonfinite=3",)))
    assert [x["nonfinite_steps"] for x in _metrics(run)] == [0, 1, 2]  # aborted at the third bad step
    assert not (run / "artifact.pt").exists()
    assert load_checkpoint(latest_checkpoint(run))["step"] == 2  # the last good checkpoint is intact


def test_finetune_skips_counts_and_aborts_on_nan(tmp_path, monkeypatch):
    root = make_coop_dataset(tmp_path / "data")
    real_terms = prometar_module.Objective.terms
    calls = {"n": 0, "bad": {1}}

    def terms(self, prompts, batch):  # the regularized step's loss of iteration 1 is NaN
        out = real_terms(self, prompts, batch)
        calls["n"] += 1
        if calls["n"] in calls["bad"]:
            out.task = out.task * float("nan")
        return out

    monkeypatch.setattr(prometar_module.Objective, "terms", terms)
    args = finetune_overrides(root, tmp_path / "runs", ("method=prometar", "optim.max_nonfinite=2"))
    assert finetune.main(args) == 0
    run = tmp_path / "runs" / "OxfordPets" / "prometar" / "seed_1"
    res = json.loads((run / "results.json").read_text())
    assert res["train"]["nonfinite_steps"] == 1 and res["train"]["steps"] == 2
    assert [x["nonfinite_steps"] for x in _metrics(run)] == [1, 1]
    calls["n"], calls["bad"] = 0, set(range(1, 100))
    with pytest.raises(RuntimeError, match="max_nonfinite=2"):
        finetune.main([*args, "force=true", "optim.epochs=3"])


# ---------------------------------------------------------------------- a rank dies or hangs
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_with_fault(task_data, run: Path, fault: str, timeout_s: int) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", FAULT=fault, FAULT_RANK="1",
               FAULT_AFTER="3")  # rank 1 computes steps 1-3 (one task each), then fails in step 4
    env.pop("SLURM_ARRAY_TASK_ID", None)
    cmd = [ACCELERATE, "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml", "--main_process_port",
           str(_port()), "tests/helpers/faulty_pretrain.py",
           *pretrain_overrides(task_data, run, steps=8, extra=("collective_timeout_s=10",))]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    return out, time.monotonic() - t0


@pytest.mark.multiproc
@pytest.mark.parametrize("fault", ["die", "hang"])
def test_dead_or_stuck_rank_ends_the_job_with_an_error(task_data, tmp_path, fault):
    require(ACCELERATE is not None, "multiproc", "accelerate CLI not found")
    run = tmp_path / "run"
    out, seconds = _launch_with_fault(task_data, run, fault, timeout_s=240)
    log = out.stdout + out.stderr
    assert f"injecting fault '{fault}' on rank 1" in log, log[-4000:]
    assert out.returncode != 0, log[-4000:]
    if fault == "hang":  # the survivor's all-reduce times out after collective_timeout_s and says so
        assert "CollectiveError" in log and "collective_timeout_s=10" in log, log[-4000:]
    else:  # the launcher reports the killed rank and stops the other one
        assert "Signals.SIGKILL" in log or "exitcode  : -9" in log, log[-4000:]
    assert seconds < 200, f"took {seconds:.0f} s to end"
    assert [s for s, _ in list_checkpoints(run)] == [2]  # the checkpoint before the fault stays loadable
    assert load_checkpoint(latest_checkpoint(run))["step"] == 2 and not (run / "artifact.pt").exists()
