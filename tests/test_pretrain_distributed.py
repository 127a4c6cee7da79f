"""Stage 1 across processes: accelerate launch with 2 CPU ranks, 2 "machines" on loopback, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import list_checkpoints, load_artifact, load_checkpoint

from .conftest import require
from .helpers.tasks import make_task_data, pretrain_overrides
from .helpers.wandb_offline import offline_run

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
pytestmark = pytest.mark.multiproc


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_SILENT="true")
    env.pop("SLURM_ARRAY_TASK_ID", None)
    return env


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("tasks"))


def _same(a, b, atol):
    for k in a.prompts:
        assert torch.allclose(a.prompts[k], b.prompts[k], atol=atol, rtol=0), (k, (a.prompts[k] - b.prompts[k]).abs().max())
    for k in a.regulator_state:
        assert torch.allclose(a.regulator_state[k], b.regulator_state[k], atol=atol, rtol=0), k


def test_two_ranks_equal_one_rank(task_data, tmp_path):
    require(ACCELERATE is not None, "multiproc", "accelerate CLI not found")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "pipeline.pretrain", *pretrain_overrides(task_data, one, steps=3)])
    _run([ACCELERATE, "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml", "--main_process_port",
          str(_port()), "pipeline/pretrain.py", *pretrain_overrides(task_data, two, steps=3)])
    ckpt = load_checkpoint(list_checkpoints(two)[-1][1])
    assert ckpt["world_size"] == 2, "accelerate started fewer than 2 ranks"
    # the run verified bit-identical parameters on both ranks at every checkpoint (digest gathered)
    assert len(ckpt["digest"]) == 64
    _same(load_artifact(one / "artifact.pt"), load_artifact(two / "artifact.pt"), atol=1e-6)


def test_two_machines_on_loopback(task_data, tmp_path):
    require(ACCELERATE is not None, "multiproc", "accelerate CLI not found")
    run, port = tmp_path / "run", _port()
    procs = []
    for machine in (0, 1):
        cmd = [ACCELERATE, "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "pipeline/pretrain.py",
               *pretrain_overrides(task_data, run, steps=2)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-5000:]
    ckpt = load_checkpoint(list_checkpoints(run)[-1][1])
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2
    assert (run / "artifact.pt").exists()


def test_sigterm_then_resume_equals_uninterrupted(task_data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("tracking.wandb_mode=offline", "checkpoint.every=100")
    _run([sys.executable, "-m", "pipeline.pretrain", *pretrain_overrides(task_data, full, steps=6, extra=extra)])
    cmd = [sys.executable, "-m", "pipeline.pretrain", *pretrain_overrides(task_data, part, steps=6, extra=extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = part / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]  # SIGTERM: checkpoint, then a clean exit for requeue
    stopped_at = list_checkpoints(part)[-1][0]
    assert 2 <= stopped_at < 6 and not (part / "artifact.pt").exists(), "the run finished before SIGTERM"
    run_id = (part / "wandb_run_id.txt").read_text().strip()
    _run(cmd)
    assert (part / "wandb_run_id.txt").read_text().strip() == run_id
    _same(load_artifact(full / "artifact.pt"), load_artifact(part / "artifact.pt"), atol=1e-6)
    # W&B offline: both attempts logged under the same run id, with the metric keys
    runs = sorted((part / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run_id in r.name for r in runs)
    first, resumed = offline_run(runs[0]), offline_run(runs[1])
    assert first["run"].run_id == resumed["run"].run_id == run_id
    logged = set().union(*(h.keys() for h in first["history"].values()))
    assert {"outer_loss", "query_acc_after", "gamma_mean", "samples_per_s", "data/samples"} <= logged
    assert max(resumed["history"]) == 6
