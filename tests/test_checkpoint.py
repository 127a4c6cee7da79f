"""Checkpoints: atomic writes, pruning, corrupt/unsafe files, RNG round trip, artifact, preemption."""

from __future__ import annotations

import logging
import os
import pickle
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import checkpoint as ck
from pipeline.config import ModelConfig, to_dict

REPO = Path(__file__).resolve().parents[1]


def _train_state(opt_cls, **opt_kwargs):
    """A tiny model + optimizer + scheduler after two steps (so optimizer state is non-empty)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = opt_cls(model.parameters(), lr=0.1, **opt_kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _continue(model, opt, sched, steps=2):
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model.weight.detach().clone()


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.AdamW, {"weight_decay": 0.01}),
                                        (torch.optim.SGD, {"momentum": 0.9})])
def test_full_training_state_round_trips_weights_only(tmp_path, opt_cls, kw):
    model, opt, sched = _train_state(opt_cls, **kw)
    state = {
        "prompts": {"text": torch.randn(9, 4, 8), "vision": torch.randn(9, 4, 16)},
        "regulator": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": ck.rng_state(),
        "data": {"epoch": 1, "shard_order": [3, 1, 2], "position": 17},
        "config": to_dict(ModelConfig()),
        "wandb_run_id": "abc12345",
    }
    path = ck.save_checkpoint(tmp_path, 20, state, keep_last=2)
    assert path == tmp_path / "checkpoints" / "step_00000020.pt"
    # Independent of our loader: plain torch.load with weights_only must accept the file.
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 20 and raw["data"]["shard_order"] == [3, 1, 2]
    loaded = ck.load_checkpoint(path)
    assert loaded["config"] == to_dict(ModelConfig())
    torch.testing.assert_close(loaded["prompts"]["text"], state["prompts"]["text"])

    # Resuming from the checkpoint continues exactly like the uninterrupted run.
    expected = _continue(model, opt, sched)
    model2, opt2, sched2 = _train_state(opt_cls, **kw)
    with torch.no_grad():
        model2.weight.mul_(0)  # make sure the weights really come from the checkpoint
    model2.load_state_dict(loaded["regulator"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert torch.equal(_continue(model2, opt2, sched2), expected)


def test_rng_state_restores_every_generator(tmp_path):
    random.gauss(0, 1)  # leaves a cached second gaussian, part of the state
    np.random.standard_normal()
    ck.save_checkpoint(tmp_path, 1, {"rng": ck.rng_state()}, keep_last=1)

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                float(np.random.standard_normal()), torch.rand(3).tolist())

    first = draw()
    draw()  # move every generator on
    ck.set_rng_state(ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["rng"])
    assert draw() == first


def test_prune_keeps_last_and_drops_abandoned_timeline(tmp_path):
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 40]
    # Resumed from 30 (say 40 was bad): saving 35 removes 40, which belongs to the abandoned run.
    ck.save_checkpoint(tmp_path, 35, {"x": torch.tensor(35)}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 35]
    assert ck.latest_checkpoint(tmp_path).name == "step_00000035.pt"
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(tmp_path, 50, {}, keep_last=0)
    with pytest.raises(ValueError, match="disagrees"):
        ck.save_checkpoint(tmp_path, 50, {"step": 49}, keep_last=1)


def test_unloadable_values_fail_at_save_time_naming_the_path(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['np'\].*numpy.ndarray"):
        ck.save_checkpoint(tmp_path, 1, {"rng": {"np": np.zeros(3)}}, keep_last=1)
    with pytest.raises(TypeError, match="float64"):  # a float subclass pickles by reference
        ck.save_checkpoint(tmp_path, 1, {"loss": np.float64(1.0)}, keep_last=1)
    assert ck.list_checkpoints(tmp_path) == []
    assert not any((tmp_path / "checkpoints").glob("*"))  # no temp file left behind either


def test_latest_skips_truncated_and_garbage_with_reason(tmp_path, caplog):
    assert ck.latest_checkpoint(tmp_path) is None
    ck.save_checkpoint(tmp_path, 1, {"w": torch.randn(1000)}, keep_last=5)
    good = ck.save_checkpoint(tmp_path, 2, {"w": torch.randn(1000)}, keep_last=5)
    truncated = ck.checkpoint_path(tmp_path, 3)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ck.checkpoint_path(tmp_path, 4).write_bytes(b"not a checkpoint at all")
    (tmp_path / "checkpoints" / ".step_00000005.pt.123.abc.tmp").write_bytes(good.read_bytes())
    ck.checkpoint_path(tmp_path, 6).write_bytes(good.read_bytes())  # renamed by hand: holds step 2
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert ck.latest_checkpoint(tmp_path) == good
    text = caplog.text
    assert "step_00000004.pt" in text and "step_00000003.pt" in text and "truncated or corrupt" in text
    assert "step_00000006.pt: it holds step 2" in text
    assert ".tmp" not in text  # temp files are not even considered
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.load_checkpoint(truncated)


class _Payload:
    """Unpickling this runs a shell command creating ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickled_code_is_refused_and_not_executed(tmp_path):
    # Control: the payload really does run when unpickled unsafely, so the check below means something.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned"
    raw = ck.checkpoint_path(tmp_path, 7)
    raw.parent.mkdir(parents=True)
    raw.write_bytes(pickle.dumps({"step": 7, "x": _Payload(marker)}, protocol=2))  # legacy pickle format
    zipped = ck.checkpoint_path(tmp_path, 8)
    torch.save({"step": 8, "x": _Payload(marker)}, zipped)  # torch's zip format
    for path in (raw, zipped):
        with pytest.raises(ck.UnsafeCheckpointError, match="refusing to load.*nothing was executed"):
            ck.load_checkpoint(path)
        with pytest.raises(ck.UnsafeCheckpointError):
            ck.load_artifact(path)
    assert ck.latest_checkpoint(tmp_path) is None
    assert not marker.exists()


