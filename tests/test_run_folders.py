"""Run folders as a new user meets them: one run per folder, reruns and resumes with changed settings,
honest counters after a resume, file modes, and progress in non-terminal logs."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys

import pytest

from pipeline import evaluate, finetune, pretrain, pretrain_loop, report
from pipeline.checkpoint import list_checkpoints, load_checkpoint
from pipeline.config import ConfigError
from pipeline.run_lock import LOCK_FILE, RunDirLocked, RunLock
from pipeline.tracking import LineProgress

from .helpers.fewshot_data import finetune_overrides, make_coop_dataset
from .helpers.tasks import make_task_data, pretrain_overrides
from .test_pretrain import _PreemptAfter


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return make_task_data(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_coop_dataset(tmp_path_factory.mktemp("data"))


def _lock_file(run_dir, pid, host=None, job=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                 "slurm_job_id": job, "started": 0}))


def kill_after_first_save(monkeypatch) -> None:
    """Make a run die (KeyboardInterrupt) right after its first checkpoint is written."""
    from pipeline.train_state import TrainState

    real_save = TrainState.save

    def killed(self, *a, **k):
        path = real_save(self, *a, **k)
        raise KeyboardInterrupt(f"killed after writing {path}")

    monkeypatch.setattr(TrainState, "save", killed)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- one run per folder
def test_a_second_run_on_a_held_folder_refuses_and_loses_nothing(task_data, tmp_path):
    run = tmp_path / "run"
    assert pretrain.main(pretrain_overrides(task_data, run, steps=2)) == 0
    metrics = (run / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live "first run"
    try:
        _lock_file(run, holder.pid)
        with pytest.raises(RunDirLocked, match=rf"{run}.*in use by another run \(pid {holder.pid} on host"):
            pretrain.main(pretrain_overrides(task_data, run, steps=4))
    finally:
        holder.kill()
        holder.wait()
    assert (run / "metrics.jsonl").read_text() == metrics and [s for s, _ in list_checkpoints(run)] == [2]


def test_stale_and_requeued_locks_are_taken_over_and_released(task_data, tmp_path, caplog, monkeypatch):
    run = tmp_path / "run"
    _lock_file(run, _dead_pid())
    with caplog.at_level(logging.WARNING, logger="pipeline.run_lock"):
        assert pretrain.main(pretrain_overrides(task_data, run, steps=2)) == 0
    assert "no longer exists on this host" in caplog.text
    assert not (run / LOCK_FILE).exists()  # released at the end
    # a SLURM requeue: the same job, another node, the old process gone with its node
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _lock_file(run, 1, host="another-node", job="4242")
    assert pretrain.main(pretrain_overrides(task_data, run, steps=3)) == 0
    # the same lock from another job on another host cannot be probed: refused
    _lock_file(run, 1, host="another-node", job="1")
    with pytest.raises(RunDirLocked, match="another-node.*SLURM job 1"):
        pretrain.main(pretrain_overrides(task_data, run, steps=4))


def test_lock_is_exclusive_within_a_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirLocked):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


def test_stage2_and_evaluate_hold_the_run_folder(data_root, tmp_path):
    args = finetune_overrides(data_root, tmp_path, ("method=ivlp",))
    cfg = finetune.load_finetune_config(None, args)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_file(cfg.run_dir, holder.pid)
        with pytest.raises(RunDirLocked, match="in use by another run"):
            finetune.main(args)
        (cfg.run_dir / LOCK_FILE).unlink()
        assert finetune.main(args) == 0
        _lock_file(cfg.run_dir, holder.pid)
        with pytest.raises(RunDirLocked, match="in use by another run"):
            evaluate.main([str(cfg.run_dir)])
    finally:
        holder.kill()
        holder.wait()


def test_empty_run_folder_settings_are_refused(task_data, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="run_dir is empty"):
        pretrain.main([*pretrain_overrides(task_data, tmp_path / "x"), "run_dir="])
    with pytest.raises(ConfigError, match="run_root is empty"):
        finetune.main([*finetune_overrides(data_root, tmp_path / "y"), "run_root="])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- resume with changed settings
def test_resume_refuses_changed_settings_and_applies_operational_ones(task_data, tmp_path, caplog):
    run = tmp_path / "run"
    assert pretrain.main(pretrain_overrides(task_data, run, steps=2)) == 0
    with pytest.raises(ConfigError, match=r"optim.lr: 0.01 -> 0.05"):
        pretrain.main(pretrain_overrides(task_data, run, steps=4, extra=("optim.lr=0.05",)))
    with pytest.raises(ConfigError, match=r"model.prompts.n_ctx_vision: 4 -> 2"):
        pretrain.main(pretrain_overrides(task_data, run, steps=4, extra=("model.prompts.n_ctx_vision=2",)))
    assert [s for s, _ in list_checkpoints(run)] == [2]  # nothing was trained by the refused runs
    with caplog.at_level(logging.WARNING, logger="pipeline.train_state"):
        assert pretrain.main(pretrain_overrides(task_data, run, steps=4, extra=("tracking.log_every=2",))) == 0
    assert "tracking.log_every changed 1 -> 2" in caplog.text and "optim.steps changed 2 -> 4" in caplog.text
    info = json.loads((run / "run_info.json").read_text())
    assert info["config"]["tracking"]["log_every"] == 2 and info["config"]["optim"]["steps"] == 4  # what is in effect
    assert load_checkpoint(list_checkpoints(run)[-1][1])["config"]["optim"]["steps"] == 4


def test_stage2_resume_refuses_a_changed_learning_rate(data_root, tmp_path, monkeypatch):

    args = finetune_overrides(data_root, tmp_path, ("method=ivlp", "optim.epochs=2"))
    kill_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"optim.lr: 0.0025 -> 0.1"):
        finetune.main([*args, "optim.lr=0.1"])
    assert finetune.main(args) == 0


# ----------------------------------------------------------------------------- finished stage-2 runs
def test_a_finished_run_is_reused_only_for_the_same_config(data_root, tmp_path):
    other_root = make_coop_dataset(tmp_path / "other")
    args = finetune_overrides(data_root, tmp_path / "runs", ("method=ivlp",))
    assert finetune.main(args) == 0
    assert finetune.run(finetune.load_finetune_config(None, [*args, "workers=0", "threads=1"]))["skipped"]
    with pytest.raises(ConfigError, match=rf"data.root: '{data_root}' -> '{other_root}'"):
        finetune.main([*args[:2], f"data.root={other_root}", *args[3:]])
    with pytest.raises(ConfigError, match="eval.targets"):
        finetune.main([*args, "eval.targets=[Caltech101]"])
    assert finetune.main([*args[:2], f"data.root={other_root}", *args[3:], "force=true"]) == 0


def test_a_finished_run_from_another_artifact_file_is_not_reused(data_root, tmp_path):
    from .test_finetune import _artifact

    args = finetune_overrides(data_root, tmp_path, ("method=prometar",))
    cfg = finetune.load_finetune_config(None, args)
    path, _ = _artifact(tmp_path, cfg)
    with_art = [*args, "init=artifact", f"artifact={path}"]
    assert finetune.main(with_art) == 0
    assert finetune.run(finetune.load_finetune_config(None, with_art))["skipped"]
    other, _ = _artifact(tmp_path / "b", cfg, prompts={"init_std": 0.5})
    path.write_bytes(other.read_bytes())  # same path, other content
    with pytest.raises(ConfigError, match="another artifact file"):
        finetune.main(with_art)


# ----------------------------------------------------------------------------- counters after a resume
def test_stage1_counters_after_a_resume_equal_an_uninterrupted_run(task_data, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    assert pretrain.main(pretrain_overrides(task_data, full, steps=5)) == 0
    monkeypatch.setattr(pretrain_loop, "PreemptionHandler", _PreemptAfter(4))  # stops mid data epoch (3 steps)
    assert pretrain.main(pretrain_overrides(task_data, part, steps=5)) == 0
    monkeypatch.undo()
    assert pretrain.main(pretrain_overrides(task_data, part, steps=5)) == 0

    def counters(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k.startswith("data/")} for x in lines]

    a, b = counters(full), counters(part)
    assert len(a) == len(b) == 5 and a[-1]["data/samples"] > 0
    assert a == b
    assert load_checkpoint(list_checkpoints(part)[-1][1])["data"]["counters"] == \
        load_checkpoint(list_checkpoints(full)[-1][1])["data"]["counters"]


def test_stage2_metrics_after_a_resume_equal_an_uninterrupted_run(data_root, tmp_path, monkeypatch):

    base = finetune_overrides(data_root, tmp_path, ("method=prometar", "optim.epochs=2"))
    assert finetune.main([*base, "name=full"]) == 0
    kill_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        finetune.main([*base, "name=part"])
    monkeypatch.undo()
    assert finetune.main([*base, "name=part"]) == 0

    def lines(name):
        rows = [json.loads(x) for x in (tmp_path / "OxfordPets" / name / "seed_1" / "metrics.jsonl").read_text()
                .splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "iter_s")} for r in rows]

    assert lines("full") == lines("part")
    res = [json.loads((tmp_path / "OxfordPets" / n / "seed_1" / "results.json").read_text())["train"]
           for n in ("full", "part")]
    assert res[0]["nonfinite_steps"] == res[1]["nonfinite_steps"] and res[0]["steps"] == res[1]["steps"]


# ----------------------------------------------------------------------------- files and logs
def test_run_files_follow_the_umask(data_root, tmp_path):
    old = os.umask(0o022)
    try:
        args = finetune_overrides(data_root, tmp_path, ("method=ivlp",))
        assert finetune.main(args) == 0
        report.main([str(tmp_path)])
    finally:
        os.umask(old)
    run = tmp_path / "OxfordPets" / "ivlp" / "seed_1"
    for path in (run / "results.json", run / "metrics.jsonl", run / "run_info.json", run / "prompts.pt",
                 tmp_path / "report.md", tmp_path / "report.csv"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_progress_lines_when_stderr_is_not_a_terminal(task_data, tmp_path, capsys):
    assert pretrain.main(pretrain_overrides(task_data, tmp_path / "run", steps=3,
                                            extra=("tracking.progress_every_s=0.000001",))) == 0
    err = capsys.readouterr().err
    assert "meta-pretrain: step 1/3 (33%)" in err and "meta-pretrain: step 3/3 (100%)" in err
    assert "outer_loss=" in err and "steps/s" in err


def test_line_progress_format(tmp_path):
    import io

    out = io.StringIO()
    bar = LineProgress(10, "x", every_s=1e-9, stream=out)
    bar.update(4)  # the resume step: sets the start, prints nothing, is not counted as speed
    assert out.getvalue() == ""
    bar.set_postfix(loss=1.23456)
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("x: step 5/10 (50%)") and "ETA" in lines[0] and lines[0].endswith("loss=1.235")
    rate = float(lines[0].split(", ")[1].split()[0])
    assert 0 < rate and len(lines) == 2  # one line per update at this interval, one at close