_KILL_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from pipeline import checkpoint as ck
    run_dir = sys.argv[1]
    big = {"w": torch.arange(4_000_000, dtype=torch.float32)}  # 16 MB
    ck.save_checkpoint(run_dir, 1, big, keep_last=3)
    real_fsync = os.fsync
    def slow_fsync(fd):
        # Pause with step 2's bytes written to the temp file but not yet renamed: the parent kills us here.
        print("in-write", flush=True)
        time.sleep(60)
    os.fsync = slow_fsync
    ck.save_checkpoint(run_dir, 2, {"w": big["w"] * 2}, keep_last=3)
    print("finished", flush=True)
""")


def test_sigkill_during_write_keeps_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "in-write"
        temps = list((tmp_path / "checkpoints").glob(".*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 16_000_000  # really mid-save
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    latest = ck.latest_checkpoint(tmp_path)
    assert latest == ck.checkpoint_path(tmp_path, 1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert torch.equal(ck.load_checkpoint(latest)["w"], torch.arange(4_000_000, dtype=torch.float32))
    ck.save_checkpoint(tmp_path, 2, {"w": torch.zeros(1)}, keep_last=3)  # the next save cleans up
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_crash_inside_write_leaves_no_partial_file(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, {"w": torch.ones(10)}, keep_last=3)
    real_save = torch.save

    def half_then_crash(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, {"w": torch.zeros(10)}, keep_last=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001.pt"]
    assert ck.latest_checkpoint(tmp_path) == ck.checkpoint_path(tmp_path, 1)


# ----------------------------------------------------------------------------- artifact
def _prompts(width=64):
    return {"text": torch.randn(9, 4, width), "vision": torch.randn(9, 4, 2 * width)}


def test_artifact_round_trip_and_compatibility(tmp_path):
    cfg = to_dict(ModelConfig())
    cfg["backbone"]["arch"] = "tiny-vit"
    prompts = _prompts()
    regulator = nn.Linear(3, 2).state_dict()
    meta = ck.artifact_metadata({"model": cfg, "stage": "meta"}, prompts, extra={"steps": 100})
    assert meta["backbone.arch"] == "tiny-vit" and meta["prompts.type"] == "ivlp"
    assert meta["prompt_shapes"] == {"text": [9, 4, 64], "vision": [9, 4, 128]}
    assert meta["embed_dim.vision"] == 128 and meta["prompts.n_ctx_text"] == 4 and meta["steps"] == 100
    assert meta["config"]["stage"] == "meta" and meta["git_revision"]

    path = ck.save_artifact(tmp_path / "art" / "prompts.pt", {k: v.requires_grad_() for k, v in prompts.items()},
                            regulator, meta)
    art = ck.load_artifact(path)
    assert torch.equal(art.prompts["text"], prompts["text"]) and not art.prompts["text"].requires_grad
    assert torch.equal(art.regulator_state["weight"], regulator["weight"])
    assert art.metadata["schema_version"] == ck.SCHEMA_VERSION
    ck.check_compatible(art.metadata, ck.artifact_metadata(cfg, prompts))  # same run: fine

    other = to_dict(ModelConfig())  # ViT-B-16 with 512-wide text prompts
    with pytest.raises(ValueError) as e:
        ck.check_compatible(art.metadata, ck.artifact_metadata(other, _prompts(512)))
    msg = str(e.value)
    assert "backbone.arch='tiny-vit' but this run uses 'ViT-B-16'" in msg
    assert "prompts.text shape (9, 4, 64) != (9, 4, 512)" in msg
    assert "prompts.vision shape (9, 4, 128) != (9, 4, 1024)" in msg
    with pytest.raises(ValueError, match=r"prompts.vision shape \(9, 4, 128\) != \(absent\)"):
        ck.check_compatible(art.metadata, {"prompt_shapes": {"text": [9, 4, 64]}})


def test_artifact_newer_schema_and_wrong_kind_refused(tmp_path):
    meta = {"schema_version": ck.SCHEMA_VERSION + 1}
    with pytest.raises(ValueError, match="newer than this code supports"):
        ck.check_compatible(meta, {})
    path = tmp_path / "future.pt"
    torch.save({"kind": ck.ARTIFACT_KIND, "schema_version": ck.SCHEMA_VERSION + 1, "prompts": {},
                "regulator": {}, "metadata": meta}, path)
    with pytest.raises(ValueError, match=f"schema version {ck.SCHEMA_VERSION + 1} is newer"):
        ck.load_artifact(path)
    ck.save_checkpoint(tmp_path, 1, {}, keep_last=1)
    with pytest.raises(ck.CheckpointError, match="not a prompt artifact"):
        ck.load_artifact(ck.checkpoint_path(tmp_path, 1))


def test_git_revision(tmp_path, monkeypatch):
    rev = ck.git_revision(REPO)
    assert rev == "unknown" or len(rev.removesuffix("-dirty")) == 40
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert ck.git_revision(tmp_path) == "unknown"
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (repo / "a.txt").write_text("1")
    for args in (["init", "-q"], ["add", "a.txt"], ["commit", "-qm", "x"]):
        subprocess.run(git + args, cwd=repo, check=True)
    clean = ck.git_revision(repo)
    assert len(clean) == 40 and int(clean, 16) >= 0
    (repo / "untracked.txt").write_text("ignored")
    assert ck.git_revision(repo) == clean
    (repo / "a.txt").write_text("2")
    assert ck.git_revision(repo) == clean + "-dirty"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git binary
    assert ck.git_revision(repo) == "unknown"


# ----------------------------------------------------------------------------- preemption
def test_preemption_handler_sets_flag_and_restores():
    seen = []
    term_before = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with ck.PreemptionHandler() as pre:
            assert not pre.requested
            os.kill(os.getpid(), signal.SIGUSR1)
            assert pre.requested and pre.signal_name == "SIGUSR1"
            os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the handler
            assert pre.signal_name == "SIGTERM"
        assert seen == []
        os.kill(os.getpid(), signal.SIGUSR1)  # our earlier handler is back
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_preemption_handler_outside_main_thread_warns(caplog):
    result = {}

    def worker():
        with ck.PreemptionHandler() as pre:
            result["requested"] = pre.requested

    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert result == {"requested": False} and "not installed" in caplog.text


def _train_until_preempted(run_dir, pre, signal_at):
    """The loop contract of the entry points: check the flag each step, checkpoint, exit 0."""
    for step in range(1, 100):
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM does before preempting the job
        if pre.requested:
            ck.save_checkpoint(run_dir, step, {"signal": pre.signal_name}, keep_last=2)
            sys.exit(0)
    raise AssertionError("the signal was not noticed")


def test_sigterm_in_training_loop_checkpoints_and_exits_zero(tmp_path):
    with ck.PreemptionHandler() as pre, pytest.raises(SystemExit) as e:
        _train_until_preempted(tmp_path, pre, signal_at=3)
    assert e.value.code == 0
    state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert state == {"signal": "SIGTERM", "step": 3}
